"""The consistency checks a verifier owes once the signature and chain hold (DESIGN.md, "Checks a verifier owes").

Each check is one small pure function of plain values returning a CheckResult
with a stable name; all of them run (no short-circuit). Because they are pure,
results are memoised: reports from one platform repeat the same values, and the
hot path (bench/verify.py) should cost little more than the ECDSA verify.
Models: go-sev-guest validate, AMD SNP ABI 56860 Table 23, VCEK spec 57230 Table 8.
"""
from __future__ import annotations

import functools
import hmac

from .abi.fields import Product, SigningKey, TcbVersion, product_from_cpuid
from .abi.flags import GUEST_POLICY, KEY_INFO, PLATFORM_INFO
from .abi.report import AttestationReport
from .kds import AmdLeafInfo
from .options import VerifyOptions
from .verdict import CheckResult, Outcome

PASS, FAIL, WARN, SKIP = Outcome.PASS, Outcome.FAIL, Outcome.WARN, Outcome.SKIP
_memo = functools.lru_cache(maxsize=1024)


@_memo
def check_signing_key(signing_key: SigningKey, leaf_kind: str, intermediate_role: str | None) -> CheckResult:
    said = "VCEK" if signing_key is SigningKey.VCEK else "VLEK"
    issuer = f", issued by the {intermediate_role}" if intermediate_role else ""
    if said != leaf_kind:
        return CheckResult("report.signing_key", FAIL,
                           f"KEY_INFO.SIGNING_KEY says {said}, but the signing certificate is a {leaf_kind}",
                           expected=said, actual=leaf_kind)
    return CheckResult("report.signing_key", PASS, f"signed by a {leaf_kind}{issuer}", expected=said, actual=leaf_kind)


@_memo
def check_product(cert_product: Product, cert_product_name: str, cpuid_fam: int | None, cpuid_mod: int | None,
                  option: Product | None, chosen: Product) -> CheckResult:
    """CPUID (v3+), the certificate's productName and --product, where present, must all agree."""
    sources: dict[str, Product] = {f"certificate productName {cert_product_name!r}": cert_product}
    if cpuid_fam is not None and cpuid_mod is not None:
        cpu = product_from_cpuid(cpuid_fam, cpuid_mod)
        if cpu is None:
            return CheckResult("report.product", FAIL,
                               f"CPUID family 0x{cpuid_fam:02x} model 0x{cpuid_mod:02x} names no product firmgate knows",
                               actual=f"{cpuid_fam:#x}/{cpuid_mod:#x}")
        sources[f"CPUID {cpuid_fam:#04x}/{cpuid_mod:#04x}"] = cpu
    if option is not None:
        sources["--product"] = option
    names = {p.value for p in sources.values()} | {chosen.value}
    listing = ", ".join(f"{k} = {v.value}" for k, v in sources.items())
    if len(names) != 1:
        return CheckResult("report.product", FAIL, f"product sources disagree: {listing}",
                           expected=chosen.value, actual=listing)
    return CheckResult("report.product", PASS, f"{chosen.value} ({listing})", expected=chosen.value, actual=chosen.value)


@_memo
def check_version(version: int, minimum: int) -> CheckResult:
    if version < minimum:
        return CheckResult("report.version", FAIL, f"report VERSION {version} is below the minimum {minimum}",
                           expected=f">= {minimum}", actual=str(version))
    return CheckResult("report.version", PASS, f"report version {version}", actual=str(version))


@_memo
def check_vmpl(vmpl: int, expected: int | None) -> CheckResult:
    # VMPL 0..3 for a guest-requested report; 0xFFFFFFFF marks a host-requested one (SNP_HV_REPORT_REQ).
    if vmpl > 3:
        return CheckResult("report.vmpl", FAIL, f"VMPL is {vmpl:#x}: not a guest-requested report",
                           expected="0..3", actual=str(vmpl))
    if expected is not None and vmpl != expected:
        return CheckResult("report.vmpl", FAIL, f"VMPL is {vmpl}; expected {expected}",
                           expected=str(expected), actual=str(vmpl))
    return CheckResult("report.vmpl", PASS, f"VMPL {vmpl}", actual=str(vmpl))


@_memo
def check_chip_id(chip: bytes, masked: bool, hwid: bytes | None, product: Product) -> CheckResult:
    if masked:
        if any(chip):
            return CheckResult("report.chip_id", FAIL, "MASK_CHIP_KEY is set but CHIP_ID is not zero",
                               expected="0" * 16 + "...", actual=chip.hex()[:16] + "...")
        return CheckResult("report.chip_id", SKIP, "CHIP_ID is masked (MASK_CHIP_KEY): hwID not compared")
    if hwid is None:
        return CheckResult("report.chip_id", SKIP, "a VLEK has no hwID; CHIP_ID not compared")
    n = len(hwid)
    # Turin reports carry the 8-byte chip id in the first 8 bytes; the rest must be zero.
    if n < len(chip) and any(chip[n:]):
        return CheckResult("report.chip_id", FAIL, f"CHIP_ID bytes {n}..63 are not zero for a {product} chip",
                           expected=hwid.hex(), actual=chip.hex())
    if not hmac.compare_digest(chip[:n], hwid):
        return CheckResult("report.chip_id", FAIL, f"CHIP_ID {chip[:n].hex()[:16]}... is not the VCEK's hwID "
                           f"{hwid.hex()[:16]}...", expected=hwid.hex(), actual=chip[:n].hex())
    return CheckResult("report.chip_id", PASS, "CHIP_ID equals the VCEK hwID", actual=chip[:n].hex())


@_memo
def check_reported_tcb(cert_tcb: TcbVersion, reported: TcbVersion) -> CheckResult:
    if not cert_tcb.same(reported):
        return CheckResult("tcb.reported_matches_cert", FAIL,
                           f"the certificate's TCB ({cert_tcb}) is not REPORTED_TCB ({reported})",
                           expected=str(cert_tcb), actual=str(reported))
    return CheckResult("tcb.reported_matches_cert", PASS, f"REPORTED_TCB {reported}", actual=str(reported))


@_memo
def check_cert_le_current(cert_tcb: TcbVersion, current: TcbVersion) -> CheckResult:
    if not cert_tcb.le(current):
        worse = [k for k, v in cert_tcb.components().items() if v > current.components().get(k, -1)]
        return CheckResult("tcb.cert_le_current", FAIL,
                           f"CURRENT_TCB ({current}) is below the certificate's TCB ({cert_tcb}) in {', '.join(worse)}",
                           expected=f">= {cert_tcb}", actual=str(current))
    return CheckResult("tcb.cert_le_current", PASS, f"certificate TCB <= CURRENT_TCB ({current})", actual=str(current))


@_memo
def check_committed(committed: TcbVersion, current: TcbVersion, allow_provisional: bool) -> CheckResult:
    if committed.same(current):
        return CheckResult("tcb.committed_eq_current", PASS, "COMMITTED_TCB equals CURRENT_TCB", actual=str(current))
    msg = f"provisional firmware: COMMITTED_TCB ({committed}) differs from CURRENT_TCB ({current})"
    if allow_provisional:
        return CheckResult("tcb.committed_eq_current", WARN, msg, expected=str(current), actual=str(committed))
    return CheckResult("tcb.committed_eq_current", FAIL, msg + "; provisional firmware is not allowed",
                       expected=str(current), actual=str(committed))


@_memo
def check_unknown_bits(platform_info: int, guest_policy: int, key_info: int) -> CheckResult:
    """Flag bits no SNP ABI revision firmgate knows names: a warning here (newer firmware sets
    new bits; a parse error would refuse the newest hardware), a failure only where a policy
    forbids them (verifier.appraise.report_rules)."""
    found = [f"{word.name} bit {bit}" for word, value in
             ((PLATFORM_INFO, platform_info), (GUEST_POLICY, guest_policy), (KEY_INFO, key_info))
             for bit in word.unknown(value)]
    if found:
        return CheckResult("report.unknown_bits", WARN, "set flag bits that firmgate has no name for: "
                           + ", ".join(found), expected="no unknown bits", actual=", ".join(found))
    return CheckResult("report.unknown_bits", PASS, "every set flag bit of PLATFORM_INFO, GUEST_POLICY and KEY_INFO "
                       "is a known one", expected="no unknown bits", actual="none")


def check_report_data(report_data: bytes, expected: bytes | None) -> CheckResult | None:
    if expected is None:
        return None
    want = expected.ljust(64, b"\0")
    if len(expected) > 64 or not hmac.compare_digest(want, report_data):
        return CheckResult("report.report_data", FAIL, "REPORT_DATA is not the expected value",
                           expected=want.hex(), actual=report_data.hex())
    return CheckResult("report.report_data", PASS, "REPORT_DATA matches", actual=report_data.hex())


def cert_tcb_for(info: AmdLeafInfo, product: Product) -> TcbVersion:
    """The certificate's TCB in the chosen product's layout (an fmcSPL only counts on Turin)."""
    return info.tcb() if info.product is product else TcbVersion(
        bootloader=info.bl_spl, tee=info.tee_spl, snp=info.snp_spl, microcode=info.ucode_spl,
        fmc=info.fmc_spl if product is Product.TURIN else None)


def chain_checks(report: AttestationReport, info: AmdLeafInfo, product: Product, options: VerifyOptions,
                 intermediate_role: str | None) -> list[CheckResult]:
    """Checks fixed by the report's identity fields and the chosen chain (computed once per selection)."""
    return [
        check_signing_key(report.key_info.signing_key, info.kind, intermediate_role),
        check_product(info.product, info.product_name, report.cpuid_fam_id, report.cpuid_mod_id,
                      options.product, product),
        check_chip_id(report.chip_id, report.key_info.mask_chip_key, info.hwid, product),
    ]


def report_checks(report: AttestationReport, tcb: dict[str, TcbVersion], cert_tcb: TcbVersion,
                  options: VerifyOptions) -> list[CheckResult]:
    """Checks of the fields that vary from report to report."""
    out = [
        check_version(report.version, options.min_report_version),
        check_vmpl(report.vmpl, options.vmpl),
        check_reported_tcb(cert_tcb, tcb["reported"]),
        check_cert_le_current(cert_tcb, tcb["current"]),
        check_committed(tcb["committed"], tcb["current"], options.allow_provisional),
        check_unknown_bits(report.platform_info.raw, report.policy.raw, report.key_info.raw),
    ]
    rd = check_report_data(report.report_data, options.report_data)
    if rd is not None:
        out.append(rd)
    return out


def run_checks(report: AttestationReport, info: AmdLeafInfo, product: Product, tcb: dict[str, TcbVersion],
               options: VerifyOptions, intermediate_role: str | None,
               cert_tcb: TcbVersion | None = None) -> list[CheckResult]:
    """Every consistency check, in a stable order."""
    return chain_checks(report, info, product, options, intermediate_role) + report_checks(
        report, tcb, cert_tcb or cert_tcb_for(info, product), options)
