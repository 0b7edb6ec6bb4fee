"""Firmware recognition and SNP checks on the real OVMF builds in ../shared/firmware."""
from __future__ import annotations

import hashlib
import struct
import uuid

import pytest

from verifier.errors import FirmwareError
from verifier.firmware.image import (MAX_FIRMWARE_SIZE, OVMF_SEV_METADATA_GUID, inspect_firmware,
                                     parse_footer_table, require_snp_firmware)

NO_SEV = "edk2-2022.11-OVMF_CODE_4M-no-sev-metadata.fd"
# From ../shared/firmware/README.md: sizes, sha256 and the SEV metadata items per image.
REAL = {
    "edk2-2022.11-OVMF.fd": (2 << 20, "7b456907dd0786d415999e801a1ac4637b8ed4d7cf5378cfc6edbe5e574dd773",
                             ["SNP_SEC_MEM", "SNP_SEC_MEM", "SNP_SECRETS", "CPUID", "SNP_SEC_MEM"]),
    "edk2-2025.02-OVMF.fd": (4 << 20, "14954040cc754ade0c625ac3470ea46d4c14318b5b1396de4ef77090203d76db",
                             ["SNP_SEC_MEM", "SNP_SEC_MEM", "SNP_SECRETS", "CPUID", "SVSM_CAA", "SNP_SEC_MEM"]),
    "edk2-2026.08-OVMF.amdsev.fd": (4 << 20, "3e4fd0b3fe3b2dbe481c3d9e99418a034174f26cbe1f55aa212b0f18c12d2d6f",
                                    ["SNP_SEC_MEM", "SNP_SEC_MEM", "SNP_SECRETS", "CPUID", "SVSM_CAA",
                                     "SNP_SEC_MEM", "SNP_KERNEL_HASHES"]),
}


@pytest.fixture(scope="module")
def images(firmware_dir):
    return {name: (firmware_dir / name).read_bytes() for name in [*REAL, NO_SEV]}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_images_pass(images, name):
    size, sha256, types = REAL[name]
    img = require_snp_firmware(images[name])
    assert img.kind == "ovmf"
    assert img.size == size
    assert img.sha256 == sha256
    assert img.sha384 == hashlib.sha384(images[name]).hexdigest()
    assert [s.type for s in img.sev_metadata] == types
    assert img.gpa == (1 << 32) - size
    assert img.sev_es_reset_eip == 0x80B004
    assert str(OVMF_SEV_METADATA_GUID) in img.footer_guids


def test_kernel_hashes_table_gpa(images):
    # README: "adds SNP_KERNEL_HASHES (hashes table at GPA 0x810c00)"
    img = inspect_firmware(images["edk2-2026.08-OVMF.amdsev.fd"])
    assert img.sev_hash_table_gpa == 0x810C00
    section = [s for s in img.sev_metadata if s.type == "SNP_KERNEL_HASHES"][0]
    assert (section.gpa, section.size) == (0x810000, 0x1000)


def test_no_sev_metadata_image_is_refused_by_name(images):
    data = images[NO_SEV]
    img = inspect_firmware(data)
    assert img.kind == "ovmf" and img.sev_metadata is None
    assert img.footer_guids  # it has a footer table, just no SEV metadata entry
    with pytest.raises(FirmwareError, match="no SEV metadata.*cannot launch as an SEV-SNP guest"):
        require_snp_firmware(data)


def test_size_not_multiple_of_4k(images):
    data = images["edk2-2022.11-OVMF.fd"]
    # Prepending keeps the footer (it is found from the end) so only the size is wrong.
    with pytest.raises(FirmwareError, match="not a multiple of 4 KiB"):
        require_snp_firmware(b"\xff" * 512 + data)


def test_too_large_and_empty():
    with pytest.raises(FirmwareError, match="above the 16777216-byte maximum"):
        inspect_firmware(bytes(MAX_FIRMWARE_SIZE + 4096))
    with pytest.raises(FirmwareError, match="empty"):
        inspect_firmware(b"")


def test_igvm_is_recognised_and_read_strictly():
    igvm = b"IGVM" + struct.pack("<I", 1) + bytes(4096 - 8)
    img = inspect_firmware(igvm)
    assert (img.kind, img.igvm_version, img.sev_metadata) == ("igvm", 1, None)
    with pytest.raises(FirmwareError, match="IGVM fixed header: total_file_size 0 but the file is 4096 bytes"):
        require_snp_firmware(igvm)


def test_no_footer_table():
    with pytest.raises(FirmwareError, match="no OVMF footer GUID table"):
        require_snp_firmware(bytes(64 * 1024))
    assert parse_footer_table(b"short") is None


# -- corrupted footer table / SEV metadata -------------------------------------------------
def _sev_metadata_start(data: bytes) -> int:
    table = parse_footer_table(data)
    return len(data) - int.from_bytes(table[OVMF_SEV_METADATA_GUID][:4], "little")


def _patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def test_footer_table_size_too_large(images):
    data = images["edk2-2025.02-OVMF.fd"]
    footer = len(data) - 32 - 18
    with pytest.raises(FirmwareError, match="does not fit"):
        inspect_firmware(_patched(data, footer, "<H", 0xFFFF))


def test_footer_entry_size_too_small(images):
    data = images["edk2-2025.02-OVMF.fd"]
    last_entry = len(data) - 32 - 18 - 18  # header of the entry just before the footer entry
    with pytest.raises(FirmwareError, match="footer table"):
        inspect_firmware(_patched(data, last_entry, "<H", 3))


@pytest.mark.parametrize("field,offset,value,match", [
    ("signature", 0, 0x41414141, "signature"),
    ("version", 8, 2, "version is 2"),
    ("num_items", 12, 0, "declares 0 sections"),
    ("num_items", 12, 0xFFFFFFFF, "declares 4294967295"),
    ("size", 4, 4, "does not hold"),
])
def test_bad_sev_metadata_header(images, field, offset, value, match):
    data = images["edk2-2025.02-OVMF.fd"]
    start = _sev_metadata_start(data)
    with pytest.raises(FirmwareError, match=match):
        require_snp_firmware(_patched(data, start + offset, "<I", value))


@pytest.mark.parametrize("item_field,value,match", [
    (0, 0x800001, "multiples of 4 KiB"),             # gpa not page aligned
    (4, 0, "multiples of 4 KiB"),                    # size 0
    (4, 0xFFFFF000, "overlaps the firmware ROM"),    # huge size
    (8, 0x77, "unknown type 0x77"),
])
def test_bad_sev_metadata_items(images, item_field, value, match):
    data = images["edk2-2025.02-OVMF.fd"]
    first_item = _sev_metadata_start(data) + 16
    with pytest.raises(FirmwareError, match=match):
        require_snp_firmware(_patched(data, first_item + item_field, "<I", value))


def test_overlapping_sections_are_refused(images):
    data = images["edk2-2025.02-OVMF.fd"]
    second_item = _sev_metadata_start(data) + 16 + 12
    with pytest.raises(FirmwareError, match="overlap"):
        require_snp_firmware(_patched(data, second_item, "<I", 0x801000))  # inside the first SEC_MEM range


def test_metadata_offset_outside_image(images):
    data = images["edk2-2025.02-OVMF.fd"]
    table = parse_footer_table(data)
    entry = table[OVMF_SEV_METADATA_GUID]
    at = data.rindex(entry + struct.pack("<H", len(entry) + 18) + OVMF_SEV_METADATA_GUID.bytes_le)
    with pytest.raises(FirmwareError, match="outside the image"):
        inspect_firmware(_patched(data, at, "<I", len(data) + 1))


def test_duplicate_guid_in_footer_table():
    guid = uuid.UUID("00f771de-1a7e-4fcb-890e-68c77e2fb44e").bytes_le
    entry = struct.pack("<I", 0x1234) + struct.pack("<H", 4 + 18) + guid
    footer_guid = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d").bytes_le
    table = entry + entry
    tail = table + struct.pack("<H", len(table) + 18) + footer_guid + bytes(32)
    data = bytes(8192 - len(tail)) + tail
    with pytest.raises(FirmwareError, match="twice"):
        inspect_firmware(data)


def test_to_dict_is_json_and_digests_are_lazy(images):
    import json
    data = images["edk2-2022.11-OVMF.fd"]
    img = inspect_firmware(data)
    assert "sha384" not in img.__dict__  # not computed until asked
    doc = json.loads(json.dumps(img.to_dict()))
    assert doc["sha256"] == REAL["edk2-2022.11-OVMF.fd"][1]
    assert doc["sev_metadata"][0] == {"type": "SNP_SEC_MEM", "gpa": "0x800000", "size": "0x9000"}
    assert doc["sev_es_reset_eip"] == "0x80b004"
    assert "payload" not in doc and "payload" not in repr(img)


def test_sections_past_4gib_or_into_the_rom_are_refused(images):
    data = images["edk2-2025.02-OVMF.fd"]
    first_item = _sev_metadata_start(data) + 16
    with pytest.raises(FirmwareError, match="overlaps the firmware ROM"):
        require_snp_firmware(_patched(data, first_item, "<I", (1 << 32) - 0x2000))


def test_secrets_page_must_be_one_page(images):
    data = images["edk2-2022.11-OVMF.fd"]
    secrets_item = _sev_metadata_start(data) + 16 + 2 * 12  # third item: SNP_SECRETS
    with pytest.raises(FirmwareError, match="exactly one page"):
        require_snp_firmware(_patched(data, secrets_item + 4, "<I", 0x2000))
