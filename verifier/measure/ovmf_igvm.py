"""OVMF -> IGVM: wrap an OVMF image and one VM shape into an IGVM file with the
same pages, page types, GPAs and order that sev-snp-measure measures, and the
VMSAs sev-snp-measure builds.

This is the oracle for verifier.measure.igvm: under the "native-zero" rule the
IGVM digest of the result must equal sev-snp-measure's OVMF digest for the same
shape, so the IGVM arithmetic is checked against a computation that is not
firmgate's. Under the "qemu" rule it differs exactly where a page without data
stands for a zero page (SNP_SEC_MEM, SVSM_CAA, an empty SNP_KERNEL_HASHES):
QEMU's IGVM loader sends those as NORMAL pages of zeros, while a -bios launch
of the same OVMF sends them as ZERO pages (docs/firmware.md, "IGVM").

Directive order mirrors sev-snp-measure guest.snp_calc_launch_digest:
firmware pages at 4 GiB - size; then the SEV metadata sections in file order
(SNP_SEC_MEM zero, or unmeasured for gce; SECRETS; CPUID, moved after all other
sections for ec2; SNP_KERNEL_HASHES as the hashes page or zero; SVSM_CAA
zero); then one VP context per vCPU (BSP, then APs) at 0xFFFFFFFFF000.
"""
from __future__ import annotations

from sevsnpmeasure.sev_mode import SevMode
from sevsnpmeasure.vmsa import VMSA

from ..firmware import igvm as ig
from ..firmware.igvm_build import IgvmWriter
from ..firmware.image import PAGE
from .launch import _VMM_TYPES, Shape, _check_kernel_hashes, _Hashes, prepare_firmware

DEFAULT_POLICY = 0x30000  # SMT allowed, reserved bit 17 set (QEMU sev-snp-guest's default policy)


def igvm_from_ovmf(firmware: bytes, shape: Shape, *, policy: int = DEFAULT_POLICY) -> bytes:
    fw = prepare_firmware(firmware)
    if shape.kernel_hashes is not None:
        _check_kernel_hashes(fw)
    w = IgvmWriter().platform(mask=0x1).guest_policy(policy, mask=0x1)
    w.pages(fw.image.gpa, fw.data)

    def zero(gpa: int, size: int, flags: int = 0) -> None:
        for p in range(gpa, gpa + size, PAGE):
            w.page(p, None, flags=flags)

    for s in fw.image.sev_metadata or ():
        if s.type == "SNP_SEC_MEM":
            zero(s.gpa, s.size, ig.FLAG_UNMEASURED if shape.vmm == "gce" else 0)
        elif s.type == "SNP_SECRETS":
            w.page(s.gpa, None, data_type=ig.PAGE_SECRETS)
        elif s.type == "CPUID":
            if shape.vmm != "ec2":
                w.page(s.gpa, None, data_type=ig.PAGE_CPUID_DATA)
        elif s.type == "SNP_KERNEL_HASHES":
            if shape.kernel_hashes is None:
                zero(s.gpa, s.size)
            else:
                offset = (fw.image.sev_hash_table_gpa or 0) & (PAGE - 1)
                w.page(s.gpa, bytes(_Hashes(shape.kernel_hashes).construct_page(offset)))
        else:  # SVSM_CAA
            zero(s.gpa, s.size)
    if shape.vmm == "ec2":
        for s in fw.image.sev_metadata or ():
            if s.type == "CPUID":
                w.page(s.gpa, None, data_type=ig.PAGE_CPUID_DATA)
    vmsa = VMSA(SevMode.SEV_SNP, fw.ovmf.sev_es_reset_eip(), shape.vcpu_sig, shape.guest_features,
                _VMM_TYPES[shape.vmm])
    for i, page in enumerate(vmsa.pages(shape.vcpus)):
        w.vp_context(bytes(page), i)
    return w.to_bytes()
