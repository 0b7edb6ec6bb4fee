"""The named bits of the report's flag words: PLATFORM_INFO, GUEST_POLICY and KEY_INFO.

Names follow AMD's SEV-SNP Firmware ABI Specification (56860): GUEST_POLICY
(Table 9), PLATFORM_INFO and KEY_INFO (Table 23, ATTESTATION_REPORT), as of
rev 1.58 and the firmware shipped since. PLATFORM_INFO bit 6 is set by current
Turin firmware; other verifiers (go-sev-guest, virtee/sev) name it
IOMMU_WRITE_SAFE, and so does firmgate.

AMD keeps adding flag bits. A bit that is set but named in no table here is an
"unknown bit": parsing keeps it (FlagWord.unknown) and never fails on it, the
verification reports it as a warning (`report.unknown_bits`), and a policy may
forbid it. Multi-bit fields inside a word (GUEST_POLICY ABI major/minor and its
must-be-one bit 17; KEY_INFO.SIGNING_KEY) are fields, not flags: their layout
stays strict. The mitigation vectors (v5) have no bit names yet: their set bits
are shown by number.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FlagWord:
    """One flag word: its spec name, its width, its named bits and the bits that hold fields."""

    name: str                             # spec name, e.g. "PLATFORM_INFO"
    width: int                            # bits
    bits: tuple[tuple[int, str], ...]     # (bit number, lower-case name)
    field_mask: int = 0                   # bits that belong to multi-bit fields (not flags)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for _, n in self.bits)

    @property
    def known_mask(self) -> int:
        mask = self.field_mask
        for bit, _ in self.bits:
            mask |= 1 << bit
        return mask

    def bit_of(self, name: str) -> int:
        for bit, n in self.bits:
            if n == name:
                return bit
        raise KeyError(f"{self.name} has no bit named {name!r}")

    def unknown(self, value: int) -> tuple[int, ...]:
        """The set bits that no name covers, lowest first."""
        rest = value & ~self.known_mask
        return tuple(i for i in range(self.width) if rest >> i & 1)

    def set_names(self, value: int) -> tuple[str, ...]:
        return tuple(n for bit, n in self.bits if value >> bit & 1)


# SNP ABI Table 23: PLATFORM_INFO. Bit 6: see the module docstring.
PLATFORM_INFO = FlagWord("PLATFORM_INFO", 64, (
    (0, "smt_en"), (1, "tsme_en"), (2, "ecc_en"), (3, "rapl_dis"), (4, "ciphertext_hiding_dram_en"),
    (5, "alias_check_complete"), (6, "iommu_write_safe"), (7, "tio_en"),
))

# SNP ABI Table 9: GUEST_POLICY. Bits 7:0 ABI_MINOR, 15:8 ABI_MAJOR, 17 reserved (must be one).
GUEST_POLICY = FlagWord("GUEST_POLICY", 64, (
    (16, "smt"), (18, "migrate_ma"), (19, "debug"), (20, "single_socket"), (21, "cxl_allow"),
    (22, "mem_aes_256_xts"), (23, "rapl_dis"), (24, "ciphertext_hiding_dram"), (25, "page_swap_disable"),
), field_mask=0xFFFF | 1 << 17)

# The GUEST_POLICY bits added after the first SNP ABI (1.55+); the older ones have rules of their own.
GUEST_POLICY_NEWER = ("cxl_allow", "mem_aes_256_xts", "rapl_dis", "ciphertext_hiding_dram", "page_swap_disable")

# SNP ABI Table 23: KEY_INFO (offset 0x48). Bits 4:2 SIGNING_KEY.
KEY_INFO = FlagWord("KEY_INFO", 32, ((0, "author_key_en"), (1, "mask_chip_key")), field_mask=0b111 << 2)

FLAG_WORDS = (PLATFORM_INFO, GUEST_POLICY, KEY_INFO)


def set_bit_numbers(value: int, width: int = 64) -> tuple[int, ...]:
    """Set bits of a word by number (the mitigation vectors have no names yet)."""
    return tuple(i for i in range(width) if value >> i & 1)
