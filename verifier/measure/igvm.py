"""The SEV-SNP launch digest of an IGVM file, as QEMU + KVM launch it.

The PAGE_INFO chain itself is sev-snp-measure's GCTX (SNP ABI spec 56860,
SNP_LAUNCH_UPDATE, Table 67); what this module decides is which pages QEMU's
IGVM loader hands to KVM, with which page type, in which order. Sources read
(QEMU backends/igvm.c, target/i386/sev.c; coconut-svsm tools/igvmmeasure;
the igvm crate's measurement/snp.rs):

- PAGE_DATA is loaded in regions of consecutive directives with equal flags,
  data type, compatibility mask and data/no-data, contiguous GPAs
  (igvm.c qigvm_process_mem_page). A region is handed to KVM only when the
  next PAGE_DATA breaks it, or after the last directive; a PARAMETER_INSERT is
  handed over at once. So a parameter area inserted after some pages is
  measured BEFORE those pages: `order` below reproduces that.
- Page types (igvm.c qigvm_type_to_cgs_type, sev.c cgs_set_guest_state):
  NORMAL with data -> NORMAL; NORMAL without data -> CGS ZERO, which sev.c
  sends to KVM as KVM_SEV_SNP_PAGE_TYPE_NORMAL: a NORMAL page of zeros
  ("qemu" rule, the default). igvmmeasure --native-zero and sev-snp-measure's
  OVMF SNP_SEC_MEM use SNP's ZERO page type instead ("native-zero" rule).
  unmeasured flag -> UNMEASURED; SECRETS -> SECRETS; CPUID_DATA/CPUID_XF ->
  CPUID (contents not measured).
- PARAMETER_INSERT: the whole parameter area as UNMEASURED pages (igvm.c
  qigvm_directive_parameter_insert; igvmmeasure measures one page only).
- REQUIRED_MEMORY: made private, not measured (sev.c kvm_convert_memory).
- VP_CONTEXT: KVM measures one VMSA per vCPU at SNP_LAUNCH_FINISH, after every
  page, at the GPA KVM hard-codes, 0xFFFFFFFFF000 (sev.c check_vmsa_supported
  refuses any other). So the file fixes the vCPU count: one VP context per
  vCPU, vp_index 0..n-1, measured in vp_index order.
- KVM builds the VMSA it measures from the registers QEMU syncs from the
  file's VMSA; it sets EFER.SVME itself, and QEMU refuses fields it does not
  sync and SEV_FEATURES other than SNP_ACTIVE. firmgate measures the file's
  VMSA bytes and reports, as warnings, VMSA values KVM would not keep.
"""
from __future__ import annotations

import ctypes
import hashlib
import hmac
from dataclasses import dataclass
from typing import Literal, get_args

from sevsnpmeasure.gctx import GCTX
from sevsnpmeasure.vmsa import SevEsSaveArea

from ..errors import FirmwareError, UsageError
from ..firmware import igvm as ig

ZeroRule = Literal["qemu", "native-zero"]
ZERO_RULES: tuple[str, ...] = get_args(ZeroRule)
KVM_VMSA_GPA = 0xFFFFFFFFF000   # sev.c KVM_VMSA_GPA; sev-snp-measure GCTX.VMSA_GPA
SEV_FEATURES_SNP_ACTIVE = 0x1   # sev.h SVM_SEV_FEAT_SNP_ACTIVE
EFER_SVME = 0x1000
_SNP_PAGE_NORMAL = 0x01         # SNP ABI PAGE_TYPE_NORMAL (sev-snp-measure gctx.update_normal_pages)


class _Gctx(GCTX):  # type: ignore[misc]
    """sev-snp-measure's GCTX, plus NORMAL pages of zeros without hashing 4 KiB each time
    (a hostile file can ask for thousands; tests check it equals update_normal_pages(zeros))."""

    _ZERO_PAGE_SHA384 = hashlib.sha384(bytes(4096)).digest()

    def update_normal_zero_pages(self, gpa: int, length: int) -> None:
        for page in range(gpa, gpa + length, 4096):
            self._update(_SNP_PAGE_NORMAL, page, self._ZERO_PAGE_SHA384)
_VMSA_SIZE = ctypes.sizeof(SevEsSaveArea)


@dataclass(frozen=True)
class VmsaFacts:
    vp_index: int
    rip: int
    cs_base: int
    cr0: int
    efer: int
    rdx: int
    sev_features: int


@dataclass(frozen=True)
class IgvmMeasurement:
    digest: bytes
    rule: str
    vcpus: int
    policy: int
    vmsas: tuple[VmsaFacts, ...]
    page_counts: dict[str, int]
    id_block_ld: bytes | None
    warnings: tuple[str, ...]
    id_block: ig.SnpIdBlock | None = None

    @property
    def sev_features(self) -> int:
        return self.vmsas[0].sev_features

    @property
    def vcpu_sig(self) -> int:
        return self.vmsas[0].rdx

    @property
    def id_block_matches(self) -> bool | None:
        """Whether the file's SNP ID block names this digest (None: no ID block)."""
        if self.id_block_ld is None:
            return None
        return hmac.compare_digest(self.id_block_ld, self.digest)

    def to_dict(self) -> dict[str, object]:
        return {
            "measurement": self.digest.hex(), "zero_page_rule": self.rule, "vcpus": self.vcpus,
            "guest_policy": f"{self.policy:#x}", "sev_features": f"{self.sev_features:#x}",
            "vcpu_sig": f"{self.vcpu_sig:#x}", "pages": dict(self.page_counts),
            "id_block_ld": None if self.id_block_ld is None else self.id_block_ld.hex(),
            "id_block_matches": self.id_block_matches, "warnings": list(self.warnings),
            "id_block": None if self.id_block is None else {
                # what the report carries when QEMU passes this ID block at SNP_LAUNCH_FINISH
                "family_id": self.id_block.family_id.hex(), "image_id": self.id_block.image_id.hex(),
                "guest_svn": self.id_block.guest_svn, "id_key_digest": self.id_block.id_key_digest.hex(),
                "author_key_digest": (None if self.id_block.author_key_digest is None
                                      else self.id_block.author_key_digest.hex())},
        }


def _continues(prev: ig.PageData, cur: ig.PageData) -> bool:
    """igvm.c qigvm_process_mem_page: does `cur` extend the region that ends with `prev`?"""
    return (cur.index == prev.index + 1 and cur.flags == prev.flags and cur.data_type == prev.data_type
            and cur.mask == prev.mask and cur.has_data == prev.has_data and prev.gpa + prev.page_size == cur.gpa)


Step = tuple[str, int, int, int]  # (page type, gpa, size, file_offset or 0)


def order(launch: ig.SnpLaunch, rule: str) -> list[Step]:
    """The pages QEMU hands to KVM, in order, with the SNP page type each is measured as (VMSAs excluded)."""
    if rule not in ZERO_RULES:
        raise UsageError(f"unknown zero-page rule {rule!r}; expected one of {', '.join(ZERO_RULES)}")
    steps: list[Step] = []
    pending: list[ig.PageData] = []
    areas: dict[int, ig.ParameterArea] = {}
    inserted: set[int] = set()

    def flush() -> None:
        for p in pending:
            if p.data_type == ig.PAGE_SECRETS:
                steps.append(("secrets", p.gpa, p.page_size, 0))
            elif p.data_type in (ig.PAGE_CPUID_DATA, ig.PAGE_CPUID_XF):
                steps.append(("cpuid", p.gpa, p.page_size, 0))
            elif p.flags & ig.FLAG_UNMEASURED:
                steps.append(("unmeasured", p.gpa, p.page_size, 0))
            elif p.has_data:
                steps.append(("normal", p.gpa, p.page_size, p.file_offset))
            else:
                steps.append(("zero" if rule == "native-zero" else "normal-zero", p.gpa, p.page_size, 0))
        pending.clear()

    for d in launch.directives:
        if isinstance(d, ig.PageData):
            if pending and not _continues(pending[-1], d):
                flush()
            pending.append(d)
        elif isinstance(d, ig.ParameterArea):
            areas[d.area_index] = d
        elif isinstance(d, ig.ParameterInsert):
            if d.area_index in inserted:
                raise FirmwareError(f"IGVM header PARAMETER_INSERT (directive {d.index}): parameter area "
                                    f"{d.area_index} is inserted twice")
            inserted.add(d.area_index)
            steps.append(("unmeasured", d.gpa, areas[d.area_index].size, 0))
    flush()
    return steps


def _check_steps(steps: list[Step]) -> None:
    total = sum(s[2] for s in steps)
    if total > ig.MAX_MEASURED_BYTES:
        raise FirmwareError(f"IGVM launch would measure {total} bytes of pages, above the "
                            f"{ig.MAX_MEASURED_BYTES}-byte limit")
    seen: set[int] = set()
    for kind, gpa, size, _ in steps:
        for page in range(gpa, gpa + size, ig.PAGE_4K):
            if page in seen:
                raise FirmwareError(f"IGVM directives load GPA {page:#x} twice (the PSP refuses to "
                                    "launch-update a page twice)")
            seen.add(page)
        if kind != "unmeasured" and gpa <= KVM_VMSA_GPA < gpa + size:
            raise FirmwareError(f"IGVM page data at {gpa:#x} covers the VMSA GPA {KVM_VMSA_GPA:#x}")


def _vmsa_facts(launch: ig.SnpLaunch, rule: str) -> tuple[tuple[VmsaFacts, ...], list[str]]:
    facts: list[VmsaFacts] = []
    warnings: list[str] = []
    for vp in launch.vp_contexts:
        where = f"IGVM VP_CONTEXT for vp_index {vp.vp_index}"
        if vp.gpa != KVM_VMSA_GPA:
            raise FirmwareError(f"{where}: gpa {vp.gpa:#x}; KVM always places the VMSA at {KVM_VMSA_GPA:#x} "
                                "(QEMU target/i386/sev.c check_vmsa_supported refuses others)")
        page = launch.file.page(vp.file_offset)
        sa = SevEsSaveArea.from_buffer_copy(page[:_VMSA_SIZE])
        f = VmsaFacts(vp.vp_index, int(sa.rip), int(sa.cs.base), int(sa.cr0), int(sa.efer), int(sa.rdx),
                      int(sa.sev_features))
        if not f.sev_features & SEV_FEATURES_SNP_ACTIVE:
            raise FirmwareError(f"{where}: SEV_FEATURES {f.sev_features:#x} lacks SNP_ACTIVE: not an SNP VMSA")
        if rule == "qemu" and f.sev_features != SEV_FEATURES_SNP_ACTIVE:
            warnings.append(f"{where}: SEV_FEATURES {f.sev_features:#x}; QEMU's check_vmsa_supported accepts "
                            f"only {SEV_FEATURES_SNP_ACTIVE:#x}")
        if not f.efer & EFER_SVME:
            warnings.append(f"{where}: EFER {f.efer:#x} lacks SVME (0x1000), which KVM sets in the VMSA it "
                            "measures: a QEMU launch will not match this digest")
        facts.append(f)
    if any(f.sev_features != facts[0].sev_features for f in facts):
        raise FirmwareError("IGVM VP contexts disagree on SEV_FEATURES (KVM uses one value for every vCPU)")
    return tuple(facts), warnings


def measure_igvm(payload: bytes, rule: str = "qemu") -> IgvmMeasurement:
    """Parse, select SEV-SNP, and compute the launch digest under `rule`."""
    return measure_launch(ig.snp_launch(ig.parse_igvm(payload)), rule)


def measure_launch(launch: ig.SnpLaunch, rule: str = "qemu") -> IgvmMeasurement:
    steps = order(launch, rule)
    _check_steps(steps)
    vmsas, warnings = _vmsa_facts(launch, rule)
    data = memoryview(launch.file.data)  # page slices without copies
    gctx = _Gctx()
    counts: dict[str, int] = {}
    for kind, gpa, size, off in steps:
        counts[kind] = counts.get(kind, 0) + size // ig.PAGE_4K
        if kind == "normal":
            gctx.update_normal_pages(gpa, data[off:off + size])
        elif kind == "normal-zero":
            gctx.update_normal_zero_pages(gpa, size)
        elif kind == "zero":
            gctx.update_zero_pages(gpa, size)
        elif kind == "unmeasured":
            gctx.update_unmeasured_pages(gpa, size)
        elif kind == "secrets":
            gctx.update_secrets_page(gpa)
        else:
            gctx.update_cpuid_page(gpa)
    for vp in launch.vp_contexts:
        gctx.update_vmsa_page(launch.file.page(vp.file_offset))
    counts["vmsa"] = len(launch.vp_contexts)
    ld = launch.id_block.ld if launch.id_block is not None else None
    return IgvmMeasurement(digest=bytes(gctx.ld()), rule=rule, vcpus=launch.vcpus, policy=launch.policy,
                           vmsas=vmsas, page_counts=counts, id_block_ld=ld, warnings=tuple(warnings),
                           id_block=launch.id_block)
