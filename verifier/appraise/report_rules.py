"""The `[report]` section of a policy: rules on report fields, one per go-sev-guest `validate.Options` check.

go-sev-guest's validate.Options is the public model of what a relying party may
ask of an SNP report; the rules it has that firmgate's other sections do not
live here (docs/policy.md, "The [report] section"). Each is optional: absent
means "not checked" and the verdict shows it as skipped. Each gives one named
check that says what it compared.

| key                            | report field (SNP ABI 56860, Table 23)        | check                    |
|--------------------------------|-----------------------------------------------|--------------------------|
| family_ids, image_ids          | FAMILY_ID, IMAGE_ID (from the ID block)       | guest.family_id/image_id |
| migration_agent                | REPORT_ID_MA ("none": all ones, no MA)        | guest.migration_agent    |
| chip_ids                       | CHIP_ID (Turin: first 8 bytes, rest zero)     | platform.chip_id         |
| min_current_firmware           | CURRENT_MAJOR.CURRENT_MINOR.CURRENT_BUILD     | platform.firmware_current|
| min_committed_firmware         | COMMITTED_MAJOR.COMMITTED_MINOR.COMMITTED_BUILD | platform.firmware_committed |
| [report.platform_info]         | PLATFORM_INFO, every named bit + unknown bits | platform.platform_info   |
| [report.guest_policy]          | GUEST_POLICY bits 21-25 + unknown bits        | guest.policy_bits        |
| [report.key_info]              | KEY_INFO.MASK_CHIP_KEY + unknown bits         | guest.key_info           |
| [report.mitigations]           | CURRENT_MIT_VECTOR / LAUNCH_MIT_VECTOR (v5)   | platform.mitigations     |

Differences from go-sev-guest, on purpose: the firmware minimum compares
(major, minor, build) as one version (go-sev-guest compares the build number on
its own, which refuses a newer firmware version whose build counter restarted);
a bit rule says "required" or "forbidden" per bit instead of a "maximum" word.
Trusted ID/author keys and "require an ID block" are not here (the owner-bound
release rules own them).

The checks are pure functions of the report's plain values and the frozen rules,
memoised like verifier.snpchecks: a broker sees the same few values again and again.
"""
from __future__ import annotations

import functools
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..abi.flags import (
    GUEST_POLICY,
    GUEST_POLICY_NEWER,
    KEY_INFO,
    PLATFORM_INFO,
    FlagWord,
    set_bit_numbers,
)
from ..certs import Lru
from ..verdict import CheckResult, Outcome
from .policy import P, _Errors, _hexbytes, _int, _list, _str, _table

if TYPE_CHECKING:
    from ..abi.report import AttestationReport
    from .checks import Context

PASS, WARN, FAIL, SKIP = Outcome.PASS, Outcome.WARN, Outcome.FAIL, Outcome.SKIP
NO_MIGRATION_AGENT = "none"
REPORT_ID_MA_NONE = b"\xff" * 32     # REPORT_ID_MA of a guest without a migration agent (all ones)
REQUIRED, FORBIDDEN, ANY = "required", "forbidden", "any"
UNKNOWN_KEY = "unknown_bits"          # in a bit table: "forbidden" or "allowed" (default: allowed, warned)
CHIP_ID_SIZES = (8, 64)               # Turin's chip id is 8 bytes; Milan/Genoa 64
_memo = functools.lru_cache(maxsize=2048)

Version = tuple[int, int, int]        # (major, minor, build)


@dataclass(frozen=True)
class BitRules:
    """Per-bit rules for one flag word; bits not named are not checked."""

    required: tuple[str, ...] = ()
    forbidden: tuple[str, ...] = ()
    forbid_unknown: bool = False

    @property
    def empty(self) -> bool:
        return not (self.required or self.forbidden or self.forbid_unknown)


@dataclass(frozen=True)
class ReportRules:
    family_ids: tuple[bytes, ...] | None = None
    image_ids: tuple[bytes, ...] | None = None
    migration_agent: bytes | None = None          # expected REPORT_ID_MA (REPORT_ID_MA_NONE for "none")
    chip_ids: tuple[bytes, ...] | None = None      # each 64 bytes (an 8-byte Turin id zero-padded)
    min_current_firmware: Version | None = None
    min_committed_firmware: Version | None = None
    platform_info: BitRules = BitRules()
    guest_policy: BitRules = BitRules()
    key_info: BitRules = BitRules()
    mitigations_current: tuple[int, ...] | None = None
    mitigations_launch: tuple[int, ...] | None = None


NO_RULES = ReportRules()


# -- parsing ---------------------------------------------------------------------------
def _version(errs: _Errors, path: P, v: Any) -> Version | None:
    s = _str(errs, path, v)
    if s is None:
        return None
    m = re.fullmatch(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})", s)
    if not m or any(int(x) > 255 for x in m.groups()):
        errs.add(path, f'must be "MAJOR.MINOR.BUILD" (each 0-255), e.g. "1.55.40", not {s!r}')
        return None
    return int(m[1]), int(m[2]), int(m[3])


def _ids(errs: _Errors, path: P, v: Any, size: int, what: str) -> tuple[bytes, ...]:
    def one(q: P, x: Any) -> bytes | None:
        h = _hexbytes(errs, q, x, size, what)
        return bytes.fromhex(h) if h is not None else None
    return tuple(_list(errs, path, v, one))


def _chip_ids(errs: _Errors, path: P, v: Any) -> tuple[bytes, ...]:
    def one(q: P, x: Any) -> bytes | None:
        s = _str(errs, q, x)
        if s is None:
            return None
        if not re.fullmatch(r"[0-9a-fA-F]*", s) or len(s) not in (2 * n for n in CHIP_ID_SIZES):
            errs.add(q, "a chip id is 128 hex digits (64 bytes), or 16 (8 bytes, Turin)")
            return None
        return bytes.fromhex(s).ljust(64, b"\0")
    return tuple(_list(errs, path, v, one))


def _bits(errs: _Errors, path: P, v: Any, word: FlagWord, allowed: tuple[str, ...], hint: str) -> BitRules:
    # Bits of the word ruled elsewhere pass _table and get their own message below.
    t = _table(errs, path, v, set(word.names) | {UNKNOWN_KEY})
    required: list[str] = []
    forbidden: list[str] = []
    forbid_unknown = False
    for name, x in t.items():
        if name not in allowed and name != UNKNOWN_KEY:
            if name in word.names:
                errs.add(path + (name,), f"{word.name} bit {name!r} is not ruled here ({hint})")
            continue   # an unknown key: _table said so
        s = _str(errs, path + (name,), x)
        if s is None:
            continue
        if name == UNKNOWN_KEY:
            if s not in (FORBIDDEN, "allowed"):
                errs.add(path + (name,), f'must be "forbidden" or "allowed", not {s!r}')
            forbid_unknown = s == FORBIDDEN
        elif s == REQUIRED:
            required.append(name)
        elif s == FORBIDDEN:
            forbidden.append(name)
        elif s != ANY:
            errs.add(path + (name,), f'must be "required", "forbidden" or "any", not {s!r}')
    return BitRules(tuple(required), tuple(forbidden), forbid_unknown)


def _mit_bits(errs: _Errors, path: P, v: Any) -> tuple[int, ...]:
    return tuple(sorted(set(_list(errs, path, v, lambda q, x: _int(errs, q, x, 0, 63)))))


def parse_report_rules(errs: _Errors, doc: dict[str, Any]) -> ReportRules:
    """The `[report]` table of a policy document (absent: nothing checked). Errors go to `errs`."""
    if "report" not in doc:
        return NO_RULES
    p: P = ("report",)
    t = _table(errs, p, doc["report"], {"family_ids", "image_ids", "migration_agent", "chip_ids",
                                        "min_current_firmware", "min_committed_firmware", "platform_info",
                                        "guest_policy", "key_info", "mitigations"})
    kw: dict[str, Any] = {}
    for key, what in (("family_ids", "FAMILY_ID"), ("image_ids", "IMAGE_ID")):
        if key in t:
            kw[key] = _ids(errs, p + (key,), t[key], 16, what)
    if "migration_agent" in t:
        v = t["migration_agent"]
        if v == NO_MIGRATION_AGENT:
            kw["migration_agent"] = REPORT_ID_MA_NONE
        else:
            h = _hexbytes(errs, p + ("migration_agent",), v, 32, f'REPORT_ID_MA (or "{NO_MIGRATION_AGENT}")')
            if h is not None:
                kw["migration_agent"] = bytes.fromhex(h)
    if "chip_ids" in t:
        kw["chip_ids"] = _chip_ids(errs, p + ("chip_ids",), t["chip_ids"])
    for key in ("min_current_firmware", "min_committed_firmware"):
        if key in t:
            kw[key] = _version(errs, p + (key,), t[key])
    if "platform_info" in t:
        kw["platform_info"] = _bits(errs, p + ("platform_info",), t["platform_info"], PLATFORM_INFO,
                                    PLATFORM_INFO.names, "")
    if "guest_policy" in t:
        kw["guest_policy"] = _bits(errs, p + ("guest_policy",), t["guest_policy"], GUEST_POLICY, GUEST_POLICY_NEWER,
                                   "smt, migrate_ma, debug and single_socket have rules in [guest]")
    if "key_info" in t:
        kw["key_info"] = _bits(errs, p + ("key_info",), t["key_info"], KEY_INFO, ("mask_chip_key",),
                               "author keys are ruled with the trusted ID/author keys")
    if "mitigations" in t:
        m = _table(errs, p + ("mitigations",), t["mitigations"], {"current", "launch"})
        if "current" in m:
            kw["mitigations_current"] = _mit_bits(errs, p + ("mitigations", "current"), m["current"])
        if "launch" in m:
            kw["mitigations_launch"] = _mit_bits(errs, p + ("mitigations", "launch"), m["launch"])
    return ReportRules(**{k: v for k, v in kw.items() if v is not None})


# -- checks ----------------------------------------------------------------------------------
def _hexlist(values: tuple[bytes, ...]) -> str:
    return ", ".join(v.hex() for v in values)


def _short(b: bytes) -> str:
    h = b.hex()
    return h if len(h) <= 24 else h[:16] + "..."


@_memo
def _allow_list(name: str, field: str, actual: bytes, allowed: tuple[bytes, ...] | None) -> CheckResult:
    if allowed is None:
        return CheckResult(name, SKIP, f"{field} not checked", None, actual.hex())
    ok = False
    for want in allowed:       # every entry compared, in constant time each
        ok |= hmac.compare_digest(want, actual)
    if ok:
        return CheckResult(name, PASS, f"{field} {_short(actual)} is allowed", _hexlist(allowed), actual.hex())
    return CheckResult(name, FAIL, f"{field} {_short(actual)} is not one the policy allows "
                       f"({len(allowed)} listed)", _hexlist(allowed), actual.hex())


def check_family_id(r: AttestationReport, rules: ReportRules) -> CheckResult:
    return _allow_list("guest.family_id", "FAMILY_ID", r.family_id, rules.family_ids)


def check_image_id(r: AttestationReport, rules: ReportRules) -> CheckResult:
    return _allow_list("guest.image_id", "IMAGE_ID", r.image_id, rules.image_ids)


def check_chip_id(r: AttestationReport, rules: ReportRules) -> CheckResult:
    res = _allow_list("platform.chip_id", "CHIP_ID", r.chip_id, rules.chip_ids)
    if res.outcome is FAIL and not any(r.chip_id):
        return CheckResult(res.name, FAIL, "CHIP_ID is masked (all zero): the chip cannot be matched against "
                           "the allowed chip ids", res.expected, res.actual)
    return res


@_memo
def _migration_agent(actual: bytes, want: bytes | None) -> CheckResult:
    name = "guest.migration_agent"
    if want is None:
        return CheckResult(name, SKIP, "REPORT_ID_MA not checked", None, actual.hex())
    label = "no migration agent (all ones)" if want == REPORT_ID_MA_NONE else want.hex()
    if hmac.compare_digest(want, actual):
        return CheckResult(name, PASS, f"REPORT_ID_MA is {label}", want.hex(), actual.hex())
    seen = "no migration agent" if actual == REPORT_ID_MA_NONE else f"migration agent {_short(actual)}"
    return CheckResult(name, FAIL, f"REPORT_ID_MA says {seen}; the policy expects {label}", want.hex(), actual.hex())


def check_migration_agent(r: AttestationReport, rules: ReportRules) -> CheckResult:
    return _migration_agent(r.report_id_ma, rules.migration_agent)


@_memo
def _firmware_min(name: str, field: str, actual: Version, want: Version | None) -> CheckResult:
    a = ".".join(map(str, actual))
    if want is None:
        return CheckResult(name, SKIP, f"{field} firmware version not checked", None, a)
    w = ".".join(map(str, want))
    if actual >= want:
        return CheckResult(name, PASS, f"{field} SNP firmware {a} meets the minimum {w}", f">= {w}", a)
    return CheckResult(name, FAIL, f"{field} SNP firmware {a} is below the minimum {w}", f">= {w}", a)


def check_firmware_current(r: AttestationReport, rules: ReportRules) -> CheckResult:
    b = r.current_build
    return _firmware_min("platform.firmware_current", "CURRENT", (b.major, b.minor, b.build), rules.min_current_firmware)


def check_firmware_committed(r: AttestationReport, rules: ReportRules) -> CheckResult:
    b = r.committed_build
    return _firmware_min("platform.firmware_committed", "COMMITTED", (b.major, b.minor, b.build),
                         rules.min_committed_firmware)


@_memo
def _bit_rules(name: str, word: FlagWord, value: int, rules: BitRules) -> CheckResult:
    actual = f"0x{value:x} (set: {', '.join(word.set_names(value)) or 'none'}"
    unknown = word.unknown(value)
    actual += f"; unknown bits: {', '.join(map(str, unknown))})" if unknown else ")"
    if rules.empty:
        return CheckResult(name, SKIP, f"{word.name} bits not checked", None, actual)
    want = [f"{n} set" for n in rules.required] + [f"{n} clear" for n in rules.forbidden]
    if rules.forbid_unknown:
        want.append("no unknown bits")
    bad = [f"{n} is clear but required" for n in rules.required if not value >> word.bit_of(n) & 1]
    bad += [f"{n} is set but forbidden" for n in rules.forbidden if value >> word.bit_of(n) & 1]
    if rules.forbid_unknown and unknown:
        bad.append(f"unknown bit{'s' if len(unknown) > 1 else ''} {', '.join(map(str, unknown))} set; "
                   "the policy forbids unknown bits")
    if bad:
        return CheckResult(name, FAIL, f"{word.name} 0x{value:x}: " + "; ".join(bad), ", ".join(want), actual)
    return CheckResult(name, PASS, f"{word.name} 0x{value:x}: " + ", ".join(want), ", ".join(want), actual)


def check_platform_info(r: AttestationReport, rules: ReportRules) -> CheckResult:
    return _bit_rules("platform.platform_info", PLATFORM_INFO, r.platform_info.raw, rules.platform_info)


def check_guest_policy_bits(r: AttestationReport, rules: ReportRules) -> CheckResult:
    return _bit_rules("guest.policy_bits", GUEST_POLICY, r.policy.raw, rules.guest_policy)


def check_key_info(r: AttestationReport, rules: ReportRules) -> CheckResult:
    return _bit_rules("guest.key_info", KEY_INFO, r.key_info.raw, rules.key_info)


@_memo
def _mitigations(version: int, current: int | None, launch: int | None, want_current: tuple[int, ...] | None,
                 want_launch: tuple[int, ...] | None) -> CheckResult:
    name = "platform.mitigations"

    def show(v: int | None) -> str:
        return "absent" if v is None else ",".join(map(str, set_bit_numbers(v))) or "none"
    actual = f"current bits {show(current)}; launch bits {show(launch)}"
    if want_current is None and want_launch is None:
        return CheckResult(name, SKIP, "mitigation vectors not checked", None, actual)
    want = "; ".join(f"{label} bits {','.join(map(str, bits))}" for label, bits in
                     (("current", want_current), ("launch", want_launch)) if bits is not None)
    if current is None or launch is None:
        return CheckResult(name, FAIL, f"the policy requires mitigation bits, but a version {version} report has no "
                           "mitigation vectors (version 5 and later)", want, actual)
    bad = [f"{label.upper()}_MIT_VECTOR lacks bit{'s' if len(miss) > 1 else ''} {', '.join(map(str, miss))}"
           for label, bits, value in (("current", want_current, current), ("launch", want_launch, launch))
           if bits is not None and (miss := [b for b in bits if not value >> b & 1])]
    if bad:
        return CheckResult(name, FAIL, "; ".join(bad), want, actual)
    return CheckResult(name, PASS, f"required mitigations present ({want})", want, actual)


def check_mitigations(r: AttestationReport, rules: ReportRules) -> CheckResult:
    return _mitigations(r.version, r.current_mit_vector, r.launch_mit_vector, rules.mitigations_current,
                        rules.mitigations_launch)


REPORT_CHECKS: tuple[Callable[[AttestationReport, ReportRules], CheckResult], ...] = (
    check_family_id, check_image_id, check_migration_agent, check_chip_id, check_firmware_current,
    check_firmware_committed, check_platform_info, check_guest_policy_bits, check_key_info, check_mitigations,
)


# (id(rules), the report values the rules read) -> (rules, results). Keyed by the identity of the
# rules (a policy's rules live as long as the policy; hashing the nested frozen values on every
# call would cost more than the checks); the entry holds the rules, so the id stays theirs.
_RUN_CACHE = Lru(1024)


def run_report_rules(report: AttestationReport, rules: ReportRules) -> list[CheckResult]:
    """Every [report] rule on one report, in a stable order (all run; no short-circuit)."""
    key = (id(rules), report.version, report.family_id, report.image_id, report.report_id_ma, report.chip_id,
           report.current_build, report.committed_build, report.platform_info.raw, report.policy.raw,
           report.key_info.raw, report.current_mit_vector, report.launch_mit_vector)
    hit = _RUN_CACHE.get(key)
    if hit is not None and hit[0] is rules:
        return list(hit[1])
    out = [check(report, rules) for check in REPORT_CHECKS]
    _RUN_CACHE.put(key, (rules, tuple(out)))
    return out


def _on_context(check: Callable[[AttestationReport, ReportRules], CheckResult]) -> Callable[[Context], CheckResult]:
    def rule(c: Context) -> CheckResult:
        return check(c.report, getattr(c.policy, "report_rules", None) or NO_RULES)
    rule.__name__ = check.__name__
    return rule


# The appraisal's form (verifier.appraise.appraise runs these after checks.RULES).
RULES: tuple[Callable[[Context], CheckResult], ...] = tuple(_on_context(c) for c in REPORT_CHECKS)
