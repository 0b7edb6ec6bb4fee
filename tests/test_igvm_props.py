"""Property tests for the IGVM reader and measurement: any input gives an
IgvmFile / a measurement or a FirmwareError (exit 2), never another exception;
what the writer builds reads back unchanged; every count is bounded."""
from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.igvm_files import CODE_GPA, bsp_vmsa, code_page, minimal_snp_igvm, snp_writer
from verifier.errors import FirmwareError, FirmwareFormatError
from verifier.firmware import igvm as ig
from verifier.firmware.igvm_build import IgvmWriter, fix_checksum
from verifier.measure.igvm import measure_igvm

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BASE = minimal_snp_igvm(vcpus=2)
INTERESTING = [0, 1, 7, 8, 24, 0x1000, 0xFFF, 0x200000, 0xFFFFFFFF, 0x80000000, 0x7FFFFFFF, len(BASE),
               len(BASE) + 1, 0xFFFFFFFFF000 & 0xFFFFFFFF]


def _check(data: bytes) -> None:
    try:
        ig.snp_launch(ig.parse_igvm(data))
    except FirmwareFormatError as exc:   # the reader's refusals: one class, exit 2
        assert exc.diagnostics().startswith("IGVM ") and exc.exit_code == 2
    for rule in ("qemu", "native-zero"):
        try:
            m = measure_igvm(data, rule)
        except FirmwareError as exc:
            assert exc.diagnostics().startswith("IGVM ") and exc.exit_code == 2
            continue
        assert len(m.digest) == 48 and m.vcpus >= 1


@SETTINGS
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(data):
    _check(data)
    _check(b"IGVM" + data)
    _check(fix_checksum(b"IGVM" + struct.pack("<I", 1) + data))


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, len(BASE) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.booleans())
def test_byte_mutations(edits, crc):
    data = bytearray(BASE)
    for pos, value in edits:
        data[pos] = value
    _check(fix_checksum(bytes(data)) if crc else bytes(data))


@SETTINGS
@given(st.integers(0, 1200 // 4 - 1), st.sampled_from(INTERESTING))
def test_u32_field_mutations(index, value):
    """Every u32 of the headers replaced by an interesting value, checksum fixed: reaches each field check."""
    data = bytearray(BASE)
    pos = index * 4
    if pos + 4 <= len(data):
        struct.pack_into("<I", data, pos, value)
    _check(fix_checksum(bytes(data)))


@SETTINGS
@given(st.integers(0, len(BASE)), st.binary(max_size=64))
def test_truncation_and_extension(cut, tail):
    _check(BASE[:cut] + tail)
    _check(fix_checksum(BASE[:cut] + tail))


_directive = st.one_of(
    st.tuples(st.just("page"), st.integers(0, 64), st.booleans(), st.sampled_from([0, 1, 2, 3, 9]),
              st.sampled_from([0, ig.FLAG_UNMEASURED, ig.FLAG_2MB, ig.FLAG_SHARED, 0x8]), st.sampled_from([1, 2, 3])),
    st.tuples(st.just("area"), st.integers(0, 3), st.sampled_from([0x1000, 0x3000, 0x1001])),
    st.tuples(st.just("insert"), st.integers(0, 64), st.integers(0, 3)),
    st.tuples(st.just("param"), st.sampled_from(sorted(ig.PARAMETER_TYPES)), st.integers(0, 3),
              st.integers(0, 0x3000)),
    st.tuples(st.just("required"), st.integers(0, 64), st.integers(1, 4)),
    st.tuples(st.just("vp"), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("id"), st.binary(min_size=48, max_size=48)),
)


@settings(SETTINGS, max_examples=100)
@given(st.lists(_directive, max_size=24))
def test_random_directive_sequences(steps):
    """Structured files (valid framing, random content): the SNP checks and measurement fail cleanly."""
    w = snp_writer()
    for s in steps:
        kind = s[0]
        if kind == "page":
            _, n, has_data, dtype, flags, mask = s
            size = ig.PAGE_2M if flags & ig.FLAG_2MB else ig.PAGE_4K
            data = code_page(n) * (size // 4096) if has_data else None
            w.page(n * size, data, data_type=dtype, flags=flags, mask=mask)
        elif kind == "area":
            w.parameter_area(s[1], s[2])
        elif kind == "insert":
            w.parameter_insert(0x400000 + s[1] * 0x1000, s[2])
        elif kind == "param":
            w.parameter(s[1], s[2], s[3])
        elif kind == "required":
            w.required_memory(0x800000 + s[1] * 0x1000, s[2] * 0x1000)
        elif kind == "vp":
            w.vp_context(bsp_vmsa(), s[1], gpa=0xFFFFFFFFF000 if s[2] else 0x1000)
        else:
            w.id_block(s[1])
    _check(w.to_bytes())


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.booleans()), min_size=1, max_size=20, unique_by=lambda t: t[0]))
def test_writer_round_trip(pages):
    w = snp_writer()
    for n, has_data in pages:
        w.page(CODE_GPA - n * 0x1000, code_page(n) if has_data else None)
    f = ig.parse_igvm(w.vp_context(bsp_vmsa()).to_bytes())
    got = [(d.gpa, d.has_data) for d in f.directives if isinstance(d, ig.PageData)]
    assert got == [(CODE_GPA - n * 0x1000, has_data) for n, has_data in pages]
    for d in f.directives:
        if isinstance(d, ig.PageData) and d.has_data:
            assert f.page(d.file_offset) == code_page((CODE_GPA - d.gpa) // 0x1000)
    assert measure_igvm(f.data).vcpus == 1


def test_header_count_is_bounded():
    w = IgvmWriter().platform().guest_policy()
    for i in range(ig.MAX_HEADERS):
        w.required_memory(i * 0x1000, 0x1000)
    try:
        ig.parse_igvm(w.to_bytes())
    except FirmwareError as exc:
        assert f"more than {ig.MAX_HEADERS} headers" in str(exc)
    else:
        raise AssertionError("a file above MAX_HEADERS was read")


def test_measured_bytes_are_bounded():
    """Zero pages cost the file 24 bytes each: 64 MiB + 2 MiB of them are refused before any hashing."""
    w = snp_writer()
    for i in range(ig.MAX_MEASURED_BYTES // ig.PAGE_2M + 1):
        w.page(i * ig.PAGE_2M, None, flags=ig.FLAG_2MB)
    try:
        measure_igvm(w.vp_context(bsp_vmsa()).to_bytes())
    except FirmwareError as exc:
        assert "above the 67108864-byte limit" in str(exc)
    else:
        raise AssertionError("a launch above MAX_MEASURED_BYTES was measured")
