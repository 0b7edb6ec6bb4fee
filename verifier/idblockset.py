"""An owner's set of signed ID blocks: one per (firmware x shape) of the policy's reference table.

File format `firmgate-idblocks/1` (JSON, documented in docs/firmware.md): the owner
commits it next to the policy (`<tenant>.idblocks.json`) or hands it to the host;
host-install picks the entry whose `launch_digest` equals the MEASUREMENT it
recomputes for the installed firmware and the VM's shape, and passes `id_block` /
`id_auth` to QEMU. Nothing in the file is secret (signatures and public keys).

    {"format": "firmgate-idblocks/1", "tenant": "acme", "policy_sha256": "<hex>",
     "id_key_digest": "<96 hex>", "author_key_digest": "<96 hex>" | null,
     "blocks": [{"firmware": "<id>", "firmware_sha384": "<96 hex>", "shape": "<Shape.key()>",
                 "launch_digest": "<96 hex>", "id_block": "<base64, 96 bytes>",
                 "id_auth": "<base64, 4096 bytes>"}]}

Reading is hostile-input safe: bounded size and entry count, every field typed and
sized, every signature verified (`load_set` returns only verified entries).
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .idblock import (
    ID_AUTH_SIZE,
    ID_BLOCK_SIZE,
    IdBlockError,
    IdBlockFormatError,
    VerifiedIdBlock,
    has_author_key,
    verify,
)
from .regularfile import read_regular

FORMAT = "firmgate-idblocks/1"
MAX_SET_SIZE = 64 * 1024 * 1024
MAX_BLOCKS = 8192          # 5.5 KiB of base64 each; bounded by the policy's table (firmware x shapes) in practice


@dataclass(frozen=True)
class SignedLaunch:
    firmware: str
    firmware_sha384: str
    shape: str
    launch_digest: bytes
    id_block: bytes
    id_auth: bytes
    verified: VerifiedIdBlock

    @property
    def author_key_enabled(self) -> bool:
        return self.verified.author_key_digest is not None

    def to_dict(self) -> dict[str, Any]:
        return {"firmware": self.firmware, "firmware_sha384": self.firmware_sha384, "shape": self.shape,
                "launch_digest": self.launch_digest.hex(),
                "id_block": base64.b64encode(self.id_block).decode(),
                "id_auth": base64.b64encode(self.id_auth).decode()}


@dataclass(frozen=True)
class IdBlockSet:
    tenant: str
    policy_sha256: str
    id_key_digest: bytes
    author_key_digest: bytes | None
    blocks: tuple[SignedLaunch, ...]

    def for_measurement(self, measurement: bytes) -> SignedLaunch | None:
        return next((b for b in self.blocks if b.launch_digest == measurement), None)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "tenant": self.tenant, "policy_sha256": self.policy_sha256,
                           "id_key_digest": self.id_key_digest.hex(),
                           "author_key_digest": self.author_key_digest.hex() if self.author_key_digest else None,
                           "blocks": [b.to_dict() for b in self.blocks]}, indent=1) + "\n"


def _hex(v: Any, size: int, what: str) -> bytes:
    if not isinstance(v, str) or len(v) != 2 * size:
        raise IdBlockFormatError(f"{what} must be {2 * size} hex digits")
    try:
        return bytes.fromhex(v)
    except ValueError as exc:
        raise IdBlockFormatError(f"{what} must be hex digits") from exc


def _b64(v: Any, size: int, what: str) -> bytes:
    if not isinstance(v, str) or len(v) > 4 * size:
        raise IdBlockFormatError(f"{what} must be base64 of {size} bytes")
    try:
        data = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise IdBlockFormatError(f"{what} is not base64") from exc
    if len(data) != size:
        raise IdBlockFormatError(f"{what} is {len(data)} bytes; expected {size}")
    return data


def _str(v: Any, what: str, limit: int = 512) -> str:
    if not isinstance(v, str) or not v or len(v) > limit:
        raise IdBlockFormatError(f"{what} must be a string of 1-{limit} characters")
    return v


def parse_set(raw: bytes) -> IdBlockSet:
    """Parse and verify every entry (both signatures); raises IdBlockError naming the entry."""
    if len(raw) > MAX_SET_SIZE:
        raise IdBlockFormatError(f"ID-block set is larger than {MAX_SET_SIZE} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise IdBlockFormatError("ID-block set is not JSON") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise IdBlockFormatError(f"not an ID-block set (format must be {FORMAT!r})")
    blocks_raw = doc.get("blocks")
    if not isinstance(blocks_raw, list) or len(blocks_raw) > MAX_BLOCKS:
        raise IdBlockFormatError(f"blocks must be a list of at most {MAX_BLOCKS} entries")
    id_digest = _hex(doc.get("id_key_digest"), 48, "id_key_digest")
    a = doc.get("author_key_digest")
    author_digest = None if a is None else _hex(a, 48, "author_key_digest")
    out: list[SignedLaunch] = []
    for i, b in enumerate(blocks_raw):
        where = f"blocks[{i}]"
        if not isinstance(b, dict):
            raise IdBlockFormatError(f"{where} must be an object")
        block = _b64(b.get("id_block"), ID_BLOCK_SIZE, f"{where}.id_block")
        auth = _b64(b.get("id_auth"), ID_AUTH_SIZE, f"{where}.id_auth")
        ld = _hex(b.get("launch_digest"), 48, f"{where}.launch_digest")
        try:
            v = verify(block, auth, author_key_enabled=has_author_key(auth))
        except IdBlockError as exc:
            raise type(exc)(f"{where}: {exc.diagnostics()}") from exc
        if v.block.launch_digest != ld:
            raise IdBlockError(f"{where}: launch_digest differs from the ID block's LD")
        if v.id_key_digest != id_digest or v.author_key_digest != author_digest:
            raise IdBlockError(f"{where}: signed with other keys than the set's id_key_digest/author_key_digest")
        out.append(SignedLaunch(_str(b.get("firmware"), f"{where}.firmware", 64),
                                _hex(b.get("firmware_sha384"), 48, f"{where}.firmware_sha384").hex(),
                                _str(b.get("shape"), f"{where}.shape"), ld, block, auth, v))
    return IdBlockSet(_str(doc.get("tenant"), "tenant", 63), _hex(doc.get("policy_sha256"), 32, "policy_sha256").hex(),
                      id_digest, author_digest, tuple(out))


def load_set(path: str | Path) -> IdBlockSet:
    p = Path(path)
    try:
        raw = read_regular(p, MAX_SET_SIZE)  # a FIFO would block `host-install listen`'s install for ever (RT-6)
    except OSError as exc:
        raise IdBlockFormatError(f"{p}: cannot read: {exc.strerror or exc}") from exc
    try:
        return parse_set(raw)
    except IdBlockError as exc:
        raise type(exc)(f"{p.name}: {exc.diagnostics()}") from exc


def sign_table(tenant: str, policy_sha256: str, entries: list[tuple[bytes, str, str, str]],
               id_key: Any, author_key: Any | None, *, family_id: bytes = bytes(16), image_id: bytes = bytes(16),
               guest_svn: int = 0, guest_policy: int = 0x30000) -> IdBlockSet:
    """One signed ID block per reference-table entry (measurement, firmware id, firmware sha384, shape key)."""
    from .idblock import IdBlock, key_digest, sign
    if len(entries) > MAX_BLOCKS:
        raise IdBlockFormatError(f"the policy's table has {len(entries)} entries; a set holds at most {MAX_BLOCKS}")
    out = []
    for measurement, fwid, fw_digest, shape in sorted(entries, key=lambda e: (e[1], e[3])):
        block = IdBlock(measurement, family_id, image_id, guest_svn, guest_policy)
        raw, auth = sign(block, id_key, author_key)
        v = verify(raw, auth, author_key_enabled=author_key is not None)
        out.append(SignedLaunch(fwid, fw_digest, shape, measurement, raw, auth, v))
    return IdBlockSet(tenant, policy_sha256, key_digest(id_key.public_key()),
                      key_digest(author_key.public_key()) if author_key is not None else None, tuple(out))
