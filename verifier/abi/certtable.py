"""The extended-report certificate table (SNP_GET_EXT_REPORT / configfs-tsm auxblob).

SNP ABI spec 56860, section "SNP_GET_EXT_REPORT" / GHCB spec 56421 section 4.1.8.1:
an array of 24-byte entries {16-byte GUID, u32 offset, u32 length}, ended by an
all-zero entry; offsets are from the start of the table. GUID bytes are in RFC 4122
(big-endian) order. Entries may hold DER or PEM.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from ..errors import CertificateFormatError

ENTRY_SIZE = 24
MAX_TABLE_SIZE = 64 * 1024     # the kernel caps the blob at 16 pages
MAX_ENTRIES = 16

GUID_ARK = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
GUID_ASK = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")   # ASK or ASVK
GUID_VCEK = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
GUID_VLEK = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
GUID_CRL = uuid.UUID("92f81bc3-5811-4d3d-97ff-d19f88dc67ea")

NAMES = {GUID_ARK: "ARK", GUID_ASK: "ASK", GUID_VCEK: "VCEK", GUID_VLEK: "VLEK", GUID_CRL: "CRL"}
GUIDS = {v: k for k, v in NAMES.items()}


@dataclass(frozen=True)
class CertTableEntry:
    guid: uuid.UUID
    data: bytes

    @property
    def kind(self) -> str:
        """"ARK", "ASK", "VCEK", "VLEK", "CRL", or "OTHER"."""
        return NAMES.get(self.guid, "OTHER")


def parse_cert_table(blob: bytes) -> tuple[CertTableEntry, ...]:
    if len(blob) > MAX_TABLE_SIZE:
        raise CertificateFormatError(f"certificate table is {len(blob)} bytes; at most {MAX_TABLE_SIZE}")
    entries: list[CertTableEntry] = []
    pos = 0
    while True:
        if pos + ENTRY_SIZE > len(blob):
            raise CertificateFormatError("certificate table ends without its all-zero terminating entry")
        head = blob[pos:pos + ENTRY_SIZE]
        if not any(head):
            break
        if len(entries) >= MAX_ENTRIES:
            raise CertificateFormatError(f"certificate table has more than {MAX_ENTRIES} entries")
        guid = uuid.UUID(bytes=head[:16])
        offset = int.from_bytes(head[16:20], "little")
        length = int.from_bytes(head[20:24], "little")
        if length == 0 or offset + length > len(blob):
            raise CertificateFormatError(
                f"certificate table entry {guid}: offset {offset} + length {length} is outside the {len(blob)}-byte table")
        entries.append(CertTableEntry(guid, bytes(blob[offset:offset + length])))
        pos += ENTRY_SIZE
    # Entries must not point into the header (including the terminator).
    header_end = pos + ENTRY_SIZE
    for e, off in zip(entries, _offsets(blob, len(entries)), strict=True):
        if off < header_end:
            raise CertificateFormatError(f"certificate table entry {e.guid} overlaps the table header")
    return tuple(entries)


def _offsets(blob: bytes, n: int) -> list[int]:
    return [int.from_bytes(blob[i * ENTRY_SIZE + 16:i * ENTRY_SIZE + 20], "little") for i in range(n)]


def build_cert_table(entries: list[tuple[uuid.UUID | str, bytes]]) -> bytes:
    """Serialise entries (GUID or kind name, bytes) into a table (for the sim and tests)."""
    header = bytearray()
    body = bytearray()
    base = (len(entries) + 1) * ENTRY_SIZE
    for key, data in entries:
        guid = GUIDS[key] if isinstance(key, str) else key
        header += guid.bytes + (base + len(body)).to_bytes(4, "little") + len(data).to_bytes(4, "little")
        body += data
    header += bytes(ENTRY_SIZE)
    return bytes(header + body)
