"""Property tests: mutated firmware images give a FirmwareImage / a measurement, or a
FirmwareError, never another exception (sev-snp-measure's own parser included)."""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import FIRMWARE_DIR  # tests/ is on sys.path (rootdir conftest)
from verifier.errors import FirmwareError
from verifier.firmware.image import inspect_firmware, require_snp_firmware
from verifier.measure.launch import KernelHashes, Shape, measurement_table

# The last 64 KiB of a real OVMF build hold its reset vector, footer GUID table and
# SEV metadata (all located from the end), so they form a small, valid SNP firmware
# that keeps each example fast.
TAIL = 64 * 1024
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SHAPES = [Shape(1, "EPYC-v4"), Shape(2, "EPYC-Milan", vmm="ec2"), Shape(2, "EPYC-Genoa", vmm="gce"),
          Shape(1, "EPYC-v4", kernel_hashes=KernelHashes.from_bytes(b"k"))]
INTERESTING = [0, 1, 0x1000, 0xFFF, 0x800000, 0x10, 0xFFFFFFFF, 0x7FFFFFFF, TAIL, TAIL + 1, 0x41534556]


def _base(name: str) -> bytes:
    path = FIRMWARE_DIR / name
    if not path.exists():
        pytest.skip(f"{path} missing")
    return path.read_bytes()[-TAIL:]


BASES = {}


def base(name: str) -> bytes:
    if name not in BASES:
        BASES[name] = _base(name)
        require_snp_firmware(BASES[name])  # the unmutated tail is a valid SNP firmware
    return BASES[name]


NAMES = st.sampled_from(["edk2-2022.11-OVMF.fd", "edk2-2026.08-OVMF.amdsev.fd"])


def _check(data: bytes) -> None:
    try:
        inspect_firmware(data)
    except FirmwareError as exc:
        assert exc.diagnostics() and exc.exit_code == 2
    for shape in SHAPES:
        try:
            table = measurement_table(data, [shape])
        except FirmwareError as exc:
            assert exc.diagnostics() and exc.exit_code == 2
            continue
        assert len(table[shape]) == 48


@SETTINGS
@given(NAMES, st.lists(st.tuples(st.integers(1, 4096), st.integers(0, 255)), min_size=1, max_size=6))
def test_byte_flips_in_the_last_page(name, flips):
    data = bytearray(base(name))
    for back, value in flips:
        data[-back] = value
    _check(bytes(data))


@SETTINGS
@given(NAMES, st.integers(4, 1600), st.sampled_from(INTERESTING))  # footer table + SEV metadata
def test_u32_overwrites_in_footer_and_metadata(name, back, value):
    data = bytearray(base(name))
    struct.pack_into("<I", data, len(data) - back, value)
    _check(bytes(data))


@SETTINGS
@given(NAMES, st.integers(0, TAIL), st.binary(max_size=64))
def test_truncation_and_extension(name, cut, head):
    _check(head + base(name)[cut:])


@SETTINGS
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(data):
    _check(data)
    _check(b"IGVM" + data)
