"""Small IGVM files built with verifier.firmware.igvm_build for tests (no IGVM file ships in ../shared).

The VMSA is sev-snp-measure's QEMU BSP VMSA (reset vector, SEV_FEATURES 0x1), so
a launch of these files is one KVM accepts as written.
"""
from __future__ import annotations

from functools import cache, lru_cache

from sevsnpmeasure.sev_mode import SevMode
from sevsnpmeasure.vcpu_types import CPU_SIGS
from sevsnpmeasure.vmm_types import VMMType
from sevsnpmeasure.vmsa import VMSA

from verifier.firmware.igvm_build import IgvmWriter

CODE_GPA = 0xFFFF_0000


@cache
def bsp_vmsa(sig: str = "EPYC-v4", features: int = 0x1) -> bytes:
    return bytes(VMSA(SevMode.SEV_SNP, 0, CPU_SIGS[sig], features, VMMType.QEMU).bsp_save_area)


@lru_cache(maxsize=4096)
def code_page(n: int = 0) -> bytes:
    return bytes([(n * 7 + i) & 0xFF for i in range(256)]) * 16


def snp_writer(vcpus: int = 1) -> IgvmWriter:
    """Platform and policy only; add directives, then VP contexts."""
    return IgvmWriter().platform(mask=0x1).guest_policy(0x30000, mask=0x1)


def minimal_snp_igvm(vcpus: int = 1) -> bytes:
    w = snp_writer().page(CODE_GPA, code_page()).page(CODE_GPA + 0x1000, None)
    for i in range(vcpus):
        w.vp_context(bsp_vmsa(), i)
    return w.to_bytes()
