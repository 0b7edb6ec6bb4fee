"""ATTESTATION_REPORT: 1184 raw bytes -> a frozen, typed value.

Layout: AMD SEV-SNP Firmware ABI Specification (56860), Table 23
"ATTESTATION_REPORT Structure" (rev 1.58 for versions 2 to 5). Little-endian.
The signature covers bytes 0x000-0x29F exactly as received: firmgate keeps the
raw bytes and never hashes a re-serialised struct.

Parsing checks layout only (size, a known version, signature algorithm 1,
reserved fields and bits as the spec fixes them, a signing key that exists).
What the values *mean* for trust is judged by verifier.verify and the checks.
"""
from __future__ import annotations

import functools
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import MalformedReport, UnsupportedReportVersion
from .fields import (
    BuildVersion,
    GuestPolicy,
    KeyInfo,
    PlatformInfo,
    Product,
    SigningKey,
    TcbVersion,
    product_from_cpuid,
)
from .flags import set_bit_numbers

REPORT_SIZE = 0x4A0               # 1184 bytes
SIGNED_SIZE = 0x2A0               # the signature covers raw[0x000:0x2A0]
MIN_VERSION, MAX_VERSION = 2, 5   # versions whose layout this module knows
SIG_ALGO_ECDSA_P384_SHA384 = 1
SIG_COMPONENT_SIZE = 72           # R and S are each 72 bytes, little-endian, zero above 48
P384_SCALAR_SIZE = 48

# name -> (offset, size, kind). Kind "u" = little-endian unsigned integer, "b" = bytes.
# Table 23 of the SNP ABI; the sim and the JSON rebuild write through the same table.
LAYOUT: dict[str, tuple[int, int, str]] = {
    "version": (0x000, 4, "u"),
    "guest_svn": (0x004, 4, "u"),
    "policy": (0x008, 8, "u"),
    "family_id": (0x010, 16, "b"),
    "image_id": (0x020, 16, "b"),
    "vmpl": (0x030, 4, "u"),
    "signature_algo": (0x034, 4, "u"),
    "current_tcb": (0x038, 8, "u"),
    "platform_info": (0x040, 8, "u"),
    "key_info": (0x048, 4, "u"),
    "report_data": (0x050, 64, "b"),
    "measurement": (0x090, 48, "b"),
    "host_data": (0x0C0, 32, "b"),
    "id_key_digest": (0x0E0, 48, "b"),
    "author_key_digest": (0x110, 48, "b"),
    "report_id": (0x140, 32, "b"),
    "report_id_ma": (0x160, 32, "b"),
    "reported_tcb": (0x180, 8, "u"),
    "cpuid_fam_id": (0x188, 1, "u"),      # v3+; reserved in v2
    "cpuid_mod_id": (0x189, 1, "u"),
    "cpuid_step": (0x18A, 1, "u"),
    "chip_id": (0x1A0, 64, "b"),
    "committed_tcb": (0x1E0, 8, "u"),
    "current_build": (0x1E8, 1, "u"),
    "current_minor": (0x1E9, 1, "u"),
    "current_major": (0x1EA, 1, "u"),
    "committed_build": (0x1EC, 1, "u"),
    "committed_minor": (0x1ED, 1, "u"),
    "committed_major": (0x1EE, 1, "u"),
    "launch_tcb": (0x1F0, 8, "u"),
    "launch_mit_vector": (0x1F8, 8, "u"),  # v5; reserved below
    "current_mit_vector": (0x200, 8, "u"),
    "signature_r": (0x2A0, 72, "b"),
    "signature_s": (0x2E8, 72, "b"),
}

# Reserved ranges that must be zero in every version (start, end exclusive).
_RESERVED_ALWAYS: tuple[tuple[int, int], ...] = (
    (0x04C, 0x050),
    (0x18B, 0x1A0),
    (0x1EB, 0x1EC),
    (0x1EF, 0x1F0),
    (0x208, 0x2A0),
    (0x330, 0x4A0),
)
_RESERVED_V2_CPUID = (0x188, 0x18B)
# Bytes 0x000-0x207 in one unpack (same offsets as LAYOUT; 'x' = reserved, checked separately).
_HEAD = struct.Struct("<IIQ16s16sIIQQI4x64s48s32s48s48s32s32sQBBB21x64sQBBBxBBBxQQQ")
assert _HEAD.size == 0x208
_RESERVED_BELOW_V5_MIT = (0x1F8, 0x208)


def _u(raw: bytes, name: str) -> int:
    off, size, _ = LAYOUT[name]
    return int.from_bytes(raw[off:off + size], "little")


def _b(raw: bytes, name: str) -> bytes:
    off, size, _ = LAYOUT[name]
    return bytes(raw[off:off + size])


def _check_zero(raw: bytes, start: int, end: int, why: str) -> None:
    if any(raw[start:end]):
        first = next(i for i in range(start, end) if raw[i])
        raise MalformedReport(f"reserved bytes 0x{start:03X}-0x{end - 1:03X} ({why}) are not zero "
                              f"(first non-zero at 0x{first:03X})")


# The packed bit fields repeat from report to report; their decoded values are immutable.
_policy = functools.lru_cache(maxsize=256)(GuestPolicy.from_u64)
_platform = functools.lru_cache(maxsize=256)(PlatformInfo.from_u64)
_key_info = functools.lru_cache(maxsize=64)(KeyInfo.from_u32)


@dataclass(frozen=True)
class AttestationReport:
    raw: bytes
    version: int
    guest_svn: int
    policy: GuestPolicy
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: int            # raw TCB_VERSION u64s: decode with TcbVersion.from_u64(v, product)
    platform_info: PlatformInfo
    key_info: KeyInfo
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: int
    cpuid_fam_id: int | None    # None for version 2
    cpuid_mod_id: int | None
    cpuid_step: int | None
    chip_id: bytes
    committed_tcb: int
    current_build: BuildVersion
    committed_build: BuildVersion
    launch_tcb: int
    launch_mit_vector: int | None   # None below version 5
    current_mit_vector: int | None
    signature_r: int                # P-384 scalars, decoded from 72 little-endian bytes
    signature_s: int

    @classmethod
    def from_bytes(cls, raw: bytes) -> AttestationReport:
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            raise MalformedReport(f"a report is bytes, not {type(raw).__name__}")
        raw = bytes(raw)
        if len(raw) != REPORT_SIZE:
            raise MalformedReport(f"an attestation report is exactly {REPORT_SIZE} bytes; got {len(raw)}")
        version = _u(raw, "version")
        if not MIN_VERSION <= version <= MAX_VERSION:
            raise UnsupportedReportVersion(
                f"report VERSION is {version}; firmgate reads versions {MIN_VERSION} to {MAX_VERSION}")
        algo = _u(raw, "signature_algo")
        if algo != SIG_ALGO_ECDSA_P384_SHA384:
            raise MalformedReport(f"SIGNATURE_ALGO is {algo}; expected 1 (ECDSA P-384 with SHA-384)")
        for start, end in _RESERVED_ALWAYS:
            _check_zero(raw, start, end, "reserved")
        if version == 2:
            _check_zero(raw, *_RESERVED_V2_CPUID, why="CPUID fields are reserved in version 2")
        if version < 5:
            _check_zero(raw, *_RESERVED_BELOW_V5_MIT, why="mitigation vectors are reserved below version 5")
        key_info = _key_info(_u(raw, "key_info"))
        if key_info.signing_key is SigningKey.NONE:
            raise MalformedReport("KEY_INFO.SIGNING_KEY is 7 (none): the report is unsigned")
        r_raw, s_raw = _b(raw, "signature_r"), _b(raw, "signature_s")
        for name, comp in (("R", r_raw), ("S", s_raw)):
            if any(comp[P384_SCALAR_SIZE:]):
                raise MalformedReport(f"signature {name}: bytes 48-71 must be zero for a P-384 signature")
        (_, guest_svn, policy, family_id, image_id, vmpl, _, current_tcb, platform_info, _, report_data,
         measurement, host_data, id_key_digest, author_key_digest, report_id, report_id_ma, reported_tcb,
         fam, mod, step, chip_id, committed_tcb, cur_build, cur_minor, cur_major, com_build, com_minor,
         com_major, launch_tcb, launch_mit, current_mit) = _HEAD.unpack_from(raw)
        has_cpuid = version >= 3
        has_mit = version >= 5
        return cls(
            raw=raw, version=version, guest_svn=guest_svn, policy=_policy(policy), family_id=family_id,
            image_id=image_id, vmpl=vmpl, signature_algo=algo, current_tcb=current_tcb,
            platform_info=_platform(platform_info), key_info=key_info, report_data=report_data,
            measurement=measurement, host_data=host_data, id_key_digest=id_key_digest,
            author_key_digest=author_key_digest, report_id=report_id, report_id_ma=report_id_ma,
            reported_tcb=reported_tcb,
            cpuid_fam_id=fam if has_cpuid else None,
            cpuid_mod_id=mod if has_cpuid else None,
            cpuid_step=step if has_cpuid else None,
            chip_id=chip_id, committed_tcb=committed_tcb,
            current_build=BuildVersion(cur_major, cur_minor, cur_build),
            committed_build=BuildVersion(com_major, com_minor, com_build),
            launch_tcb=launch_tcb,
            launch_mit_vector=launch_mit if has_mit else None,
            current_mit_vector=current_mit if has_mit else None,
            signature_r=int.from_bytes(r_raw[:P384_SCALAR_SIZE], "little"),
            signature_s=int.from_bytes(s_raw[:P384_SCALAR_SIZE], "little"),
        )

    # -- derived views ---------------------------------------------------------
    @property
    def signed_bytes(self) -> bytes:
        """The exact bytes the signature covers (0x000-0x29F)."""
        return self.raw[:SIGNED_SIZE]

    @property
    def cpuid_product(self) -> Product | None:
        """Product named by CPUID (v3+); None for v2 or an unknown family/model. Never a guess."""
        if self.cpuid_fam_id is None or self.cpuid_mod_id is None:
            return None
        return product_from_cpuid(self.cpuid_fam_id, self.cpuid_mod_id)

    def tcb(self, which: str, product: Product | str) -> TcbVersion:
        """Decode one of current/reported/committed/launch TCB for `product`."""
        if which not in ("current", "reported", "committed", "launch"):
            raise ValueError(f"no TCB named {which!r}")
        return TcbVersion.from_u64(getattr(self, f"{which}_tcb"), product)

    def to_dict(self, product: Product | str | None = None) -> dict[str, Any]:
        """JSON-friendly view (bytes as hex). TCBs are decoded only when the product is known."""
        prod = product or self.cpuid_product
        out: dict[str, Any] = {}
        for name in ("version", "guest_svn"):
            out[name] = getattr(self, name)
        out["policy"] = self.policy.to_dict()
        out["family_id"] = self.family_id.hex()
        out["image_id"] = self.image_id.hex()
        out["vmpl"] = self.vmpl
        out["signature_algo"] = self.signature_algo
        out["platform_info"] = self.platform_info.to_dict()
        out["key_info"] = self.key_info.to_dict()
        for name in ("report_data", "measurement", "host_data", "id_key_digest", "author_key_digest",
                     "report_id", "report_id_ma", "chip_id"):
            out[name] = getattr(self, name).hex()
        out["cpuid"] = (None if self.cpuid_fam_id is None else
                        {"family": self.cpuid_fam_id, "model": self.cpuid_mod_id, "stepping": self.cpuid_step})
        out["product"] = None if prod is None else str(prod)
        for which in ("current", "reported", "committed", "launch"):
            value = getattr(self, f"{which}_tcb")
            if prod is None:
                out[f"{which}_tcb"] = {"raw": f"0x{value:016x}"}
            else:
                try:
                    out[f"{which}_tcb"] = TcbVersion.from_u64(value, prod).to_dict()
                except MalformedReport as exc:
                    out[f"{which}_tcb"] = {"raw": f"0x{value:016x}", "error": exc.diagnostics()}
        out["current_build"] = str(self.current_build)
        out["committed_build"] = str(self.committed_build)
        for name in ("launch_mit_vector", "current_mit_vector"):
            value = getattr(self, name)
            out[name] = None if value is None else {"raw": f"0x{value:016x}", "bits": list(set_bit_numbers(value))}
        out["signature"] = {"r": f"{self.signature_r:096x}", "s": f"{self.signature_s:096x}"}
        return out


def encode_fields(values: Mapping[str, int | bytes], base: bytes | None = None) -> bytearray:
    """Write named fields into a 1184-byte buffer (zeros, or a copy of `base`).

    Used by the JSON rebuild and the sim. Writes exactly what it is given: it does
    not validate, so the sim can build wrong reports on purpose.
    """
    buf = bytearray(base if base is not None else bytes(REPORT_SIZE))
    if len(buf) != REPORT_SIZE:
        raise MalformedReport(f"base report must be {REPORT_SIZE} bytes; got {len(buf)}")
    for name, value in values.items():
        if name not in LAYOUT:
            raise KeyError(f"no report field named {name!r}")
        off, size, kind = LAYOUT[name]
        if kind == "u":
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << (8 * size):
                raise MalformedReport(f"field {name} must be an unsigned {8 * size}-bit integer; got {value!r}")
            buf[off:off + size] = value.to_bytes(size, "little")
        else:
            if not isinstance(value, (bytes, bytearray)) or len(value) > size:
                raise MalformedReport(f"field {name} must be at most {size} bytes")
            buf[off:off + size] = bytes(value).ljust(size, b"\0")
    return buf


def _report_packer() -> tuple[struct.Struct, tuple[str, ...]]:
    """One struct over every LAYOUT field in offset order, the gaps (reserved bytes) as zero pad
    bytes: a whole report in one pack() instead of a slice assignment per field."""
    fmt, names, pos = ["<"], [], 0
    for name, (off, size, kind) in sorted(LAYOUT.items(), key=lambda item: item[1][0]):
        if off < pos:
            raise RuntimeError(f"LAYOUT field {name} overlaps the one before it")
        if off > pos:
            fmt.append(f"{off - pos}x")
        fmt.append({1: "B", 4: "I", 8: "Q"}[size] if kind == "u" else f"{size}s")
        names.append(name)
        pos = off + size
    fmt.append(f"{REPORT_SIZE - pos}x")
    packer = struct.Struct("".join(fmt))
    if packer.size != REPORT_SIZE:
        raise RuntimeError(f"LAYOUT packs to {packer.size} bytes, not {REPORT_SIZE}")
    return packer, tuple(names)


_PACKER, _PACK_ORDER = _report_packer()
_PACK_DEFAULTS = {name: (0 if kind == "u" else b"") for name, (_, _, kind) in LAYOUT.items()}


def pack_fields(values: Mapping[str, int | bytes]) -> bytes:
    """The 1184 bytes of a report from named fields (absent ones zero), in one struct pack.

    The fast path of the JSON rebuild, which validates every value first: unlike
    encode_fields it checks nothing (an integer out of range raises struct.error; bytes
    longer than their field would be cut, shorter ones are zero-padded)."""
    merged = {**_PACK_DEFAULTS, **values}
    return _PACKER.pack(*map(merged.__getitem__, _PACK_ORDER))


def signature_to_bytes(r: int, s: int) -> tuple[bytes, bytes]:
    """(R, S) as the report stores them: 72 bytes each, little-endian, zero-padded."""
    return r.to_bytes(SIG_COMPONENT_SIZE, "little"), s.to_bytes(SIG_COMPONENT_SIZE, "little")

