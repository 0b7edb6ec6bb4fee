"""Decoders for the packed fields of an SEV-SNP attestation report.

Layout facts from AMD's "SEV Secure Nested Paging Firmware ABI Specification"
(publication 56860): GUEST_POLICY (Table 9 in rev 1.55+), PLATFORM_INFO and
KEY_INFO (Table 23, ATTESTATION_REPORT), TCB_VERSION (Table 3; Turin layout
from rev 1.58). Parsing judges nothing beyond layout: a field the spec fixes
must be as the spec says; a flag bit it does not name yet is kept (see
verifier.abi.flags) and left to the checks, like everything else.
"""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import Any

from ..errors import MalformedReport
from .flags import GUEST_POLICY, KEY_INFO, PLATFORM_INFO, FlagWord


class Product(str, enum.Enum):  # noqa: UP042 (StrEnum would change str(), which callers print)
    """An SEV-SNP processor generation whose AMD roots firmgate knows.

    A `str` enum so that `Product.MILAN == "Milan"` (the KDS path spelling).
    """

    MILAN = "Milan"
    GENOA = "Genoa"
    TURIN = "Turin"

    @classmethod
    def parse(cls, name: str) -> Product:
        """From a user's or certificate's spelling: "milan", "Milan-B0", "Genoa"."""
        base = name.strip().split("-", 1)[0].lower()
        for p in cls:
            if p.value.lower() == base:
                return p
        raise MalformedReport(f"unknown product {name!r}; expected Milan, Genoa or Turin")

    def __str__(self) -> str:
        return self.value


def product_from_cpuid(family: int, model: int) -> Product | None:
    """Product from the report's CPUID_FAM_ID / CPUID_MOD_ID (report v3+), or None if unknown.

    Family 0x19 model 0x00-0x0F Milan; 0x10-0x1F and 0xA0-0xAF Genoa (Bergamo and
    Siena use Genoa's chain); family 0x1A model 0x00-0x11 Turin.
    """
    if family == 0x19:
        if 0x00 <= model <= 0x0F:
            return Product.MILAN
        if 0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF:
            return Product.GENOA
    elif family == 0x1A and 0x00 <= model <= 0x11:
        return Product.TURIN
    return None


def _as_product(product: Product | str) -> Product:
    return product if isinstance(product, Product) else Product.parse(product)


@dataclass(frozen=True)
class TcbVersion:
    """TCB_VERSION decoded for one product (SNP ABI Table 3).

    Milan/Genoa bytes: [0] bootloader, [1] tee, [2..5] reserved, [6] snp, [7] microcode.
    Turin bytes: [0] fmc, [1] bootloader, [2] tee, [3] snp, [4..6] reserved, [7] microcode.
    """

    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None          # Turin only
    raw: int = 0

    @classmethod
    def from_u64(cls, value: int, product: Product | str) -> TcbVersion:
        return _decode_tcb(value, _as_product(product))

    @classmethod
    def _from_u64(cls, value: int, product: Product) -> TcbVersion:
        if not isinstance(value, int) or not 0 <= value < 1 << 64:
            raise MalformedReport(f"TCB_VERSION {value} does not fit in 64 bits")
        b = value.to_bytes(8, "little")
        if product is Product.TURIN:
            if any(b[4:7]):
                raise MalformedReport(f"TCB_VERSION 0x{value:016x}: reserved bytes 4..6 are not zero (Turin layout)")
            return cls(bootloader=b[1], tee=b[2], snp=b[3], microcode=b[7], fmc=b[0], raw=value)
        if any(b[2:6]):
            raise MalformedReport(f"TCB_VERSION 0x{value:016x}: reserved bytes 2..5 are not zero (Milan/Genoa layout)")
        return cls(bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7], fmc=None, raw=value)

    @staticmethod
    def encode(product: Product | str, *, bootloader: int, tee: int, snp: int, microcode: int,
               fmc: int | None = None) -> int:
        """The u64 for these SPLs in `product`'s layout (used by the sim and the KDS client)."""
        for name, v in (("bootloader", bootloader), ("tee", tee), ("snp", snp), ("microcode", microcode),
                        ("fmc", fmc or 0)):
            if not 0 <= v <= 0xFF:
                raise ValueError(f"TCB component {name}={v} is not a byte")
        if _as_product(product) is Product.TURIN:
            b = bytes([fmc or 0, bootloader, tee, snp, 0, 0, 0, microcode])
        else:
            if fmc is not None:
                raise ValueError("fmc exists only in Turin's TCB layout")
            b = bytes([bootloader, tee, 0, 0, 0, 0, snp, microcode])
        return int.from_bytes(b, "little")

    def components(self) -> dict[str, int]:
        """Named SPLs, fmc only where the layout has it (comparisons iterate over this)."""
        return dict(self._components)

    @functools.cached_property
    def _components(self) -> tuple[tuple[str, int], ...]:
        out = [("bootloader", self.bootloader), ("tee", self.tee), ("snp", self.snp), ("microcode", self.microcode)]
        if self.fmc is not None:
            out.insert(0, ("fmc", self.fmc))
        return tuple(out)

    @functools.cached_property
    def _text(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self._components)

    def le(self, other: TcbVersion) -> bool:
        """Every component of self <= the same component of other (a partial order, not u64 <)."""
        mine, theirs = self._components, other._components
        return len(mine) == len(theirs) and all(a[0] == b[0] and a[1] <= b[1] for a, b in zip(mine, theirs, strict=True))

    def same(self, other: TcbVersion) -> bool:
        """Equal in every named component (raw bits outside the layout are not components)."""
        return self._components == other._components

    def __str__(self) -> str:
        return self._text

    def to_dict(self) -> dict[str, Any]:
        return {**self.components(), "raw": f"0x{self.raw:016x}"}


@functools.lru_cache(maxsize=4096)
def _decode_tcb(value: int, product: Product) -> TcbVersion:
    # Reports from one platform repeat the same few TCB values: decode each once.
    return TcbVersion._from_u64(value, product)


# GUEST_POLICY (SNP ABI Table 9). Bit 17 is reserved and must be one (a field, kept strict);
# a set bit above the named ones is an unknown flag (kept, judged by the checks).
_POLICY_RESERVED_ONE = 1 << 17


def _flags_dict(word: FlagWord, value: int, width_hex: int = 0) -> dict[str, Any]:
    """Every named bit by name, and the set bits no name covers (by number)."""
    out: dict[str, Any] = {"raw": f"0x{value:0{width_hex}x}"}
    for bit, name in word.bits:
        out[name] = bool(value >> bit & 1)
    out["unknown_bits"] = list(word.unknown(value))
    return out


@dataclass(frozen=True)
class GuestPolicy:
    raw: int
    abi_minor: int
    abi_major: int
    smt: bool
    migrate_ma: bool
    debug: bool
    single_socket: bool
    cxl_allow: bool
    mem_aes_256_xts: bool
    rapl_dis: bool
    ciphertext_hiding_dram: bool
    page_swap_disable: bool
    unknown_bits: tuple[int, ...] = ()    # set bits that no ABI revision firmgate knows names

    @classmethod
    def from_u64(cls, value: int) -> GuestPolicy:
        if not value & _POLICY_RESERVED_ONE:
            raise MalformedReport(f"POLICY 0x{value:x}: reserved bit 17 must be 1 (SNP ABI, GUEST_POLICY)")

        def bit(n: int) -> bool:
            return bool(value >> n & 1)

        return cls(raw=value, abi_minor=value & 0xFF, abi_major=value >> 8 & 0xFF, smt=bit(16),
                   migrate_ma=bit(18), debug=bit(19), single_socket=bit(20), cxl_allow=bit(21),
                   mem_aes_256_xts=bit(22), rapl_dis=bit(23), ciphertext_hiding_dram=bit(24),
                   page_swap_disable=bit(25), unknown_bits=GUEST_POLICY.unknown(value))

    def flag(self, name: str) -> bool:
        return bool(self.raw >> GUEST_POLICY.bit_of(name) & 1)

    def to_dict(self) -> dict[str, Any]:
        d = _flags_dict(GUEST_POLICY, self.raw)
        return {"raw": d.pop("raw"), "abi_major": self.abi_major, "abi_minor": self.abi_minor, **d}


@dataclass(frozen=True)
class PlatformInfo:
    """PLATFORM_INFO (SNP ABI Table 23): every bit is a flag; unknown set bits are kept, never refused."""

    raw: int
    smt_en: bool
    tsme_en: bool
    ecc_en: bool
    rapl_dis: bool
    ciphertext_hiding_dram_en: bool
    alias_check_complete: bool
    iommu_write_safe: bool
    tio_en: bool
    unknown_bits: tuple[int, ...] = ()

    @classmethod
    def from_u64(cls, value: int) -> PlatformInfo:
        def bit(n: int) -> bool:
            return bool(value >> n & 1)

        return cls(raw=value, smt_en=bit(0), tsme_en=bit(1), ecc_en=bit(2), rapl_dis=bit(3),
                   ciphertext_hiding_dram_en=bit(4), alias_check_complete=bit(5), iommu_write_safe=bit(6),
                   tio_en=bit(7), unknown_bits=PLATFORM_INFO.unknown(value))

    def flag(self, name: str) -> bool:
        return bool(self.raw >> PLATFORM_INFO.bit_of(name) & 1)

    def to_dict(self) -> dict[str, Any]:
        return _flags_dict(PLATFORM_INFO, self.raw)


class SigningKey(enum.IntEnum):
    """KEY_INFO.SIGNING_KEY (bits 4:2): which key signed the report."""

    VCEK = 0
    VLEK = 1
    NONE = 7


@dataclass(frozen=True)
class KeyInfo:
    """The u32 at 0x048: bit 0 AUTHOR_KEY_EN, bit 1 MASK_CHIP_KEY, bits 4:2 SIGNING_KEY; a set bit
    above them is an unknown flag (kept, judged by the checks). SIGNING_KEY is a field: strict."""

    raw: int
    author_key_en: bool
    mask_chip_key: bool
    signing_key: SigningKey
    unknown_bits: tuple[int, ...] = ()

    @classmethod
    def from_u32(cls, value: int) -> KeyInfo:
        sk = value >> 2 & 0b111
        try:
            signing = SigningKey(sk)
        except ValueError:
            raise MalformedReport(f"KEY_INFO.SIGNING_KEY is {sk}; the spec defines 0 (VCEK), 1 (VLEK), 7 (none)") from None
        return cls(raw=value, author_key_en=bool(value & 1), mask_chip_key=bool(value & 2), signing_key=signing,
                   unknown_bits=KEY_INFO.unknown(value))

    def flag(self, name: str) -> bool:
        return bool(self.raw >> KEY_INFO.bit_of(name) & 1)

    def to_dict(self) -> dict[str, Any]:
        d = _flags_dict(KEY_INFO, self.raw)
        return {"raw": d.pop("raw"), "signing_key": self.signing_key.name, **d}


@dataclass(frozen=True)
class BuildVersion:
    """CURRENT/COMMITTED firmware version: bytes [build, minor, major, reserved]."""

    major: int
    minor: int
    build: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.build}"
