"""IGVM files: a bounded, strict reader, and the SEV-SNP view of one.

Format (microsoft/igvm, igvm_defs/src/lib.rs, format version 1), little-endian:

    fixed header (24 bytes): u32 magic "IGVM", u32 format_version (1),
        u32 variable_header_offset (>= 24, 8-aligned), u32 variable_header_size,
        u32 total_file_size, u32 checksum (CRC-32 of the fixed header, with this
        field zero, then of the variable header bytes)
    variable headers: {u32 type, u32 length, u8 content[length]}, each at an
        8-aligned offset, zero padding between; types in three sections that may
        only advance: platform 0x1-0x100, initialization 0x101-0x200,
        directives 0x301-0x400. Bit 31 of the type: a loader that does not know
        the type may ignore it; without it, an unknown type makes the file
        unloadable.
    file data: pages and VP contexts that headers point at by file offset.

The file comes from a guest or a tenant, so every length, offset and count is
checked against the bytes that hold it before anything is sliced; every
failure is a FirmwareFormatError (a FirmwareError, exit 2) naming the header
(by its type name and index) and the field. Known header types must have exactly their defined length (as the
igvm crate's reader demands), reserved fields must be zero, and file data is
referenced, never copied: a 16 MiB file costs no second 16 MiB here.

What is refused although the spec allows it, and why:
- format version 2 (igvm_defs marks it unstable, "work-in-progress");
- relocatable regions and page-table relocation for the SNP platform (the
  loader would choose the GPAs, so the measurement would depend on the host;
  QEMU's loader has no handler for them either);
- `shared` page data for SNP (the spec says host-visible and unmeasured, QEMU
  measures it as a private page: the two readings disagree);
- the unmeasured flag on SECRETS/CPUID pages, and 2 MiB SECRETS/CPUID pages
  (meaningless: those page types are single PSP-filled 4 KiB pages).
"""
from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, field

from ..errors import FirmwareFormatError

IGVM_MAGIC = b"IGVM"          # IGVM_MAGIC_VALUE 0x4D564749
FORMAT_VERSION_1 = 1
FIXED_HEADER = struct.Struct("<4sIIIII")  # magic, format_version, vh_offset, vh_size, total_size, checksum
VAR_HEADER = struct.Struct("<II")         # IGVM_VHS_VARIABLE_HEADER: type, length
PAGE_4K = 4096
PAGE_2M = 2 * 1024 * 1024
IGNORABLE = 0x8000_0000      # top bit of a header type: the loader may skip it

# Bounds (why each value):
# 32 Ki headers: a 4 MiB firmware needs ~1100 (one per page), and the 64 MiB
# of MAX_MEASURED_BYTES below are 16 Ki 4 KiB pages. The bound keeps a hostile
# file's parse and measurement around a second (tests/test_igvm_props.py).
MAX_HEADERS = 32 * 1024
# 64 MiB of pages the launch would measure (page data, parameter areas; the
# same bound as OVMF's SEV metadata in image.py): each 4 KiB page is one or
# two SHA-384s, and a page without data costs the file only a 24-byte header,
# so without a bound a small file could demand minutes.
MAX_MEASURED_BYTES = 64 * 1024 * 1024
# 64 MiB parameter area: parameters are small ACPI/memory-map tables.
MAX_PARAMETER_AREA = 64 * 1024 * 1024
# GPAs below 2^52 (the x86-64 physical address width maximum).
MAX_GPA = 1 << 52
# One VP context per vCPU; KVM_MAX_VCPUS on x86-64 (as verifier.measure.launch.MAX_VCPUS).
MAX_VCPUS = 4096

# Header types (igvm_defs IgvmVariableHeaderType)
VHT_SUPPORTED_PLATFORM = 0x1
VHT_GUEST_POLICY = 0x101
VHT_RELOCATABLE_REGION = 0x102
VHT_PAGE_TABLE_RELOCATION_REGION = 0x103
VHT_PARAMETER_AREA = 0x301
VHT_PAGE_DATA = 0x302
VHT_PARAMETER_INSERT = 0x303
VHT_VP_CONTEXT = 0x304
VHT_REQUIRED_MEMORY = 0x305
VHT_RESERVED_DO_NOT_USE = 0x306
VHT_VP_COUNT_PARAMETER = 0x307
VHT_SRAT = 0x308
VHT_MADT = 0x309
VHT_MMIO_RANGES = 0x30A
VHT_SNP_ID_BLOCK = 0x30B
VHT_MEMORY_MAP = 0x30C
VHT_ERROR_RANGE = 0x30D
VHT_COMMAND_LINE = 0x30E
VHT_SLIT = 0x30F
VHT_PPTT = 0x310
VHT_VBS_MEASUREMENT = 0x311
VHT_DEVICE_TREE = 0x312
VHT_ENVIRONMENT_INFO_PARAMETER = 0x313

HEADER_NAMES = {
    VHT_SUPPORTED_PLATFORM: "SUPPORTED_PLATFORM", VHT_GUEST_POLICY: "GUEST_POLICY",
    VHT_RELOCATABLE_REGION: "RELOCATABLE_REGION", VHT_PAGE_TABLE_RELOCATION_REGION: "PAGE_TABLE_RELOCATION_REGION",
    VHT_PARAMETER_AREA: "PARAMETER_AREA", VHT_PAGE_DATA: "PAGE_DATA", VHT_PARAMETER_INSERT: "PARAMETER_INSERT",
    VHT_VP_CONTEXT: "VP_CONTEXT", VHT_REQUIRED_MEMORY: "REQUIRED_MEMORY",
    VHT_RESERVED_DO_NOT_USE: "RESERVED_DO_NOT_USE", VHT_VP_COUNT_PARAMETER: "VP_COUNT_PARAMETER",
    VHT_SRAT: "SRAT", VHT_MADT: "MADT", VHT_MMIO_RANGES: "MMIO_RANGES", VHT_SNP_ID_BLOCK: "SNP_ID_BLOCK",
    VHT_MEMORY_MAP: "MEMORY_MAP", VHT_ERROR_RANGE: "ERROR_RANGE", VHT_COMMAND_LINE: "COMMAND_LINE",
    VHT_SLIT: "SLIT", VHT_PPTT: "PPTT", VHT_VBS_MEASUREMENT: "VBS_MEASUREMENT", VHT_DEVICE_TREE: "DEVICE_TREE",
    VHT_ENVIRONMENT_INFO_PARAMETER: "ENVIRONMENT_INFO_PARAMETER",
}
# Types whose content is IGVM_VHS_PARAMETER {u32 parameter_area_index, u32 byte_offset}
PARAMETER_TYPES = frozenset({VHT_VP_COUNT_PARAMETER, VHT_SRAT, VHT_MADT, VHT_MMIO_RANGES, VHT_MEMORY_MAP,
                             VHT_COMMAND_LINE, VHT_SLIT, VHT_PPTT, VHT_DEVICE_TREE,
                             VHT_ENVIRONMENT_INFO_PARAMETER})

# Platform types (igvm_defs IgvmPlatformType)
PLATFORM_NATIVE, PLATFORM_VSM_ISOLATION, PLATFORM_SEV_SNP, PLATFORM_TDX, PLATFORM_SEV, PLATFORM_SEV_ES = range(6)
PLATFORM_NAMES = {0: "NATIVE", 1: "VSM_ISOLATION", 2: "SEV_SNP", 3: "TDX", 4: "SEV", 5: "SEV_ES"}
SEV_SNP_PLATFORM_VERSION = 1  # IGVM_SEV_SNP_PLATFORM_VERSION

# Page data types and flags (IgvmPageDataType, IgvmPageDataFlags)
PAGE_NORMAL, PAGE_SECRETS, PAGE_CPUID_DATA, PAGE_CPUID_XF = 0, 1, 2, 3
PAGE_TYPE_NAMES = {0: "NORMAL", 1: "SECRETS", 2: "CPUID_DATA", 3: "CPUID_XF"}
FLAG_2MB, FLAG_UNMEASURED, FLAG_SHARED = 0x1, 0x2, 0x4
_KNOWN_PAGE_FLAGS = FLAG_2MB | FLAG_UNMEASURED | FLAG_SHARED

# Structure layouts (igvm_defs, repr(C); sizes are the exact lengths required)
_SUPPORTED_PLATFORM = struct.Struct("<IBBHQ")   # mask, highest_vtl, platform_type, platform_version, shared_gpa_boundary
_GUEST_POLICY = struct.Struct("<QII")           # policy, mask, reserved
_RELOCATABLE_REGION = struct.Struct("<IHBBQQQQQ")
_PAGE_TABLE_RELOCATION = struct.Struct("<IHBBQQQ")
_PARAMETER_AREA = struct.Struct("<QII")         # number_of_bytes, parameter_area_index, file_offset
_PAGE_DATA = struct.Struct("<QIIIHH")           # gpa, mask, file_offset, flags, data_type, reserved
_PARAMETER_INSERT = struct.Struct("<QII")       # gpa, mask, parameter_area_index
_VP_CONTEXT = struct.Struct("<QIIHH")           # gpa, mask, file_offset, vp_index, reserved
_REQUIRED_MEMORY = struct.Struct("<QIIII")      # gpa, mask, number_of_bytes, flags, reserved
_PARAMETER = struct.Struct("<II")               # parameter_area_index, byte_offset
_ERROR_RANGE = struct.Struct("<QII")            # gpa, mask, size_bytes
# SNP_ID_BLOCK: mask, author_key_enabled, reserved[3], ld[48], family_id[16], image_id[16], version,
# guest_svn, id_key_algorithm, author_key_algorithm, id sig (r 72, s 72), id key (curve, reserved, qx 72,
# qy 72), author sig, author key
_SNP_ID_BLOCK = struct.Struct("<IB3s48s16s16sIIII144s152s144s152s")
_ID_KEY_OFFSET = struct.calcsize("<IB3s48s16s16sIIII144s")
_AUTHOR_KEY_OFFSET = struct.calcsize("<IB3s48s16s16sIIII144s152s144s")
_VBS_MEASUREMENT_SIZE = 4 * 8 + 64 + 256 + 512
_HEADER_SIZES = {
    VHT_SUPPORTED_PLATFORM: _SUPPORTED_PLATFORM.size, VHT_GUEST_POLICY: _GUEST_POLICY.size,
    VHT_RELOCATABLE_REGION: _RELOCATABLE_REGION.size, VHT_PAGE_TABLE_RELOCATION_REGION: _PAGE_TABLE_RELOCATION.size,
    VHT_PARAMETER_AREA: _PARAMETER_AREA.size, VHT_PAGE_DATA: _PAGE_DATA.size,
    VHT_PARAMETER_INSERT: _PARAMETER_INSERT.size, VHT_VP_CONTEXT: _VP_CONTEXT.size,
    VHT_REQUIRED_MEMORY: _REQUIRED_MEMORY.size, VHT_SNP_ID_BLOCK: _SNP_ID_BLOCK.size,
    VHT_ERROR_RANGE: _ERROR_RANGE.size, VHT_VBS_MEASUREMENT: _VBS_MEASUREMENT_SIZE,
    **{t: _PARAMETER.size for t in PARAMETER_TYPES},
}


def header_name(typ: int) -> str:
    return HEADER_NAMES.get(typ & ~IGNORABLE, f"{typ:#x}")


@dataclass(frozen=True)
class Platform:
    mask: int
    highest_vtl: int
    platform_type: int
    platform_version: int
    shared_gpa_boundary: int

    @property
    def name(self) -> str:
        return PLATFORM_NAMES.get(self.platform_type, f"{self.platform_type:#x}")


@dataclass(frozen=True)
class GuestPolicy:
    index: int
    policy: int
    mask: int


@dataclass(frozen=True)
class Relocation:
    index: int
    type: int
    mask: int


@dataclass(frozen=True, slots=True)
class PageData:
    """One PAGE_DATA directive (a firmware has one per page)."""

    index: int          # position among the directive headers (QEMU's current_header_index)
    gpa: int
    mask: int
    file_offset: int    # 0: no data (a page of zeros)
    flags: int
    data_type: int
    page_size: int      # 4 KiB, or 2 MiB with FLAG_2MB

    @property
    def has_data(self) -> bool:
        return self.file_offset != 0


@dataclass(frozen=True)
class ParameterArea:
    index: int
    area_index: int
    size: int
    file_offset: int


@dataclass(frozen=True)
class ParameterInsert:
    index: int
    gpa: int
    mask: int
    area_index: int


@dataclass(frozen=True)
class Parameter:
    index: int
    type: int
    area_index: int
    byte_offset: int


@dataclass(frozen=True)
class VpContext:
    index: int
    gpa: int
    mask: int
    file_offset: int    # the 4 KiB VMSA page (SNP)
    vp_index: int


@dataclass(frozen=True)
class RequiredMemory:
    index: int
    gpa: int
    mask: int
    size: int
    flags: int


@dataclass(frozen=True)
class SnpIdBlock:
    index: int
    mask: int
    author_key_enabled: int
    ld: bytes
    family_id: bytes
    image_id: bytes
    version: int
    guest_svn: int
    id_key_algorithm: int
    author_key_algorithm: int
    raw: bytes = field(repr=False)  # the whole IGVM_VHS_SNP_ID_BLOCK

    def _key_struct(self, offset: int) -> bytes:
        """The SNP ABI public-key structure (0x404 bytes: curve, qx, qy, zeros) QEMU builds from the
        IGVM key {curve, reserved, qx, qy} (backends/igvm.c qigvm_directive_snp_id_block)."""
        curve = self.raw[offset:offset + 4]
        return (curve + self.raw[offset + 8:offset + 8 + 144]).ljust(0x404, b"\0")

    @property
    def id_key_digest(self) -> bytes:
        """ID_KEY_DIGEST the report will carry: SHA-384 of the ID key structure (SNP ABI, Table 8)."""
        return hashlib.sha384(self._key_struct(_ID_KEY_OFFSET)).digest()

    @property
    def author_key_digest(self) -> bytes | None:
        """AUTHOR_KEY_DIGEST, when author_key_enabled (else the report carries zeros)."""
        return hashlib.sha384(self._key_struct(_AUTHOR_KEY_OFFSET)).digest() if self.author_key_enabled else None


@dataclass(frozen=True)
class OtherDirective:
    """A directive the SNP launch digest does not depend on (error range, VBS measurement, ignorable)."""

    index: int
    type: int
    mask: int | None


Directive = (PageData | ParameterArea | ParameterInsert | Parameter | VpContext | RequiredMemory | SnpIdBlock
             | OtherDirective)


@dataclass(frozen=True)
class IgvmFile:
    data: bytes = field(repr=False)
    format_version: int
    platforms: tuple[Platform, ...]
    policies: tuple[GuestPolicy, ...]
    relocations: tuple[Relocation, ...]
    directives: tuple[Directive, ...]
    ignored_types: tuple[int, ...]     # ignorable headers this reader does not know

    def platform(self, platform_type: int) -> Platform | None:
        return next((p for p in self.platforms if p.platform_type == platform_type), None)

    def page(self, offset: int, size: int = PAGE_4K) -> bytes:
        """File data at a checked offset (the parser bounded every offset it kept)."""
        return self.data[offset:offset + size]


Where = str | tuple[int, int, int]   # a text, or (header type, header number, file offset): formatted on failure


def _fail(where: Where, why: str) -> FirmwareFormatError:
    if isinstance(where, tuple):
        typ, num, pos = where
        where = f"header {header_name(typ)} #{num} at {pos:#x}"
    return FirmwareFormatError(f"IGVM {where}: {why}")


def _aligned(value: int, to: int) -> bool:
    return value % to == 0


def _check_gpa(where: Where, gpa: int, size: int, align: int = PAGE_4K) -> None:
    if not _aligned(gpa, align):
        raise _fail(where, f"gpa {gpa:#x} is not {align:#x}-aligned")
    if size <= 0 or not _aligned(size, PAGE_4K):
        raise _fail(where, f"size {size:#x} is not a non-zero multiple of 4 KiB")
    if gpa + size > MAX_GPA:
        raise _fail(where, f"range {gpa:#x}+{size:#x} runs past the 52-bit physical address space")


def _check_data(where: Where, data_len: int, data_start: int, offset: int, size: int) -> None:
    if offset < data_start or offset + size > data_len:
        raise _fail(where, f"file_offset {offset:#x} (+{size:#x}) is outside the file data "
                           f"({data_start:#x}..{data_len:#x})")


def parse_igvm(payload: bytes) -> IgvmFile:
    """Parse and check an IGVM file; FirmwareFormatError (naming header and field) on anything that does not fit."""
    data = bytes(payload)
    if len(data) < FIXED_HEADER.size:
        raise _fail("fixed header", f"file is {len(data)} bytes, the fixed header alone is {FIXED_HEADER.size}")
    magic, version, vh_off, vh_size, total, checksum = FIXED_HEADER.unpack_from(data, 0)
    if magic != IGVM_MAGIC:
        raise _fail("fixed header", f"magic is {magic!r}, expected b'IGVM'")
    if version != FORMAT_VERSION_1:
        why = "unstable (igvm_defs marks version 2 work-in-progress)" if version == 2 else "unknown"
        raise _fail("fixed header", f"format_version {version} is {why}; firmgate reads version 1")
    if total != len(data):
        raise _fail("fixed header", f"total_file_size {total} but the file is {len(data)} bytes")
    if vh_off < FIXED_HEADER.size or not _aligned(vh_off, 8):
        raise _fail("fixed header", f"variable_header_offset {vh_off} must be >= {FIXED_HEADER.size} and 8-aligned")
    if vh_size == 0 or vh_off + vh_size > len(data):
        raise _fail("fixed header", f"variable header ({vh_off}+{vh_size}) is empty or runs past the file")
    fixed = bytearray(data[:FIXED_HEADER.size])
    fixed[20:24] = bytes(4)
    expected = zlib.crc32(data[vh_off:vh_off + vh_size], zlib.crc32(bytes(fixed)))
    if expected != checksum:
        raise _fail("fixed header", f"checksum {checksum:#010x} does not match the headers' CRC-32 {expected:#010x}")
    return _parse_variable_headers(data, version, vh_off, vh_off + vh_size)


def _parse_variable_headers(data: bytes, version: int, start: int, end: int) -> IgvmFile:
    data_start = end  # file data follows the variable headers
    platforms: list[Platform] = []
    policies: list[GuestPolicy] = []
    relocations: list[Relocation] = []
    directives: list[Directive] = []
    ignored: list[int] = []
    areas: dict[int, ParameterArea] = {}
    section = 0       # 0 platform, 1 initialization, 2 directives
    pos, count = start, 0
    while pos < end:
        count += 1
        if count > MAX_HEADERS:
            raise _fail("variable header", f"more than {MAX_HEADERS} headers")
        if pos + VAR_HEADER.size > end:
            raise _fail("variable header", f"{end - pos} stray bytes at offset {pos:#x}")
        typ, length = VAR_HEADER.unpack_from(data, pos)
        body = pos + VAR_HEADER.size
        if length > end - body:
            raise _fail((typ, count - 1, pos), f"length {length} runs past the variable header")
        nxt = min(body + ((length + 7) & ~7), end)
        if any(data[body + length:nxt]):
            raise _fail((typ, count - 1, pos), "alignment padding is not zero")
        base = typ & ~IGNORABLE
        where = (typ, count - 1, pos)
        sec = 0 if 0x1 <= base <= 0x100 else 1 if 0x101 <= base <= 0x200 else 2 if 0x301 <= base <= 0x400 else -1
        if sec < 0 or (base not in _HEADER_SIZES and base not in (VHT_RESERVED_DO_NOT_USE,)):
            if typ & IGNORABLE:
                ignored.append(typ)
                pos = nxt
                continue
            raise _fail(where, f"unknown header type {typ:#x} without the ignorable bit: the file cannot be loaded")
        if sec < section:
            raise _fail(where, "platform/initialization/directive headers are out of order")
        section = sec
        if base == VHT_RESERVED_DO_NOT_USE:
            raise _fail(where, "type 0x306 is reserved (formerly SHARED_BOUNDARY_GPA) and must not be used")
        if length != _HEADER_SIZES[base]:
            raise _fail(where, f"length {length}, the structure is {_HEADER_SIZES[base]} bytes")
        body_bytes = data[body:body + length]
        idx = len(directives)
        if base == VHT_SUPPORTED_PLATFORM:
            mask, vtl, ptype, pver, boundary = _SUPPORTED_PLATFORM.unpack(body_bytes)
            if mask == 0 or mask & (mask - 1):
                raise _fail(where, f"compatibility_mask {mask:#x} must have exactly one bit set")
            if any(p.mask == mask for p in platforms):
                raise _fail(where, f"compatibility_mask {mask:#x} is used by two platforms")
            if any(p.platform_type == ptype for p in platforms):
                raise _fail(where, f"platform {PLATFORM_NAMES.get(ptype, ptype)} is declared twice")
            platforms.append(Platform(mask, vtl, ptype, pver, boundary))
        elif base == VHT_GUEST_POLICY:
            policy, mask, reserved = _GUEST_POLICY.unpack(body_bytes)
            if reserved:
                raise _fail(where, "reserved field is not zero")
            policies.append(GuestPolicy(count - 1, policy, mask))
        elif base in (VHT_RELOCATABLE_REGION, VHT_PAGE_TABLE_RELOCATION_REGION):
            relocations.append(Relocation(count - 1, base, int.from_bytes(body_bytes[:4], "little")))
        elif base == VHT_PAGE_DATA:
            gpa, mask, off, flags, dtype, reserved = _PAGE_DATA.unpack(body_bytes)
            if reserved or flags & ~_KNOWN_PAGE_FLAGS:
                raise _fail(where, f"reserved bits set (flags {flags:#x}, reserved {reserved:#x})")
            if dtype not in PAGE_TYPE_NAMES:
                raise _fail(where, f"unknown data_type {dtype:#x}")
            size = PAGE_2M if flags & FLAG_2MB else PAGE_4K
            if gpa % size or gpa + size > MAX_GPA:
                _check_gpa(where, gpa, size, size)  # raises, naming the field
            if off and (off < data_start or off + size > len(data)):
                _check_data(where, len(data), data_start, off, size)
            directives.append(PageData(idx, gpa, mask, off, flags, dtype, size))
        elif base == VHT_PARAMETER_AREA:
            size, area_index, off = _PARAMETER_AREA.unpack(body_bytes)
            if size == 0 or not _aligned(size, PAGE_4K) or size > MAX_PARAMETER_AREA:
                raise _fail(where, f"number_of_bytes {size:#x} must be a non-zero multiple of 4 KiB "
                                   f"up to {MAX_PARAMETER_AREA:#x}")
            if area_index in areas:
                raise _fail(where, f"parameter_area_index {area_index} is declared twice")
            if off:
                _check_data(where, len(data), data_start, off, size)
            areas[area_index] = ParameterArea(idx, area_index, size, off)
            directives.append(areas[area_index])
        elif base == VHT_PARAMETER_INSERT:
            gpa, mask, area_index = _PARAMETER_INSERT.unpack(body_bytes)
            if area_index not in areas:
                raise _fail(where, f"parameter_area_index {area_index} was not declared before")
            _check_gpa(where, gpa, areas[area_index].size)
            directives.append(ParameterInsert(idx, gpa, mask, area_index))
        elif base in PARAMETER_TYPES:
            area_index, byte_offset = _PARAMETER.unpack(body_bytes)
            if area_index not in areas:
                raise _fail(where, f"parameter_area_index {area_index} was not declared before")
            if byte_offset >= areas[area_index].size:
                raise _fail(where, f"byte_offset {byte_offset:#x} is outside parameter area {area_index}")
            directives.append(Parameter(idx, base, area_index, byte_offset))
        elif base == VHT_VP_CONTEXT:
            gpa, mask, off, vp_index, reserved = _VP_CONTEXT.unpack(body_bytes)
            if reserved:
                raise _fail(where, "reserved field is not zero")
            _check_gpa(where, gpa, PAGE_4K)
            _check_data(where, len(data), data_start, off, PAGE_4K)
            directives.append(VpContext(idx, gpa, mask, off, vp_index))
        elif base == VHT_REQUIRED_MEMORY:
            gpa, mask, size, flags, reserved = _REQUIRED_MEMORY.unpack(body_bytes)
            if reserved or flags & ~0x1:
                raise _fail(where, "reserved bits set")
            _check_gpa(where, gpa, size)
            directives.append(RequiredMemory(idx, gpa, mask, size, flags))
        elif base == VHT_SNP_ID_BLOCK:
            (mask, ake, reserved, ld, family, image, ver, svn, id_alg, author_alg,
             _s1, _k1, _s2, _k2) = _SNP_ID_BLOCK.unpack(body_bytes)
            if any(reserved) or ake not in (0, 1):
                raise _fail(where, f"author_key_enabled {ake} must be 0 or 1 and reserved bytes zero")
            directives.append(SnpIdBlock(idx, mask, ake, ld, family, image, ver, svn, id_alg, author_alg,
                                         raw=body_bytes))
        elif base == VHT_ERROR_RANGE:
            gpa, mask, size = _ERROR_RANGE.unpack(body_bytes)
            _check_gpa(where, gpa, size)
            directives.append(OtherDirective(idx, base, mask))
        else:  # VBS measurement: a Hyper-V VBS structure, nothing for SNP
            directives.append(OtherDirective(idx, base, int.from_bytes(body_bytes[:4], "little")))
        pos = nxt
    if not platforms:
        raise _fail("platform headers", "the file declares no SUPPORTED_PLATFORM")
    return IgvmFile(data=data, format_version=version, platforms=tuple(platforms), policies=tuple(policies),
                    relocations=tuple(relocations), directives=tuple(directives), ignored_types=tuple(ignored))


# -- the SEV-SNP view ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SnpLaunch:
    """What an SEV-SNP launch of this file uses: the directives its compatibility mask selects."""

    file: IgvmFile
    platform: Platform
    policy: int
    directives: tuple[Directive, ...]   # selected by the SNP mask (parameter areas carry no mask: all kept)
    vp_contexts: tuple[VpContext, ...]  # sorted by vp_index
    id_block: SnpIdBlock | None

    @property
    def mask(self) -> int:
        return self.platform.mask

    @property
    def vcpus(self) -> int:
        return len(self.vp_contexts)


def _selected(d: Directive, mask: int) -> bool:
    m = getattr(d, "mask", None)
    return m is None or bool(m & mask)


def snp_launch(f: IgvmFile) -> SnpLaunch:
    """Select the SEV-SNP platform by its compatibility mask and check what an SNP launch needs."""
    platform = f.platform(PLATFORM_SEV_SNP)
    if platform is None:
        have = ", ".join(p.name for p in f.platforms)
        raise _fail("platform headers", f"no SEV_SNP platform (the file supports {have})")
    if platform.platform_version != SEV_SNP_PLATFORM_VERSION:
        raise _fail("SEV_SNP platform", f"platform_version {platform.platform_version}, "
                                        f"expected {SEV_SNP_PLATFORM_VERSION}")
    mask = platform.mask
    for r in f.relocations:
        if r.mask & mask:
            raise _fail(f"header {header_name(r.type)} #{r.index}",
                        "relocation applies to SEV_SNP: the host would choose the GPAs, so the launch "
                        "measurement could not be predicted (QEMU's IGVM loader refuses it too)")
    policies = [p for p in f.policies if p.mask & mask]
    if len(policies) != 1:
        raise _fail("SEV_SNP platform", f"{len(policies)} GUEST_POLICY headers select it; expected exactly one")
    selected = tuple(d for d in f.directives if _selected(d, mask))
    if not any(getattr(d, "mask", None) is not None for d in selected):
        raise _fail("SEV_SNP platform", f"compatibility mask {mask:#x} selects no directive: nothing would be "
                                        "loaded for an SEV-SNP launch")
    vps: dict[int, VpContext] = {}
    id_block: SnpIdBlock | None = None
    for d in selected:
        where = f"header {header_name(_type_of(d))} #{d.index} (directive)"
        if isinstance(d, PageData):
            if d.flags & FLAG_SHARED:
                raise _fail(where, "shared page data: the spec leaves it unmeasured, QEMU measures it as "
                                   "private; refused as ambiguous")
            if d.data_type != PAGE_NORMAL and d.flags & (FLAG_UNMEASURED | FLAG_2MB):
                raise _fail(where, f"{PAGE_TYPE_NAMES[d.data_type]} page must be one measured 4 KiB page")
        elif isinstance(d, VpContext):
            if d.vp_index in vps:
                raise _fail(where, f"two VP contexts for vp_index {d.vp_index}")
            vps[d.vp_index] = d
        elif isinstance(d, SnpIdBlock):
            if id_block is not None:
                raise _fail(where, "a second SNP_ID_BLOCK (QEMU refuses multiple ID blocks)")
            id_block = d
    if not vps:
        raise _fail("SEV_SNP platform", "no VP_CONTEXT: the boot vCPU would have no VMSA")
    if len(vps) > MAX_VCPUS:
        raise _fail("SEV_SNP platform", f"{len(vps)} VP contexts, above KVM's {MAX_VCPUS} vCPUs")
    if sorted(vps) != list(range(len(vps))):
        raise _fail("SEV_SNP platform", f"VP contexts for vp_index {sorted(vps)}: expected 0..{len(vps) - 1}, "
                                        "one per vCPU")
    return SnpLaunch(file=f, platform=platform, policy=policies[0].policy, directives=selected,
                     vp_contexts=tuple(vps[i] for i in range(len(vps))), id_block=id_block)


def _type_of(d: Directive) -> int:
    if isinstance(d, (Parameter, OtherDirective)):
        return d.type
    return {PageData: VHT_PAGE_DATA, ParameterArea: VHT_PARAMETER_AREA, ParameterInsert: VHT_PARAMETER_INSERT,
            VpContext: VHT_VP_CONTEXT, RequiredMemory: VHT_REQUIRED_MEMORY, SnpIdBlock: VHT_SNP_ID_BLOCK}[type(d)]
