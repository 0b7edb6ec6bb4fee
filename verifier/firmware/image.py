"""Firmware images: recognise raw OVMF ROMs and IGVM files, and refuse what
cannot be launched as an SEV-SNP guest firmware.

The OVMF footer GUID table and the SEV metadata are parsed here with every
offset bounded, following the layout that sev-snp-measure's ovmf.py reads
(and edk2 OvmfPkg/ResetVector/X64/OvmfSevMetadata.asm,
OvmfPkg/ResetVector/Ia16/ResetVectorVtf0.asm defines). sev-snp-measure's own
parser trusts those offsets (negative slices, unbounded num_items, unknown
section types raise ValueError deep inside), so firmgate checks the image here
first and only hands sev-snp-measure what passed.
"""
from __future__ import annotations

import hashlib
import itertools
import struct
import uuid
from dataclasses import dataclass, field
from functools import cached_property

from ..errors import FirmwareError

PAGE = 4096
FOUR_GIB = 1 << 32
# 16 MiB: the ROM is mapped so that it ends at 4 GiB; anything larger would
# reach below 0xFF000000 into the IOAPIC/HPET/LAPIC windows (0xFEC00000-
# 0xFEEFFFFF) that every x86 VMM maps there. Real OVMF builds are 2-4 MiB.
MAX_FIRMWARE_SIZE = 16 * 1024 * 1024
# At most this many SEV metadata sections; edk2 declares 5-7.
MAX_SEV_SECTIONS = 64
# At most this many bytes of metadata pages in all: each page is one SHA-384
# per VM shape, so an unbounded size would let a firmware image stall the
# verifier. edk2 declares about 200 KiB.
MAX_SEV_SECTION_BYTES = 64 * 1024 * 1024

# GUIDs of the OVMF footer table (edk2 ResetVectorVtf0.asm; sev-snp-measure ovmf.py)
OVMF_TABLE_FOOTER_GUID = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
SEV_ES_RESET_BLOCK_GUID = uuid.UUID("00f771de-1a7e-4fcb-890e-68c77e2fb44e")
SEV_HASH_TABLE_RV_GUID = uuid.UUID("7255371f-3a3b-4b04-927b-1da6efa8d454")
OVMF_SEV_METADATA_GUID = uuid.UUID("dc886566-984a-4798-a75e-5585a7bf67cc")
SEV_SECRET_BLOCK_GUID = uuid.UUID("4c2eb361-7d9b-4cc3-8081-127c90d3d294")

# The footer entry sits 32 bytes before the end of the image (the reset vector
# and its padding occupy the last 32 bytes). Each entry: data, then u16 size
# (of data + these 18 bytes), then the GUID (EFI mixed-endian byte order).
_FOOTER_GAP = 32
_ENTRY_HEADER = struct.Struct("<H16s")
# OvmfSevMetadata.asm: "ASEV", u32 size, u32 version (1), u32 num_items; then items.
_SEV_HEADER = struct.Struct("<4sIII")
_SEV_ITEM = struct.Struct("<III")  # gpa, size, type

# OvmfSevMetadata.asm section types (sev-snp-measure ovmf.SectionType)
SEV_SECTION_TYPES = {
    1: "SNP_SEC_MEM",
    2: "SNP_SECRETS",
    3: "CPUID",
    4: "SVSM_CAA",
    0x10: "SNP_KERNEL_HASHES",
}
# Types that are exactly one page (the PSP fills it: secrets page, CPUID page).
_ONE_PAGE_TYPES = {2, 3}

IGVM_MAGIC = b"IGVM"  # IGVM spec: fixed header starts with magic 0x4D564749 (LE "IGVM")


@dataclass(frozen=True)
class SevSection:
    type: str      # SEV_SECTION_TYPES name
    gpa: int
    size: int
    type_id: int


@dataclass(frozen=True)
class FirmwareImage:
    kind: str                                       # "ovmf" | "igvm"
    size: int
    sev_metadata: tuple[SevSection, ...] | None     # None: no SEV metadata in the image
    footer_guids: tuple[str, ...] = ()              # GUIDs of the OVMF footer table, in file order
    sev_es_reset_eip: int | None = None             # AP reset vector (SEV_ES_RESET_BLOCK)
    sev_hash_table_gpa: int | None = None           # kernel-hashes table (SEV_HASH_TABLE_RV), 0 = none
    igvm_version: int | None = None
    payload: bytes = field(default=b"", repr=False)  # the image itself

    # Digests on first use: hashing 4 MiB costs as much as the measurement's
    # own firmware pass, and a measurement table without a cache needs neither.
    @cached_property
    def sha384(self) -> str:
        return hashlib.sha384(self.payload).hexdigest()

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.payload).hexdigest()

    @property
    def gpa(self) -> int:
        """Where the ROM is mapped: it ends at 4 GiB."""
        return FOUR_GIB - self.size

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "size": self.size,
            "sha384": self.sha384,
            "sha256": self.sha256,
            "sev_metadata": None if self.sev_metadata is None else [
                {"type": s.type, "gpa": f"{s.gpa:#x}", "size": f"{s.size:#x}"} for s in self.sev_metadata],
            "footer_guids": list(self.footer_guids),
            "sev_es_reset_eip": None if self.sev_es_reset_eip is None else f"{self.sev_es_reset_eip:#x}",
            "sev_hash_table_gpa": None if self.sev_hash_table_gpa is None else f"{self.sev_hash_table_gpa:#x}",
            "igvm_version": self.igvm_version,
        }


def parse_footer_table(data: bytes) -> dict[uuid.UUID, bytes] | None:
    """The OVMF footer GUID table as {guid: data}, or None if the image has none."""
    start = len(data) - _FOOTER_GAP - _ENTRY_HEADER.size
    if start < 0:
        return None
    size, guid = _ENTRY_HEADER.unpack_from(data, start)
    if uuid.UUID(bytes_le=guid) != OVMF_TABLE_FOOTER_GUID:
        return None
    table_len = size - _ENTRY_HEADER.size
    if table_len < 0 or table_len > start:
        raise FirmwareError(f"OVMF footer table size {size} does not fit in the image")
    table = data[start - table_len:start]
    out: dict[uuid.UUID, bytes] = {}
    end = len(table)
    while end > 0:
        if end < _ENTRY_HEADER.size:
            raise FirmwareError(f"OVMF footer table has {end} stray bytes before its first entry")
        esize, eguid = _ENTRY_HEADER.unpack_from(table, end - _ENTRY_HEADER.size)
        if esize < _ENTRY_HEADER.size or esize > end:
            raise FirmwareError(f"OVMF footer table entry of size {esize} does not fit ({end} bytes left)")
        key = uuid.UUID(bytes_le=eguid)
        if key in out:
            raise FirmwareError(f"OVMF footer table names GUID {key} twice")
        out[key] = table[end - esize:end - _ENTRY_HEADER.size]
        end -= esize
    return out


def _u32_entry(table: dict[uuid.UUID, bytes], guid: uuid.UUID, what: str) -> int | None:
    if guid not in table:
        return None
    entry = table[guid]
    if len(entry) < 4:
        raise FirmwareError(f"OVMF footer entry {what} is {len(entry)} bytes, needs 4")
    return int.from_bytes(entry[:4], "little")


def parse_sev_metadata(data: bytes, table: dict[uuid.UUID, bytes]) -> tuple[SevSection, ...] | None:
    """The SEV metadata sections, or None if the footer table has no SEV metadata entry."""
    offset_from_end = _u32_entry(table, OVMF_SEV_METADATA_GUID, "SEV metadata")
    if offset_from_end is None:
        return None
    start = len(data) - offset_from_end
    if start < 0 or start + _SEV_HEADER.size > len(data):
        raise FirmwareError(f"SEV metadata offset {offset_from_end:#x} (from the end) is outside the image")
    sig, size, version, num_items = _SEV_HEADER.unpack_from(data, start)
    if sig != b"ASEV":
        raise FirmwareError(f"SEV metadata signature is {sig!r}, expected b'ASEV'")
    if version != 1:
        raise FirmwareError(f"SEV metadata version is {version}, expected 1")
    if not 1 <= num_items <= MAX_SEV_SECTIONS:
        raise FirmwareError(f"SEV metadata declares {num_items} sections, expected 1..{MAX_SEV_SECTIONS}")
    need = _SEV_HEADER.size + num_items * _SEV_ITEM.size
    if size < need or start + size > len(data):
        raise FirmwareError(f"SEV metadata size {size} does not hold {num_items} sections or runs past the image")
    sections = []
    for i in range(num_items):
        gpa, ssize, stype = _SEV_ITEM.unpack_from(data, start + _SEV_HEADER.size + i * _SEV_ITEM.size)
        name = SEV_SECTION_TYPES.get(stype)
        if name is None:
            raise FirmwareError(f"SEV metadata section {i} has unknown type {stype:#x}")
        sections.append(SevSection(type=name, gpa=gpa, size=ssize, type_id=stype))
    return tuple(sections)


def _check_sev_sections(sections: tuple[SevSection, ...], rom_gpa: int) -> None:
    total = 0
    spans: list[tuple[int, int, int]] = []
    for i, s in enumerate(sections):
        where = f"SEV metadata section {i} ({s.type} at {s.gpa:#x}, size {s.size:#x})"
        if s.gpa % PAGE or s.size % PAGE or s.size == 0:
            raise FirmwareError(f"{where}: GPA and size must be non-zero multiples of 4 KiB")
        if s.type_id in _ONE_PAGE_TYPES and s.size != PAGE:
            raise FirmwareError(f"{where}: must be exactly one page")
        if s.gpa + s.size > rom_gpa:
            raise FirmwareError(f"{where}: overlaps the firmware ROM at {rom_gpa:#x} or runs past 4 GiB")
        total += s.size
        spans.append((s.gpa, s.gpa + s.size, i))
    if total > MAX_SEV_SECTION_BYTES:
        raise FirmwareError(f"SEV metadata sections cover {total} bytes, above the {MAX_SEV_SECTION_BYTES} limit")
    spans.sort()
    for (_a0, a1, ai), (b0, _b1, bi) in itertools.pairwise(spans):
        if b0 < a1:
            raise FirmwareError(f"SEV metadata sections {ai} and {bi} overlap at {b0:#x}")


def inspect_firmware(payload: bytes) -> FirmwareImage:
    """Recognise the image and report what it declares. Judges only layout."""
    data = bytes(payload)
    if not data:
        raise FirmwareError("firmware image is empty")
    if len(data) > MAX_FIRMWARE_SIZE:
        raise FirmwareError(f"firmware image is {len(data)} bytes, above the {MAX_FIRMWARE_SIZE}-byte maximum "
                            "(a ROM ending at 4 GiB cannot be larger without covering the APIC/HPET windows)")
    if data[:4] == IGVM_MAGIC:
        version = int.from_bytes(data[4:8], "little") if len(data) >= 8 else None
        return FirmwareImage(kind="igvm", size=len(data), sev_metadata=None,
                             igvm_version=version, payload=data)
    table = parse_footer_table(data)
    if table is None:
        return FirmwareImage(kind="ovmf", size=len(data), sev_metadata=None, payload=data)
    return FirmwareImage(
        kind="ovmf", size=len(data),
        sev_metadata=parse_sev_metadata(data, table),
        footer_guids=tuple(str(g) for g in table),
        sev_es_reset_eip=_u32_entry(table, SEV_ES_RESET_BLOCK_GUID, "SEV-ES reset block"),
        sev_hash_table_gpa=_u32_entry(table, SEV_HASH_TABLE_RV_GUID, "SEV hash table"),
        payload=data,
    )


def require_snp_firmware(payload: bytes) -> FirmwareImage:
    """inspect_firmware, then refuse anything that cannot launch as an SNP guest firmware."""
    img = inspect_firmware(payload)
    if img.kind == "igvm":
        # The whole file is read strictly and its SEV-SNP platform selected (verifier/firmware/igvm.py).
        from .igvm import parse_igvm, snp_launch
        snp_launch(parse_igvm(img.payload))
        return img
    if img.size % PAGE:
        raise FirmwareError(f"firmware size {img.size} is not a multiple of 4 KiB (SNP measures whole pages)")
    if img.sev_metadata is None:
        why = "no OVMF footer GUID table" if not img.footer_guids else "its OVMF footer table has no SEV metadata entry"
        raise FirmwareError(f"firmware has no SEV metadata ({why}): it cannot launch as an SEV-SNP guest")
    if not img.sev_es_reset_eip:
        raise FirmwareError("firmware has no SEV-ES reset block (AP reset vector) in its OVMF footer table: "
                            "its vCPUs other than the first could not start")
    _check_sev_sections(img.sev_metadata, img.gpa)
    if any(s.type == "SNP_KERNEL_HASHES" for s in img.sev_metadata):
        gpa = img.sev_hash_table_gpa
        if not gpa:
            raise FirmwareError("firmware declares an SNP_KERNEL_HASHES section but no SEV hash table GPA")
        if not any(s.type == "SNP_KERNEL_HASHES" and s.gpa <= gpa < s.gpa + s.size for s in img.sev_metadata):
            raise FirmwareError(f"SEV hash table GPA {gpa:#x} is outside the SNP_KERNEL_HASHES section")
    return img
