"""Write IGVM files (format version 1, igvm_defs/src/lib.rs): the inverse of igvm.parse_igvm.

Used by the OVMF -> IGVM converter (verifier.measure.ovmf_igvm) and by tests
that need valid and deliberately broken files. Headers are emitted in the
order they are added (platform, then initialization, then directives, as the
format demands); file data (pages, VMSAs) follows the variable headers, each
item 4 KiB-aligned, identical pages stored once.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from . import igvm as d


@dataclass
class _Header:
    type: int
    fields: list[object]
    fmt: struct.Struct
    data: bytes | None = None          # file data this header points at (file_offset patched in)
    offset_field: int | None = None    # index in fields of file_offset


@dataclass
class IgvmWriter:
    headers: list[_Header] = field(default_factory=list)
    extra: list[tuple[int, bytes]] = field(default_factory=list)  # raw (type, content) headers, for tests

    def platform(self, mask: int = 0x1, platform_type: int = d.PLATFORM_SEV_SNP, version: int = 1,
                 highest_vtl: int = 0, shared_gpa_boundary: int = 0) -> IgvmWriter:
        self.headers.append(_Header(d.VHT_SUPPORTED_PLATFORM,
                                    [mask, highest_vtl, platform_type, version, shared_gpa_boundary],
                                    d._SUPPORTED_PLATFORM))
        return self

    def guest_policy(self, policy: int = 0x30000, mask: int = 0x1) -> IgvmWriter:
        self.headers.append(_Header(d.VHT_GUEST_POLICY, [policy, mask, 0], d._GUEST_POLICY))
        return self

    def page(self, gpa: int, data: bytes | None = None, *, mask: int = 0x1, data_type: int = d.PAGE_NORMAL,
             flags: int = 0) -> IgvmWriter:
        size = d.PAGE_2M if flags & d.FLAG_2MB else d.PAGE_4K
        if data is not None and len(data) != size:
            raise ValueError(f"page data must be {size} bytes")
        self.headers.append(_Header(d.VHT_PAGE_DATA, [gpa, mask, 0, flags, data_type, 0], d._PAGE_DATA,
                                    data=data, offset_field=2))
        return self

    def pages(self, gpa: int, data: bytes, *, mask: int = 0x1) -> IgvmWriter:
        for off in range(0, len(data), d.PAGE_4K):
            self.page(gpa + off, data[off:off + d.PAGE_4K], mask=mask)
        return self

    def parameter_area(self, area_index: int, size: int) -> IgvmWriter:
        self.headers.append(_Header(d.VHT_PARAMETER_AREA, [size, area_index, 0], d._PARAMETER_AREA))
        return self

    def parameter(self, typ: int, area_index: int, byte_offset: int = 0) -> IgvmWriter:
        self.headers.append(_Header(typ, [area_index, byte_offset], d._PARAMETER))
        return self

    def parameter_insert(self, gpa: int, area_index: int, *, mask: int = 0x1) -> IgvmWriter:
        self.headers.append(_Header(d.VHT_PARAMETER_INSERT, [gpa, mask, area_index], d._PARAMETER_INSERT))
        return self

    def required_memory(self, gpa: int, size: int, *, mask: int = 0x1) -> IgvmWriter:
        self.headers.append(_Header(d.VHT_REQUIRED_MEMORY, [gpa, mask, size, 0, 0], d._REQUIRED_MEMORY))
        return self

    def vp_context(self, vmsa: bytes, vp_index: int = 0, *, gpa: int = 0xFFFFFFFFF000,
                   mask: int = 0x1) -> IgvmWriter:
        page = bytes(vmsa).ljust(d.PAGE_4K, b"\0")
        if len(page) != d.PAGE_4K:
            raise ValueError("a VMSA is at most one 4 KiB page")
        self.headers.append(_Header(d.VHT_VP_CONTEXT, [gpa, mask, 0, vp_index, 0], d._VP_CONTEXT,
                                    data=page, offset_field=2))
        return self

    def id_block(self, ld: bytes, *, mask: int = 0x1, family_id: bytes = bytes(16), image_id: bytes = bytes(16),
                 guest_svn: int = 0, id_key: tuple[int, bytes, bytes] | None = None,
                 author_key: tuple[int, bytes, bytes] | None = None) -> IgvmWriter:
        """An SNP_ID_BLOCK; keys as (curve, qx, qy) with 72-byte little-endian coordinates. Signatures
        are left zero: the PSP checks them at launch, firmgate does not."""
        def key(k: tuple[int, bytes, bytes] | None) -> bytes:
            return bytes(152) if k is None else struct.pack("<II72s72s", k[0], 0, k[1], k[2])
        self.headers.append(_Header(d.VHT_SNP_ID_BLOCK,
                                    [mask, int(author_key is not None), bytes(3), ld, family_id, image_id, 1,
                                     guest_svn, 1, 1 if author_key is not None else 0,
                                     bytes(144), key(id_key), bytes(144), key(author_key)], d._SNP_ID_BLOCK))
        return self

    def raw(self, typ: int, content: bytes) -> IgvmWriter:
        """A header with arbitrary content (tests: unknown or malformed headers)."""
        self.headers.append(_Header(typ, [content], struct.Struct(f"{len(content)}s")))
        return self

    def to_bytes(self) -> bytes:
        vh = bytearray()
        patches: list[tuple[int, bytes]] = []  # (position in vh of the file_offset u32, data)
        for h in self.headers:
            content = h.fmt.pack(*h.fields)
            start = len(vh)
            vh += d.VAR_HEADER.pack(h.type, len(content)) + content
            vh += bytes(-len(vh) % 8)
            if h.data is not None and h.offset_field is not None:
                pos = start + d.VAR_HEADER.size + struct.calcsize("<" + _prefix(h.fmt.format, h.offset_field))
                patches.append((pos, h.data))
        vh_off = d.FIXED_HEADER.size
        data_start = vh_off + len(vh)
        blob = bytearray()
        cursor = data_start + (-data_start % d.PAGE_4K)
        blob += bytes(cursor - data_start)
        seen: dict[bytes, int] = {}
        for pos, payload in patches:
            off = seen.get(payload)
            if off is None:
                off = cursor
                seen[payload] = off
                blob += payload
                cursor += len(payload)
            struct.pack_into("<I", vh, pos, off)
        total = data_start + len(blob)
        fixed = bytearray(d.FIXED_HEADER.pack(d.IGVM_MAGIC, d.FORMAT_VERSION_1, vh_off, len(vh), total, 0))
        crc = zlib.crc32(bytes(vh), zlib.crc32(bytes(fixed)))
        struct.pack_into("<I", fixed, 20, crc)
        return bytes(fixed) + bytes(vh) + bytes(blob)


def _prefix(fmt: str, n: int) -> str:
    """The struct format of the first n fields of fmt (fmt uses no repeat counts but on 's')."""
    out, count, num = "", 0, ""
    for ch in fmt.lstrip("<"):
        if count == n:
            break
        if ch.isdigit():
            num += ch
            continue
        out += num + ch
        num = ""
        count += 1
    return out


def fix_checksum(data: bytes) -> bytes:
    """`data` with its fixed header's CRC-32 recomputed, when the header's offsets fit (fuzzing, tests:
    a mutation then reaches the header parser instead of stopping at the checksum)."""
    if len(data) < d.FIXED_HEADER.size:
        return data
    _, _, vh_off, vh_size, _, _ = d.FIXED_HEADER.unpack_from(data, 0)
    if vh_off < d.FIXED_HEADER.size or vh_off + vh_size > len(data):
        return data
    fixed = bytearray(data[:d.FIXED_HEADER.size])
    fixed[20:24] = bytes(4)
    crc = zlib.crc32(data[vh_off:vh_off + vh_size], zlib.crc32(bytes(fixed)))
    return data[:20] + struct.pack("<I", crc) + data[24:]
