"""The consistency checks a verifier owes once the signature and chain hold (DESIGN.md, "Checks a verifier owes").

Each check is one small function returning a CheckResult with a stable name; all
of them run (no short-circuit). Models: go-sev-guest validate, AMD SNP ABI 56860
Table 23 and VCEK spec 57230 Table 8.
"""
from __future__ import annotations

import hmac

from .abi.fields import Product, SigningKey, TcbVersion
from .abi.report import AttestationReport
from .kds import AmdLeafInfo
from .options import VerifyOptions
from .verdict import CheckResult, Outcome

PASS, FAIL, WARN, SKIP = Outcome.PASS, Outcome.FAIL, Outcome.WARN, Outcome.SKIP


def check_signing_key(report: AttestationReport, info: AmdLeafInfo, intermediate_role: str | None) -> CheckResult:
    said = "VCEK" if report.key_info.signing_key is SigningKey.VCEK else "VLEK"
    issuer = f", issued by the {intermediate_role}" if intermediate_role else ""
    if said != info.kind:
        return CheckResult("report.signing_key", FAIL,
                           f"KEY_INFO.SIGNING_KEY says {said}, but the signing certificate is a {info.kind}",
                           expected=said, actual=info.kind)
    return CheckResult("report.signing_key", PASS, f"signed by a {info.kind}{issuer}", expected=said, actual=info.kind)


def check_product(report: AttestationReport, info: AmdLeafInfo, options: VerifyOptions, chosen: Product) -> CheckResult:
    sources: dict[str, Product] = {f"certificate productName {info.product_name!r}": info.product}
    if report.cpuid_fam_id is not None:
        cpu = report.cpuid_product
        if cpu is None:
            return CheckResult("report.product", FAIL,
                               f"CPUID family 0x{report.cpuid_fam_id:02x} model 0x{report.cpuid_mod_id:02x} "
                               "names no product firmgate knows", actual=f"{report.cpuid_fam_id:#x}/{report.cpuid_mod_id:#x}")
        sources[f"CPUID {report.cpuid_fam_id:#04x}/{report.cpuid_mod_id:#04x}"] = cpu
    if options.product is not None:
        sources["--product"] = options.product
    names = {p.value for p in sources.values()} | {chosen.value}
    listing = ", ".join(f"{k} = {v.value}" for k, v in sources.items())
    if len(names) != 1:
        return CheckResult("report.product", FAIL, f"product sources disagree: {listing}",
                           expected=chosen.value, actual=listing)
    return CheckResult("report.product", PASS, f"{chosen.value} ({listing})", expected=chosen.value, actual=chosen.value)


def check_version(report: AttestationReport, options: VerifyOptions) -> CheckResult:
    if report.version < options.min_report_version:
        return CheckResult("report.version", FAIL, f"report VERSION {report.version} is below the minimum "
                           f"{options.min_report_version}", expected=f">= {options.min_report_version}",
                           actual=str(report.version))
    return CheckResult("report.version", PASS, f"report version {report.version}", actual=str(report.version))


def check_vmpl(report: AttestationReport, options: VerifyOptions) -> CheckResult:
    # VMPL 0..3 for a guest-requested report; 0xFFFFFFFF marks a host-requested one (SNP_HV_REPORT_REQ).
    if report.vmpl > 3:
        return CheckResult("report.vmpl", FAIL, f"VMPL is {report.vmpl:#x}: not a guest-requested report",
                           expected="0..3", actual=str(report.vmpl))
    if options.vmpl is not None and report.vmpl != options.vmpl:
        return CheckResult("report.vmpl", FAIL, f"VMPL is {report.vmpl}; expected {options.vmpl}",
                           expected=str(options.vmpl), actual=str(report.vmpl))
    return CheckResult("report.vmpl", PASS, f"VMPL {report.vmpl}", actual=str(report.vmpl))


def check_chip_id(report: AttestationReport, info: AmdLeafInfo, product: Product) -> CheckResult:
    chip = report.chip_id
    if report.key_info.mask_chip_key:
        if any(chip):
            return CheckResult("report.chip_id", FAIL, "MASK_CHIP_KEY is set but CHIP_ID is not zero",
                               expected="0" * 16 + "...", actual=chip.hex()[:16] + "...")
        return CheckResult("report.chip_id", SKIP, "CHIP_ID is masked (MASK_CHIP_KEY): hwID not compared")
    if info.hwid is None:
        return CheckResult("report.chip_id", SKIP, "a VLEK has no hwID; CHIP_ID not compared")
    n = len(info.hwid)
    # Turin reports carry the 8-byte chip id in the first 8 bytes; the rest must be zero.
    if n < len(chip) and any(chip[n:]):
        return CheckResult("report.chip_id", FAIL, f"CHIP_ID bytes {n}..63 are not zero for a {product} chip",
                           expected=info.hwid.hex(), actual=chip.hex())
    if not hmac.compare_digest(chip[:n], info.hwid):
        return CheckResult("report.chip_id", FAIL, f"CHIP_ID {chip[:n].hex()[:16]}... is not the VCEK's hwID "
                           f"{info.hwid.hex()[:16]}...", expected=info.hwid.hex(), actual=chip[:n].hex())
    return CheckResult("report.chip_id", PASS, "CHIP_ID equals the VCEK hwID", actual=chip[:n].hex())


def check_reported_tcb(cert_tcb: TcbVersion, reported: TcbVersion) -> CheckResult:
    if not cert_tcb.same(reported):
        return CheckResult("tcb.reported_matches_cert", FAIL,
                           f"the certificate's TCB ({cert_tcb}) is not REPORTED_TCB ({reported})",
                           expected=str(cert_tcb), actual=str(reported))
    return CheckResult("tcb.reported_matches_cert", PASS, f"REPORTED_TCB {reported}", actual=str(reported))


def check_cert_le_current(cert_tcb: TcbVersion, current: TcbVersion) -> CheckResult:
    if not cert_tcb.le(current):
        worse = [k for k, v in cert_tcb.components().items() if v > current.components().get(k, -1)]
        return CheckResult("tcb.cert_le_current", FAIL,
                           f"CURRENT_TCB ({current}) is below the certificate's TCB ({cert_tcb}) in {', '.join(worse)}",
                           expected=f">= {cert_tcb}", actual=str(current))
    return CheckResult("tcb.cert_le_current", PASS, f"certificate TCB <= CURRENT_TCB ({current})", actual=str(current))


def check_committed(committed: TcbVersion, current: TcbVersion, options: VerifyOptions) -> CheckResult:
    if committed.same(current):
        return CheckResult("tcb.committed_eq_current", PASS, "COMMITTED_TCB equals CURRENT_TCB", actual=str(current))
    msg = (f"provisional firmware: COMMITTED_TCB ({committed}) differs from CURRENT_TCB ({current})")
    if options.allow_provisional:
        return CheckResult("tcb.committed_eq_current", WARN, msg, expected=str(current), actual=str(committed))
    return CheckResult("tcb.committed_eq_current", FAIL, msg + "; provisional firmware is not allowed",
                       expected=str(current), actual=str(committed))


def check_report_data(report: AttestationReport, options: VerifyOptions) -> CheckResult | None:
    if options.report_data is None:
        return None
    want = options.report_data.ljust(64, b"\0")
    if len(options.report_data) > 64 or not hmac.compare_digest(want, report.report_data):
        return CheckResult("report.report_data", FAIL, "REPORT_DATA is not the expected value",
                           expected=want.hex(), actual=report.report_data.hex())
    return CheckResult("report.report_data", PASS, "REPORT_DATA matches", actual=report.report_data.hex())


def cert_tcb_for(info: AmdLeafInfo, product: Product) -> TcbVersion:
    """The certificate's TCB in the chosen product's layout (an fmcSPL only counts on Turin)."""
    return info.tcb() if info.product is product else TcbVersion(
        bootloader=info.bl_spl, tee=info.tee_spl, snp=info.snp_spl, microcode=info.ucode_spl,
        fmc=info.fmc_spl if product is Product.TURIN else None)


def run_checks(report: AttestationReport, info: AmdLeafInfo, product: Product, tcb: dict[str, TcbVersion],
               options: VerifyOptions, intermediate_role: str | None,
               cert_tcb: TcbVersion | None = None) -> list[CheckResult]:
    cert_tcb = cert_tcb or cert_tcb_for(info, product)
    out = [
        check_signing_key(report, info, intermediate_role),
        check_product(report, info, options, product),
        check_version(report, options),
        check_vmpl(report, options),
        check_chip_id(report, info, product),
        check_reported_tcb(cert_tcb, tcb["reported"]),
        check_cert_le_current(cert_tcb, tcb["current"]),
        check_committed(tcb["committed"], tcb["current"], options),
    ]
    rd = check_report_data(report, options)
    if rd is not None:
        out.append(rd)
    return out
