"""UKI firmware add-ons: read and build PE files that carry `.efifw` sections.

The add-on comes from a guest, so every length in it is hostile: each one is
checked against the bytes that hold it before anything is sliced, and every
failure is a FirmwareError that names the section and the field.

Layout of one `.efifw` section (systemd v258, src/boot/efifirmware.h and
efifirmware.c; DESIGN.md "UKI firmware add-on"), little-endian:

    u32 magic = 0xfeeddead   u32 header_len (>= 16)   u32 fwid_len   u32 payload_len
    u8 fwid[fwid_len]   (at offset header_len, NUL-terminated)
    u8 payload[payload_len]

`.hwids` (systemd src/boot/chid.h): 28-byte `Device` records {u32 descriptor
(type << 28 | size), EFI_GUID chid, u32 name_offset, u32 fwid_offset}, ended
by a zero descriptor; offsets are relative to the section and point at
NUL-terminated strings.
"""
from __future__ import annotations

import array
import hashlib
import struct
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import pefile

from ..errors import FirmwareError

EFIFW_MAGIC = 0xFEEDDEAD
EFIFW_BASE_HEADER = struct.Struct("<IIII")  # magic, header_len, fwid_len, payload_len
EFIFW_SECTION = ".efifw"
HWIDS_SECTION = ".hwids"
# A firmgate section: a publisher's signed endorsement (CoRIM in COSE_Sign1) of a firmware in
# this add-on (docs/firmware.md). The stub ignores it; a verifier checks it like any other input.
ENDORSEMENT_SECTION = ".corim"
MAX_ENDORSEMENTS = 8
MAX_ENDORSEMENT_SECTION = 64 * 1024

# Bounds (why each value):
# 64 MiB: a few firmware images of at most image.MAX_FIRMWARE_SIZE (16 MiB) plus headers.
MAX_ADDON_SIZE = 64 * 1024 * 1024
# 96: the section limit of the Windows/EDK2 PE loaders; an add-on needs a handful.
MAX_SECTIONS = 96
# 255 bytes + NUL: a fwid is a directory name in ukify (NAME_MAX on Linux is 255).
MAX_FWID_LEN = 256
# Largest header_len accepted: the base 16 bytes plus room for future attributes
# (systemd reserves them, none are defined yet).
MAX_HEADER_LEN = 4096

IMAGE_FILE_MACHINE_AMD64 = 0x8664
IMAGE_SUBSYSTEM_EFI_APPLICATION = 10
PE32_PLUS_MAGIC = 0x20B

# chid.h: DEVICE_TYPE_UEFI_FW, the size of a Device record.
DEVICE_TYPE_DEVICETREE = 0x1
DEVICE_TYPE_UEFI_FW = 0x2
DEVICE_STRUCT = struct.Struct("<I16sII")
HWID_STRING_MAX = 4096


@dataclass(frozen=True)
class EfifwEntry:
    """One `.efifw` section: the firmware id and its image."""

    fwid: str
    payload: bytes
    section_index: int

    @property
    def sha384(self) -> str:
        return hashlib.sha384(self.payload).hexdigest()

    @property
    def size(self) -> int:
        return len(self.payload)


@dataclass(frozen=True)
class HwidEntry:
    """One uefi-fw record of `.hwids`: a CHID mapped to a firmware id."""

    chid: uuid.UUID
    name: str | None
    fwid: str | None


@dataclass(frozen=True)
class SectionInfo:
    index: int
    name: str
    virtual_size: int
    raw_size: int


@dataclass(frozen=True)
class Addon:
    entries: tuple[EfifwEntry, ...]
    hwids: tuple[HwidEntry, ...]
    sections: tuple[SectionInfo, ...]
    sha384: str  # of the whole add-on file
    endorsements: tuple[bytes, ...] = ()  # contents of `.corim` sections, unchecked (verifier.endorse checks)

    @property
    def fwids(self) -> tuple[str, ...]:
        return tuple(e.fwid for e in self.entries)

    def select(self, fwid: str | None = None) -> EfifwEntry:
        """The entry with this fwid; with None, the only entry (several is an error)."""
        if fwid is None:
            if len(self.entries) == 1:
                return self.entries[0]
            raise FirmwareError(
                f"add-on holds {len(self.entries)} firmware images ({_names(self.fwids)}); choose one with --fwid")
        for entry in self.entries:
            if entry.fwid == fwid:
                return entry
        raise FirmwareError(f"add-on has no firmware with fwid {fwid!r}; it holds {_names(self.fwids)}")


def _names(fwids: Sequence[str]) -> str:
    return ", ".join(repr(f) for f in fwids) or "none"


# -- reading -----------------------------------------------------------------
def _section_name(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("ascii", errors="replace")


def _decode_fwid(raw: bytes, where: str) -> str:
    # systemd only asks for a NUL somewhere in fwid[]; we also refuse bytes after
    # the NUL and interior NULs, so one fwid has exactly one spelling.
    if not raw or raw[-1] != 0:
        raise FirmwareError(f"{where}: fwid is not NUL-terminated within fwid_len ({len(raw)})")
    text = raw[:-1]
    if not text:
        raise FirmwareError(f"{where}: fwid is empty")
    if b"\0" in text:
        raise FirmwareError(f"{where}: fwid has a NUL before its end")
    try:
        fwid = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FirmwareError(f"{where}: fwid is not UTF-8") from exc
    if not fwid.isprintable():
        raise FirmwareError(f"{where}: fwid has non-printable characters")
    return fwid


def parse_efifw(blob: bytes, section_index: int) -> EfifwEntry:
    """Parse the contents of one `.efifw` section (bounded by len(blob))."""
    where = f"section {section_index} ({EFIFW_SECTION})"
    if len(blob) < EFIFW_BASE_HEADER.size:
        raise FirmwareError(f"{where}: {len(blob)} bytes, shorter than the {EFIFW_BASE_HEADER.size}-byte header")
    magic, header_len, fwid_len, payload_len = EFIFW_BASE_HEADER.unpack_from(blob, 0)
    if magic != EFIFW_MAGIC:
        raise FirmwareError(f"{where}: magic is {magic:#010x}, expected {EFIFW_MAGIC:#010x}")
    if not EFIFW_BASE_HEADER.size <= header_len <= MAX_HEADER_LEN:
        raise FirmwareError(f"{where}: header_len {header_len} is outside {EFIFW_BASE_HEADER.size}..{MAX_HEADER_LEN}")
    if not 2 <= fwid_len <= MAX_FWID_LEN:
        raise FirmwareError(f"{where}: fwid_len {fwid_len} is outside 2..{MAX_FWID_LEN}")
    if payload_len == 0:
        raise FirmwareError(f"{where}: payload_len is 0 (no firmware image)")
    end = header_len + fwid_len + payload_len  # Python ints: no overflow
    if end > len(blob):
        raise FirmwareError(
            f"{where}: header_len {header_len} + fwid_len {fwid_len} + payload_len {payload_len} = {end} "
            f"runs past the section ({len(blob)} bytes)")
    if any(blob[end:]):
        raise FirmwareError(f"{where}: {len(blob) - end} bytes after the payload are not zero padding")
    fwid = _decode_fwid(blob[header_len:header_len + fwid_len], where)
    return EfifwEntry(fwid=fwid, payload=bytes(blob[header_len + fwid_len:end]), section_index=section_index)


def _hwid_string(blob: bytes, offset: int, where: str) -> str | None:
    if offset == 0:
        return None
    if offset >= len(blob):
        raise FirmwareError(f"{where}: string offset {offset} is past the section ({len(blob)} bytes)")
    nul = blob.find(b"\0", offset, offset + HWID_STRING_MAX)
    if nul < 0:
        raise FirmwareError(f"{where}: string at offset {offset} is not NUL-terminated within bounds")
    try:
        return blob[offset:nul].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FirmwareError(f"{where}: string at offset {offset} is not UTF-8") from exc


def parse_hwids(blob: bytes, section_index: int) -> tuple[HwidEntry, ...]:
    """The uefi-fw records of a `.hwids` section (devicetree records are skipped)."""
    where = f"section {section_index} ({HWIDS_SECTION})"
    out: list[HwidEntry] = []
    pos = 0
    while True:
        if pos + 4 > len(blob):
            raise FirmwareError(f"{where}: device list has no end marker within the section")
        (descriptor,) = struct.unpack_from("<I", blob, pos)
        if descriptor == 0:
            return tuple(out)
        dtype, dsize = descriptor >> 28, descriptor & 0x0FFFFFFF
        if dsize != DEVICE_STRUCT.size:
            raise FirmwareError(f"{where}: device record at {pos} has size {dsize}, expected {DEVICE_STRUCT.size}")
        if pos + DEVICE_STRUCT.size > len(blob):
            raise FirmwareError(f"{where}: device record at {pos} runs past the section")
        _, chid, name_off, fwid_off = DEVICE_STRUCT.unpack_from(blob, pos)
        if dtype == DEVICE_TYPE_UEFI_FW:
            out.append(HwidEntry(chid=uuid.UUID(bytes_le=chid),
                                 name=_hwid_string(blob, name_off, where),
                                 fwid=_hwid_string(blob, fwid_off, where)))
        elif dtype != DEVICE_TYPE_DEVICETREE:
            raise FirmwareError(f"{where}: device record at {pos} has unknown type {dtype}")
        pos += DEVICE_STRUCT.size


class _PE(pefile.PE):  # type: ignore[misc]
    """pefile over bytes: nothing to unmap, so skip the gc.collect() pefile runs
    on close and on every parse error (tens of ms each under load)."""

    def _close_data(self) -> None:
        pass


def _open_pe(data: bytes) -> pefile.PE:
    if len(data) < 2 or data[:2] != b"MZ":
        raise FirmwareError("add-on is not a PE file (no MZ signature)")
    # The two refusals pefile would make first, checked here because pefile's
    # error path runs gc.collect() (slow under load): e_lfanew (DOS header
    # offset 0x3C) must point at "PE\0\0" inside the file.
    if len(data) < 0x40:
        raise FirmwareError(f"add-on is not a valid PE file: {len(data)} bytes, shorter than a DOS header")
    (e_lfanew,) = struct.unpack_from("<I", data, 0x3C)
    if e_lfanew + 4 + 20 > len(data) or data[e_lfanew:e_lfanew + 4] != b"PE\0\0":
        raise FirmwareError(f"add-on is not a valid PE file: no PE signature at e_lfanew {e_lfanew:#x}")
    try:
        return _PE(data=data, fast_load=True)
    except pefile.PEFormatError as exc:
        raise FirmwareError(f"add-on is not a valid PE file: {exc.value}") from exc
    except Exception as exc:  # pefile on hostile input: any failure means "not a PE we accept"
        raise FirmwareError(f"add-on is not a valid PE file ({type(exc).__name__})") from exc


def read_addon(data: bytes) -> Addon:
    """Parse a UKI add-on; every `.efifw` section becomes an EfifwEntry."""
    if len(data) > MAX_ADDON_SIZE:
        raise FirmwareError(f"add-on is {len(data)} bytes, above the {MAX_ADDON_SIZE}-byte limit")
    data = bytes(data)
    pe = _open_pe(data)
    opt = pe.OPTIONAL_HEADER
    if pe.FILE_HEADER.Machine != IMAGE_FILE_MACHINE_AMD64:
        raise FirmwareError(f"add-on machine is {pe.FILE_HEADER.Machine:#06x}, expected x86-64 (0x8664)")
    if opt.Magic != PE32_PLUS_MAGIC:
        raise FirmwareError(f"add-on optional header magic is {opt.Magic:#06x}, expected PE32+ (0x20b)")
    if opt.Subsystem != IMAGE_SUBSYSTEM_EFI_APPLICATION:
        raise FirmwareError(f"add-on subsystem is {opt.Subsystem}, expected EFI application (10)")
    if pe.FILE_HEADER.NumberOfSections > MAX_SECTIONS:
        raise FirmwareError(f"add-on declares {pe.FILE_HEADER.NumberOfSections} sections, above {MAX_SECTIONS}")
    if len(pe.sections) != pe.FILE_HEADER.NumberOfSections:
        raise FirmwareError(
            f"add-on section table is truncated: {len(pe.sections)} of "
            f"{pe.FILE_HEADER.NumberOfSections} sections readable")
    sections: list[SectionInfo] = []
    entries: list[EfifwEntry] = []
    hwids: list[HwidEntry] = []
    endorsements: list[bytes] = []
    seen_hwids = False
    for index, sec in enumerate(pe.sections):
        name = _section_name(sec.Name)
        vsize, rsize, rptr = sec.Misc_VirtualSize, sec.SizeOfRawData, sec.PointerToRawData
        sections.append(SectionInfo(index=index, name=name, virtual_size=vsize, raw_size=rsize))
        # A loader reads SizeOfRawData bytes of every section: a file shorter than that is truncated.
        if rptr + rsize > len(data):
            raise FirmwareError(f"section {index} ({name}): raw data {rptr}+{rsize} runs past the end of "
                                f"the file ({len(data)} bytes): truncated add-on")
        if name not in (EFIFW_SECTION, HWIDS_SECTION, ENDORSEMENT_SECTION):
            continue
        # The stub sees VirtualSize bytes in memory; bytes beyond the raw data
        # would be zero-fill that is not in the file, so refuse that case.
        size = vsize or rsize
        if size > rsize:
            raise FirmwareError(f"section {index} ({name}): VirtualSize {vsize} exceeds raw size {rsize}")
        if rptr + size > len(data):
            raise FirmwareError(
                f"section {index} ({name}): raw data {rptr}+{size} runs past the end of the file ({len(data)})")
        blob = data[rptr:rptr + size]
        if name == EFIFW_SECTION:
            entries.append(parse_efifw(blob, index))
        elif name == ENDORSEMENT_SECTION:
            if len(endorsements) >= MAX_ENDORSEMENTS or len(blob) > MAX_ENDORSEMENT_SECTION:
                raise FirmwareError(f"section {index} ({name}): at most {MAX_ENDORSEMENTS} endorsements of "
                                    f"{MAX_ENDORSEMENT_SECTION} bytes each")
            endorsements.append(blob)
        else:
            if seen_hwids:
                raise FirmwareError(f"section {index}: more than one {HWIDS_SECTION} section")
            seen_hwids = True
            hwids.extend(parse_hwids(blob, index))
    if not entries:
        raise FirmwareError(f"add-on has no {EFIFW_SECTION} section (sections: {_names([s.name for s in sections])})")
    fwids = [e.fwid for e in entries]
    dupes = sorted({f for f in fwids if fwids.count(f) > 1})
    if dupes:
        raise FirmwareError(f"add-on has several {EFIFW_SECTION} sections with fwid {_names(dupes)}")
    return Addon(entries=tuple(entries), hwids=tuple(hwids), sections=tuple(sections),
                 sha384=hashlib.sha384(data).hexdigest(), endorsements=tuple(endorsements))


# -- building ----------------------------------------------------------------
FILE_ALIGNMENT = 0x200
SECTION_ALIGNMENT = 0x1000
IMAGE_BASE = 0x1_0000_0000  # any 64 KiB-aligned base; the image has no absolute addresses
# The entry point returns EFI_UNSUPPORTED: an add-on is data, never meant to run
# (systemd's addon stub does the same). mov rax, 0x8000000000000003; ret
_ENTRY_CODE = bytes.fromhex("48b80300000000000080c3")
# SBAT for add-ons, as ukify writes it when no stub is used (shim refuses an image without .sbat).
_ADDON_SBAT = (b"sbat,1,SBAT Version,sbat,1,https://github.com/rhboot/shim/blob/main/SBAT.md\n"
               b"uki-addon,1,UKI Addon,addon,1,https://www.freedesktop.org/software/systemd/man/latest/"
               b"systemd-stub.html\n")

# IMAGE_SCN_* (PE/COFF spec, "Section Flags")
_SCN_CODE = 0x00000020 | 0x20000000 | 0x40000000  # CNT_CODE | MEM_EXECUTE | MEM_READ
_SCN_DATA = 0x00000040 | 0x40000000               # CNT_INITIALIZED_DATA | MEM_READ
# IMAGE_FILE_EXECUTABLE_IMAGE | IMAGE_FILE_LARGE_ADDRESS_AWARE | IMAGE_FILE_DEBUG_STRIPPED
_FILE_CHARACTERISTICS = 0x0002 | 0x0020 | 0x0200
_DLL_NX_COMPAT = 0x0100


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def efifw_blob(fwid: str, payload: bytes) -> bytes:
    """The contents of one `.efifw` section, as ukify's parse_efifw_dir lays it out."""
    raw_fwid = fwid.encode("utf-8") + b"\0"
    where = f"fwid {fwid!r}"
    _decode_fwid(raw_fwid, where)  # same rules as the reader
    if len(raw_fwid) > MAX_FWID_LEN:
        raise FirmwareError(f"{where}: longer than {MAX_FWID_LEN - 1} bytes")
    if not payload:
        raise FirmwareError(f"{where}: firmware image is empty")
    header = EFIFW_BASE_HEADER.pack(EFIFW_MAGIC, EFIFW_BASE_HEADER.size, len(raw_fwid), len(payload))
    return header + raw_fwid + bytes(payload)


def build_addon(entries: Sequence[tuple[str, bytes]], *,
                extra_sections: Sequence[tuple[str, bytes]] = ()) -> bytes:
    """A PE32+ x86-64 EFI application holding one `.efifw` section per (fwid, payload).

    extra_sections: (name, contents) of other UKI sections to add after them
    (e.g. `.hwids`); names are at most 8 bytes, as in the section table.
    """
    if not entries:
        raise FirmwareError("an add-on needs at least one firmware image")
    fwids = [f for f, _ in entries]
    if len(set(fwids)) != len(fwids):
        raise FirmwareError(f"duplicate fwid among {_names(fwids)}")
    sections: list[tuple[bytes, bytes, int]] = [(b".text", _ENTRY_CODE, _SCN_CODE), (b".sbat", _ADDON_SBAT, _SCN_DATA)]
    sections += [(EFIFW_SECTION.encode(), efifw_blob(f, p), _SCN_DATA) for f, p in entries]
    for extra_name, content in extra_sections:
        try:
            raw_name = extra_name.encode("ascii")
        except UnicodeEncodeError:
            raw_name = b""
        if not 1 <= len(raw_name) <= 8:
            raise FirmwareError(f"section name {extra_name!r} must be 1..8 ASCII bytes")
        sections.append((raw_name, bytes(content), _SCN_DATA))
    if len(sections) > MAX_SECTIONS:
        raise FirmwareError(f"too many firmware images ({len(entries)})")
    if sum(len(c) for _, c, _ in sections) > MAX_ADDON_SIZE:
        raise FirmwareError(f"the firmware images add up to more than the {MAX_ADDON_SIZE}-byte add-on limit")

    # Headers: DOS stub header (64 bytes, e_lfanew = 0x40), "PE\0\0", COFF header
    # (20), optional header PE32+ (112 + 16 data directories * 8 = 240), section table.
    pe_offset = 0x40
    opt_size = 112 + 16 * 8
    headers_len = pe_offset + 4 + 20 + opt_size + 40 * len(sections)
    size_of_headers = _align(headers_len, FILE_ALIGNMENT)

    table = b""
    body: list[bytes] = []
    file_off = size_of_headers
    rva = _align(size_of_headers, SECTION_ALIGNMENT)
    size_code = size_init_data = 0
    for name, content, flags in sections:
        raw_size = _align(len(content), FILE_ALIGNMENT)
        table += struct.pack("<8sIIIIIIHHI", name, len(content), rva, raw_size, file_off, 0, 0, 0, 0, flags)
        body += [content, bytes(raw_size - len(content))]
        if flags & 0x20:
            size_code += raw_size
        else:
            size_init_data += raw_size
        file_off += raw_size
        rva += _align(max(len(content), 1), SECTION_ALIGNMENT)
    size_of_image = rva
    if file_off > MAX_ADDON_SIZE:
        raise FirmwareError(f"add-on would be {file_off} bytes, above the {MAX_ADDON_SIZE}-byte limit")
    text_rva = _align(size_of_headers, SECTION_ALIGNMENT)

    dos = bytearray(pe_offset)
    dos[0:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, pe_offset)
    coff = struct.pack("<HHIIIHH", IMAGE_FILE_MACHINE_AMD64, len(sections), 0, 0, 0, opt_size,
                       _FILE_CHARACTERISTICS)
    opt = struct.pack(
        "<HBBIIIIIQIIHHHHHHIIIIHHQQQQII",
        PE32_PLUS_MAGIC, 0, 0,            # Magic, linker version
        size_code, size_init_data, 0,     # SizeOfCode, SizeOfInitializedData, SizeOfUninitializedData
        text_rva, text_rva,               # AddressOfEntryPoint, BaseOfCode
        IMAGE_BASE, SECTION_ALIGNMENT, FILE_ALIGNMENT,
        0, 0, 0, 0, 0, 0,                 # OS, image, subsystem versions
        0,                                # Win32VersionValue
        size_of_image, size_of_headers,
        0,                                # CheckSum (filled in below)
        IMAGE_SUBSYSTEM_EFI_APPLICATION, _DLL_NX_COMPAT,
        0x100000, 0x1000, 0x100000, 0x1000,  # stack/heap reserve/commit (unused by EFI)
        0, 16,                            # LoaderFlags, NumberOfRvaAndSizes
    ) + bytes(16 * 8)
    assert len(opt) == opt_size  # layout invariant of this builder, not an input check
    image = bytes(dos) + b"PE\0\0" + coff + opt + table
    image += bytes(size_of_headers - len(image)) + b"".join(body)

    # PE/COFF "CheckSum": 16-bit ones'-complement sum of the file (CheckSum field
    # counted as zero, which it is here) plus the file length. Summing first and
    # folding after equals the word-by-word end-around-carry loop (pefile's
    # generate_checksum, which tests compare against), in a fraction of the time.
    words = array.array("H", image)
    if sys.byteorder == "big":
        words.byteswap()
    total = sum(words)
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    checksum = total + len(image)
    checksum_at = pe_offset + 4 + 20 + 64
    return image[:checksum_at] + struct.pack("<I", checksum) + image[checksum_at + 4:]
