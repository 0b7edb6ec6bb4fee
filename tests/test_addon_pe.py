"""UKI add-on building and reading: round trips, PE validity, malformed inputs."""
from __future__ import annotations

import shutil
import struct
import subprocess
import uuid

import pefile
import pytest

from verifier.errors import FirmwareError
from verifier.firmware.addon import (EFIFW_MAGIC, MAX_ADDON_SIZE, build_addon, efifw_blob, parse_efifw,
                                     parse_hwids, read_addon)

AMDSEV = "edk2-2026.08-OVMF.amdsev.fd"
BOOKWORM = "edk2-2022.11-OVMF.fd"


@pytest.fixture(scope="module")
def amdsev(firmware_dir):
    return (firmware_dir / AMDSEV).read_bytes()


@pytest.fixture(scope="module")
def bookworm(firmware_dir):
    return (firmware_dir / BOOKWORM).read_bytes()


def _section(pe: pefile.PE, index: int) -> pefile.SectionStructure:
    return pe.sections[index]


def _patch_efifw(addon: bytes, index: int, offset: int, fmt: str, value: int) -> bytes:
    """Overwrite a field inside the contents of section `index`."""
    pe = pefile.PE(data=addon, fast_load=True)
    at = pe.sections[index].PointerToRawData + offset
    out = bytearray(addon)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


def test_round_trip_real_firmware(amdsev):
    addon = build_addon([("edk2-2026.08-acme.3", amdsev)])
    got = read_addon(addon)
    assert got.fwids == ("edk2-2026.08-acme.3",)
    entry = got.select(None)
    assert entry.payload == amdsev
    assert entry.size == len(amdsev)
    assert entry.sha384 == "7d6b3ffceecc584863e2e577f049730a605ff1e97eacc083824b5d2e5f3183b9f78c056e3d8a30eae30471ae1ce33671"
    assert [s.name for s in got.sections] == [".text", ".sbat", ".efifw"]


def test_pefile_reads_the_efifw_section_byte_for_byte(amdsev):
    addon = build_addon([("fw-a", amdsev)])
    pe = pefile.PE(data=addon)  # full load, not fast_load: every directory is parsed
    assert pe.FILE_HEADER.Machine == 0x8664
    assert pe.OPTIONAL_HEADER.Magic == 0x20B
    assert pe.OPTIONAL_HEADER.Subsystem == 10
    assert pe.verify_checksum()
    sec = [s for s in pe.sections if s.Name.rstrip(b"\0") == b".efifw"][0]
    blob = sec.get_data(length=sec.Misc_VirtualSize)
    magic, header_len, fwid_len, payload_len = struct.unpack_from("<IIII", blob)
    assert (magic, header_len, fwid_len, payload_len) == (0xFEEDDEAD, 16, len(b"fw-a\0"), len(amdsev))
    assert blob[16:16 + fwid_len] == b"fw-a\0"
    assert blob[16 + fwid_len:] == amdsev
    # Entry point is inside .text and the image size covers every section.
    text = pe.sections[0]
    assert text.VirtualAddress <= pe.OPTIONAL_HEADER.AddressOfEntryPoint < text.VirtualAddress + text.Misc_VirtualSize
    last = pe.sections[-1]
    assert pe.OPTIONAL_HEADER.SizeOfImage >= last.VirtualAddress + last.Misc_VirtualSize
    assert pe.OPTIONAL_HEADER.SizeOfImage % pe.OPTIONAL_HEADER.SectionAlignment == 0


@pytest.mark.skipif(shutil.which("objdump") is None, reason="binutils objdump not installed")
def test_binutils_reads_it_as_an_efi_application(tmp_path, bookworm):
    path = tmp_path / "a.efi"
    path.write_bytes(build_addon([("fw", bookworm)]))
    out = subprocess.run(["objdump", "-x", str(path)], capture_output=True, text=True, check=True).stdout
    assert "pei-x86-64" in out
    assert "(EFI application)" in out
    assert ".efifw" in out


def test_two_images_select_by_fwid(amdsev, bookworm):
    addon = read_addon(build_addon([("new", amdsev), ("old", bookworm)]))
    assert addon.fwids == ("new", "old")
    assert addon.select("old").payload == bookworm
    assert addon.select("new").payload == amdsev
    with pytest.raises(FirmwareError, match=r"2 firmware images \('new', 'old'\)"):
        addon.select(None)
    with pytest.raises(FirmwareError, match=r"no firmware with fwid 'other'.*'new', 'old'"):
        addon.select("other")


def test_section_index_points_at_the_section():
    addon = build_addon([("a", b"1" * 10), ("b", b"2" * 20)])
    got = read_addon(addon)
    pe = pefile.PE(data=addon, fast_load=True)
    for entry in got.entries:
        assert pe.sections[entry.section_index].Name.rstrip(b"\0") == b".efifw"


def test_build_refuses_bad_entries():
    with pytest.raises(FirmwareError, match="at least one"):
        build_addon([])
    with pytest.raises(FirmwareError, match="duplicate fwid"):
        build_addon([("a", b"x"), ("a", b"y")])
    with pytest.raises(FirmwareError, match="empty"):
        build_addon([("a", b"")])
    with pytest.raises(FirmwareError, match="NUL"):
        build_addon([("a\0b", b"x")])
    with pytest.raises(FirmwareError, match="longer than"):
        build_addon([("x" * 300, b"x")])


# -- malformed add-ons: each is a FirmwareError that says what is wrong ----------------
def test_not_a_pe():
    with pytest.raises(FirmwareError, match="not a PE file"):
        read_addon(b"\x7fELF" + bytes(100))
    with pytest.raises(FirmwareError, match="not a PE file"):
        read_addon(b"")


def test_truncated_pe():
    addon = build_addon([("a", b"payload" * 100)])
    for cut in (2, 64, 100, 0x180, 0x200, len(addon) - 100):
        with pytest.raises(FirmwareError):
            read_addon(addon[:cut])


def test_wrong_magic():
    addon = build_addon([("a", b"payload")])
    bad = _patch_efifw(addon, 2, 0, "<I", 0xDEADBEEF)
    with pytest.raises(FirmwareError, match=r"magic is 0xdeadbeef, expected 0xfeeddead"):
        read_addon(bad)


@pytest.mark.parametrize("field,offset,value,match", [
    ("payload_len", 12, 10_000, "runs past the section"),
    ("payload_len", 12, 0xFFFFFFFF, "runs past the section"),
    ("payload_len", 12, 0, "payload_len is 0"),
    ("fwid_len", 8, 0xFFFFFFFF, "fwid_len"),
    ("fwid_len", 8, 1, "fwid_len"),
    ("header_len", 4, 8, "header_len"),
    ("header_len", 4, 0xFFFFFFF0, "header_len"),
])
def test_bad_lengths(field, offset, value, match):
    addon = build_addon([("abc", b"payload" * 3)])
    with pytest.raises(FirmwareError, match=match):
        read_addon(_patch_efifw(addon, 2, offset, "<I", value))


def test_fwid_without_nul():
    addon = build_addon([("abc", b"payload")])
    bad = _patch_efifw(addon, 2, 16 + 3, "<B", ord("d"))  # overwrite the NUL
    with pytest.raises(FirmwareError, match="not NUL-terminated"):
        read_addon(bad)


def test_section_raw_data_past_end_of_file():
    addon = build_addon([("abc", b"p" * 5000)])
    pe = pefile.PE(data=addon, fast_load=True)
    sec = pe.sections[2]
    with pytest.raises(FirmwareError):
        read_addon(addon[:sec.PointerToRawData + 100])


def test_virtual_size_larger_than_raw_data_is_refused():
    addon = build_addon([("abc", b"p" * 100)])
    pe = pefile.PE(data=addon, fast_load=True)
    sec = pe.sections[2]
    out = bytearray(addon)
    struct.pack_into("<I", out, sec.get_file_offset() + 8, sec.SizeOfRawData + 4096)  # Misc_VirtualSize
    with pytest.raises(FirmwareError, match="exceeds raw size"):
        read_addon(bytes(out))


def test_no_efifw_section():
    addon = build_addon([("abc", b"p")])
    out = bytearray(addon)
    at = out.index(b".efifw\0\0")
    out[at:at + 8] = b".other\0\0"
    with pytest.raises(FirmwareError, match="no .efifw section"):
        read_addon(bytes(out))


def test_huge_addon_is_refused_before_parsing():
    with pytest.raises(FirmwareError, match="above the"):
        read_addon(b"MZ" + bytes(MAX_ADDON_SIZE))


def test_wrong_machine_and_subsystem():
    addon = build_addon([("abc", b"p")])
    pe = pefile.PE(data=addon, fast_load=True)
    out = bytearray(addon)
    struct.pack_into("<H", out, pe.FILE_HEADER.get_file_offset(), 0xAA64)
    with pytest.raises(FirmwareError, match="machine is 0xaa64"):
        read_addon(bytes(out))
    out = bytearray(addon)
    struct.pack_into("<H", out, pe.OPTIONAL_HEADER.get_file_offset() + 68, 3)  # Subsystem: Windows CUI
    with pytest.raises(FirmwareError, match="subsystem is 3"):
        read_addon(bytes(out))


def test_duplicate_fwid_sections_are_refused():
    blob = efifw_blob("same", b"x")
    addon = build_addon([("same", b"x")], extra_sections=[(".efifw", blob)])
    with pytest.raises(FirmwareError, match="several .efifw sections with fwid 'same'"):
        read_addon(addon)


def test_trailing_garbage_after_payload_is_refused():
    with pytest.raises(FirmwareError, match="not zero padding"):
        parse_efifw(efifw_blob("a", b"x") + b"junk", 0)
    assert parse_efifw(efifw_blob("a", b"x") + bytes(7), 0).payload == b"x"


def test_longer_header_len_is_honoured():
    # systemd reserves header bytes for future attributes: fwid starts at header_len.
    fwid, payload = b"fw\0", b"firmware"
    blob = struct.pack("<IIII", EFIFW_MAGIC, 24, len(fwid), len(payload)) + bytes(8) + fwid + payload
    entry = parse_efifw(blob, 5)
    assert (entry.fwid, entry.payload, entry.section_index) == ("fw", payload, 5)


# -- .hwids -----------------------------------------------------------------------------
def _hwids(records: list[tuple[int, uuid.UUID, str | None, str | None]]) -> bytes:
    """A .hwids section as ukify's parse_hwid_dir lays it out (src/boot/chid.h)."""
    strings = sorted({s for _, _, n, f in records for s in (n, f) if s})
    base = 28 * (len(records) + 1)
    offsets, blob = {}, b""
    for s in strings:
        offsets[s] = base + len(blob)
        blob += s.encode() + b"\0"
    devs = b"".join(struct.pack("<I16sII", (t << 28) | 28, chid.bytes_le, offsets.get(n, 0), offsets.get(f, 0))
                    for t, chid, n, f in records)
    return devs + bytes(28) + blob


def test_hwids_uefi_fw_entries():
    c1, c2 = uuid.UUID("2bd4e8ae-31dc-5a5b-a1a4-2b5b54a3d0a9"), uuid.UUID("0b1b72b8-8d8c-5d49-a2a0-4e1c6d52e5a3")
    hw = _hwids([(2, c1, "Acme VM", "edk2-acme"), (1, c2, "Some board", "vendor,board")])
    addon = read_addon(build_addon([("edk2-acme", b"fw")], extra_sections=[(".hwids", hw)]))
    assert len(addon.hwids) == 1
    assert (addon.hwids[0].chid, addon.hwids[0].name, addon.hwids[0].fwid) == (c1, "Acme VM", "edk2-acme")
    assert ".hwids" in [s.name for s in addon.sections]


def test_hwids_bad_offsets_and_missing_end():
    c1 = uuid.uuid4()
    hw = bytearray(_hwids([(2, c1, "n", "f")]))
    struct.pack_into("<I", hw, 24, 10_000)  # fwid_offset past the section
    with pytest.raises(FirmwareError, match="past the section"):
        parse_hwids(bytes(hw), 3)
    with pytest.raises(FirmwareError, match="no end marker"):
        parse_hwids(_hwids([(2, c1, None, None)])[:28], 3)
    with pytest.raises(FirmwareError, match="unknown type 7"):
        parse_hwids(_hwids([(7, c1, None, None)]), 3)


def test_pefile_full_parse_has_no_structural_warnings():
    pe = pefile.PE(data=build_addon([("a", b"hello firmware" * 100), ("b", b"x")]))
    # pefile's only remark is a byte-frequency heuristic (zero padding), not a layout problem.
    assert [w for w in pe.get_warnings() if not w.startswith("Byte 0x")] == []
    assert pe.OPTIONAL_HEADER.SizeOfHeaders % pe.OPTIONAL_HEADER.FileAlignment == 0
    for sec in pe.sections:
        assert sec.PointerToRawData % pe.OPTIONAL_HEADER.FileAlignment == 0
        assert sec.VirtualAddress % pe.OPTIONAL_HEADER.SectionAlignment == 0
    rvas = [(s.VirtualAddress, s.VirtualAddress + s.Misc_VirtualSize) for s in pe.sections]
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(rvas, rvas[1:]))


def test_checksum_matches_pefile_for_odd_sizes():
    for n in (1, 2, 3, 511, 512, 513, 4095, 70000):
        addon = build_addon([("fw", bytes(range(256)) * (n // 256) + b"\xff" * (n % 256))])
        pe = pefile.PE(data=addon, fast_load=True)
        assert pe.OPTIONAL_HEADER.CheckSum == pe.generate_checksum(), n


def test_extra_section_names_are_bounded():
    with pytest.raises(FirmwareError, match="1..8 ASCII"):
        build_addon([("a", b"x")], extra_sections=[(".waytoolong", b"x")])


def test_section_with_ukify_one_byte_magic_is_refused():
    # ukify's parse_efifw_dir packs the magic with struct.pack('<p', ...): one zero byte.
    fwid, payload = b"edk2\0", b"firmware image"
    blob = struct.pack("<p", bytes.fromhex("feeddead")) + struct.pack("<III", 16, len(fwid), len(payload)) \
        + fwid + payload
    assert blob[:1] == b"\0"
    with pytest.raises(FirmwareError, match="magic is 0x[0-9a-f]{8}, expected 0xfeeddead"):
        parse_efifw(blob, 2)


def test_data_after_the_last_section_is_allowed():
    # sbsign appends the Authenticode certificate table after the sections; the add-on still reads.
    addon = build_addon([("fw", b"firmware")])
    signed_like = addon + b"\x30\x82" + bytes(1022)
    assert read_addon(signed_like).select("fw").payload == b"firmware"


def test_build_refuses_more_than_the_addon_limit():
    with pytest.raises(FirmwareError, match="add-on limit"):
        build_addon([("a", bytes(MAX_ADDON_SIZE // 2)), ("b", bytes(MAX_ADDON_SIZE // 2 + 1))])
