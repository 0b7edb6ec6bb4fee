"""One small function per policy rule -> CheckResult. No rule looks at another's result.

Each function reads the verified report (signature and chain already checked
by verifier.verify), the tenant's policy and the reference-table match, and
says pass / warn / fail / skip with the expected and actual values. Skip means
"the policy does not check this" (an absent `min_*` or list), never "passed".
Field names follow the SNP ABI spec (publication 56860, Table 23: ATTESTATION_REPORT;
Table 9: GUEST_POLICY).
"""
from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..abi.fields import TcbVersion
from ..verdict import CheckResult, Outcome
from .policy import INITDATA, TcbFloor, TenantPolicy
from .reference import Match

if TYPE_CHECKING:
    from ..abi.report import AttestationReport
    from ..verify import VerifiedReport

PASS, WARN, FAIL, SKIP = Outcome.PASS, Outcome.WARN, Outcome.FAIL, Outcome.SKIP
REPORT_DATA_SIZE = 64   # SNP ABI Table 23: REPORT_DATA is 64 bytes
HOST_DATA_SIZE = 32     # SNP ABI Table 23: HOST_DATA is 32 bytes


@dataclass(frozen=True)
class Context:
    verified: VerifiedReport
    policy: TenantPolicy
    match: Match | None
    missing_firmware: dict[str, str]     # firmware ids without measurements yet, and why
    table_size: int
    expected_report_data: bytes | None
    expected_host_data: bytes | None

    @property
    def report(self) -> AttestationReport:
        return self.verified.report


def _short(b: bytes) -> str:
    h = b.hex()
    return h if len(h) <= 24 else h[:16] + "..."


# -- platform ------------------------------------------------------------------------
def check_simulated(c: Context) -> CheckResult:
    sim = bool(getattr(c.verified, "simulated", False))
    if not sim:
        return CheckResult("platform.simulated", PASS, "the chain ends in a pinned AMD root", "AMD root", "AMD root")
    if c.policy.platform.allow_simulated_platform:
        return CheckResult("platform.simulated", WARN,
                           "SIMULATED platform (a --trust-root, not AMD): allowed by allow_simulated_platform",
                           "AMD root or simulated", "simulated")
    return CheckResult("platform.simulated", FAIL,
                       "the report chains to a simulated root, not AMD's; the policy does not set "
                       "allow_simulated_platform", "AMD root", "simulated")


def check_product(c: Context) -> CheckResult:
    products = c.policy.platform.products
    actual = str(c.verified.product)
    if products is None:
        return CheckResult("platform.product", SKIP, "products not checked (platform.products absent)", None, actual)
    want = ", ".join(str(p) for p in products)
    if any(str(p) == actual for p in products):
        return CheckResult("platform.product", PASS, f"product {actual} is allowed", want, actual)
    return CheckResult("platform.product", FAIL, f"product {actual} is not allowed (policy allows {want})", want, actual)


def check_signer(c: Context) -> CheckResult:
    signers = c.policy.platform.signers
    actual = str(c.verified.signer)
    if signers is None:
        return CheckResult("platform.signer", SKIP, "signing key kind not checked (platform.signers absent)",
                           None, actual)
    want = ", ".join(signers)
    if actual in signers:
        return CheckResult("platform.signer", PASS, f"signed by a {actual}", want, actual)
    return CheckResult("platform.signer", FAIL, f"signed by a {actual}; the policy allows {want}", want, actual)


def _tcb_floor(c: Context, which: str, name: str, label: str) -> CheckResult:
    product = c.verified.product
    floor: TcbFloor | None = c.policy.platform.floor(
        "min_tcb" if which == "reported" else "min_launch_tcb", product)
    tcb: TcbVersion = c.verified.tcb[which]
    if floor is None:
        return CheckResult(name, SKIP, f"{label} not checked (no minimum for {product})", None, str(tcb))
    comps = tcb.components()
    low = [f"{k} {comps.get(k)} below minimum {v}" for k, v in floor.items() if comps.get(k, -1) < v]
    if low:
        return CheckResult(name, FAIL, f"{label}: " + "; ".join(low), str(floor), str(tcb))
    return CheckResult(name, PASS, f"{label} {tcb} meets the minimum", str(floor), str(tcb))


def check_min_tcb(c: Context) -> CheckResult:
    return _tcb_floor(c, "reported", "tcb.min_reported", "REPORTED_TCB")


def check_min_launch_tcb(c: Context) -> CheckResult:
    return _tcb_floor(c, "launch", "tcb.min_launch", "LAUNCH_TCB")


def check_provisional(c: Context) -> CheckResult:
    r = c.report
    # Provisional SNP firmware: loaded but not committed (SNP ABI 8.2, SNP_COMMIT); CURRENT != COMMITTED.
    cur = (r.current_tcb, str(r.current_build))
    com = (r.committed_tcb, str(r.committed_build))
    actual = (f"current {c.verified.tcb['current']} ({r.current_build}), "
              f"committed {c.verified.tcb['committed']} ({r.committed_build})")
    if cur == com:
        return CheckResult("tcb.provisional", PASS, "SNP firmware is committed (CURRENT equals COMMITTED)",
                           "committed", actual)
    if c.policy.platform.allow_provisional_firmware:
        return CheckResult("tcb.provisional", WARN, "provisional SNP firmware (CURRENT differs from COMMITTED): "
                           "allowed by allow_provisional_firmware", "committed or provisional", actual)
    return CheckResult("tcb.provisional", FAIL, "provisional SNP firmware (CURRENT differs from COMMITTED) "
                       "is not allowed", "committed", actual)


# -- guest policy (GUEST_POLICY, SNP ABI Table 9) -----------------------------------
def check_debug(c: Context) -> CheckResult:
    debug = c.report.policy.debug
    if not debug:
        return CheckResult("guest.debug", PASS, "guest policy forbids debugging", "debug off", "debug off")
    if c.policy.guest.unsafe_allow_debug:
        return CheckResult("guest.debug", WARN, "guest policy allows DEBUG (the host can read guest memory): "
                           "allowed by unsafe_allow_debug", "debug on or off", "debug on")
    return CheckResult("guest.debug", FAIL, "guest policy allows DEBUG (the host can read and change guest "
                       "memory); the policy forbids debug", "debug off", "debug on")


def check_migrate_ma(c: Context) -> CheckResult:
    ma = c.report.policy.migrate_ma
    actual = "allowed" if ma else "not allowed"
    if not ma:
        return CheckResult("guest.migrate_ma", PASS, "no migration agent allowed", "not allowed", actual)
    if c.policy.guest.allow_migrate_ma:
        return CheckResult("guest.migrate_ma", PASS, "migration agent allowed, as the policy permits",
                           "allowed or not", actual)
    return CheckResult("guest.migrate_ma", FAIL, "guest policy allows a migration agent; the policy does not",
                       "not allowed", actual)


def check_smt(c: Context) -> CheckResult:
    smt = c.report.policy.smt
    actual = "allowed" if smt else "not allowed"
    if c.policy.guest.allow_smt or not smt:
        return CheckResult("guest.smt", PASS, f"SMT {actual} by the guest policy",
                           "allowed or not" if c.policy.guest.allow_smt else "not allowed", actual)
    return CheckResult("guest.smt", FAIL, "guest policy allows SMT; the policy requires SMT not allowed",
                       "not allowed", actual)


def check_single_socket(c: Context) -> CheckResult:
    ss = c.report.policy.single_socket
    actual = "required" if ss else "not required"
    if not c.policy.guest.require_single_socket:
        return CheckResult("guest.single_socket", SKIP, "single socket not checked", None, actual)
    if ss:
        return CheckResult("guest.single_socket", PASS, "guest policy requires a single socket", "required", actual)
    return CheckResult("guest.single_socket", FAIL, "guest policy does not require a single socket; "
                       "the policy does", "required", actual)


def check_abi(c: Context) -> CheckResult:
    p = c.report.policy
    actual = f"{p.abi_major}.{p.abi_minor}"
    want = c.policy.guest.min_abi
    if want is None:
        return CheckResult("guest.abi_min", SKIP, "minimum ABI not checked", None, actual)
    ws = f"{want[0]}.{want[1]}"
    if (p.abi_major, p.abi_minor) >= want:
        return CheckResult("guest.abi_min", PASS, f"guest policy ABI {actual} meets minimum {ws}", ws, actual)
    return CheckResult("guest.abi_min", FAIL, f"guest policy ABI {actual} below minimum {ws}", ws, actual)


def check_guest_svn(c: Context) -> CheckResult:
    want = c.policy.guest.min_guest_svn
    actual = c.report.guest_svn
    if want is None:
        return CheckResult("guest.svn_min", SKIP, "GUEST_SVN not checked", None, str(actual))
    if actual >= want:
        return CheckResult("guest.svn_min", PASS, f"GUEST_SVN {actual} meets minimum {want}", str(want), str(actual))
    return CheckResult("guest.svn_min", FAIL, f"GUEST_SVN {actual} below minimum {want}", str(want), str(actual))


def check_vmpl(c: Context) -> CheckResult:
    vmpls = c.policy.platform.vmpls
    actual = c.report.vmpl
    if vmpls is None:
        return CheckResult("guest.vmpl", SKIP, "VMPL not checked (platform.vmpls absent)", None, str(actual))
    want = ", ".join(map(str, vmpls))
    if actual in vmpls:
        return CheckResult("guest.vmpl", PASS, f"VMPL {actual} is allowed", want, str(actual))
    return CheckResult("guest.vmpl", FAIL, f"VMPL {actual} is not allowed (policy allows {want})", want, str(actual))


# -- firmware ---------------------------------------------------------------------------
def check_measurement(c: Context) -> CheckResult:
    m = c.report.measurement
    if c.match is not None:
        fw, shape = c.match.firmware, c.match.shape
        return CheckResult("firmware.measurement", PASS,
                           f"MEASUREMENT is firmware {fw.id} (svn {fw.svn}) with shape {shape.key()}",
                           f"{fw.id} / {shape.key()}", m.hex())
    why = f"MEASUREMENT {_short(m)} matches no allowed firmware x shape ({c.table_size} reference measurements)"
    if c.missing_firmware:
        why += "; firmware without bytes yet: " + ", ".join(sorted(c.missing_firmware))
    return CheckResult("firmware.measurement", FAIL, why, "an allowed firmware x shape", m.hex())


def check_revoked(c: Context) -> CheckResult:
    if c.match is None:
        return CheckResult("firmware.revoked", SKIP, "no firmware matched; revocation not applicable")
    fid = c.match.firmware.id
    if fid in c.policy.revoked:
        return CheckResult("firmware.revoked", FAIL, f"firmware {fid} is revoked", "not revoked", "revoked")
    return CheckResult("firmware.revoked", PASS, f"firmware {fid} is not revoked", "not revoked", "not revoked")


def check_firmware_svn(c: Context) -> CheckResult:
    want = c.policy.min_firmware_svn
    if c.match is None:
        return CheckResult("firmware.min_svn", SKIP, "no firmware matched; minimum svn not applicable",
                           None if want is None else str(want), None)
    svn = c.match.firmware.svn
    if want is None:
        return CheckResult("firmware.min_svn", SKIP, "firmware svn not checked (firmware.min_svn absent)",
                           None, str(svn))
    if svn >= want:
        return CheckResult("firmware.min_svn", PASS, f"firmware svn {svn} meets minimum {want}", str(want), str(svn))
    return CheckResult("firmware.min_svn", FAIL, f"firmware svn {svn} below minimum {want}", str(want), str(svn))


# -- bindings --------------------------------------------------------------------------
def _pad(b: bytes, size: int) -> bytes | None:
    return b.ljust(size, b"\0") if len(b) <= size else None


def check_report_data(c: Context) -> CheckResult:
    actual = c.report.report_data
    if c.expected_report_data is None:
        return CheckResult("binding.report_data", SKIP, "REPORT_DATA not checked (no expected value given)",
                           None, actual.hex())
    want = _pad(c.expected_report_data, REPORT_DATA_SIZE)
    if want is None:
        return CheckResult("binding.report_data", FAIL, f"expected REPORT_DATA is {len(c.expected_report_data)} "
                           f"bytes; at most {REPORT_DATA_SIZE}", None, actual.hex())
    if hmac.compare_digest(want, actual):
        return CheckResult("binding.report_data", PASS, "REPORT_DATA matches the expected value", want.hex(),
                           actual.hex())
    return CheckResult("binding.report_data", FAIL, f"REPORT_DATA {_short(actual)} is not the expected "
                       f"{_short(want)} (stale or replayed evidence, or another key)", want.hex(), actual.hex())


def check_host_data(c: Context) -> CheckResult:
    actual = c.report.host_data
    rule = c.policy.platform.host_data
    if isinstance(rule, bytes):
        want, source = rule, "the policy"
    elif rule == INITDATA:
        # Init-data is bound through HOST_DATA (KBS-FACTS); none sent means HOST_DATA must be zero.
        want = c.expected_host_data if c.expected_host_data is not None else bytes(HOST_DATA_SIZE)
        source = "the init-data digest" if c.expected_host_data is not None else "zero (no init-data sent)"
    elif c.expected_host_data is not None:
        want, source = c.expected_host_data, "the caller"
    else:
        return CheckResult("binding.host_data", SKIP, "HOST_DATA not checked", None, actual.hex())
    padded = _pad(want, HOST_DATA_SIZE)
    if padded is None:
        return CheckResult("binding.host_data", FAIL, f"expected HOST_DATA is {len(want)} bytes; at most "
                           f"{HOST_DATA_SIZE}", None, actual.hex())
    if hmac.compare_digest(padded, actual):
        return CheckResult("binding.host_data", PASS, f"HOST_DATA equals {source}", padded.hex(), actual.hex())
    return CheckResult("binding.host_data", FAIL, f"HOST_DATA {_short(actual)} is not {source} ({_short(padded)})",
                       padded.hex(), actual.hex())


RULES: tuple[Callable[[Context], CheckResult], ...] = (
    check_simulated, check_product, check_signer, check_min_tcb, check_min_launch_tcb, check_provisional,
    check_debug, check_migrate_ma, check_smt, check_single_socket, check_abi, check_guest_svn, check_vmpl,
    check_measurement, check_revoked, check_firmware_svn, check_report_data, check_host_data,
)


# -- owner: ID block and release binding (SNP ABI Table 23: ID_KEY_DIGEST 0xE0, AUTHOR_KEY_DIGEST 0x110,
# KEY_INFO.AUTHOR_KEY_EN bit 0; filled by the PSP from a verified ID block at SNP_LAUNCH_FINISH) ----------
def check_id_block_present(c: Context) -> CheckResult:
    actual = c.report.id_key_digest
    shown = "none (zero)" if not any(actual) else actual.hex()
    if not c.policy.id_block.require_id_block:
        return CheckResult("id_block.present", SKIP, "ID block not required (id_block.require_id_block absent)",
                           None, shown)
    if any(actual):
        return CheckResult("id_block.present", PASS, "the launch carried an ID block (ID_KEY_DIGEST is set)",
                           "an ID key digest", shown)
    return CheckResult("id_block.present", FAIL, "ID_KEY_DIGEST is zero: the VM was launched without an ID block; "
                       "the policy requires one", "an ID key digest", shown)


def check_author_key_present(c: Context) -> CheckResult:
    en = c.report.key_info.author_key_en
    actual = f"AUTHOR_KEY_EN={int(en)}"
    if not c.policy.id_block.require_author_key:
        return CheckResult("id_block.author_key_present", SKIP,
                           "author key not required (id_block.require_author_key absent)", None, actual)
    if en:
        return CheckResult("id_block.author_key_present", PASS, "the ID key was signed by an author key "
                           "(KEY_INFO.AUTHOR_KEY_EN = 1)", "AUTHOR_KEY_EN=1", actual)
    return CheckResult("id_block.author_key_present", FAIL, "KEY_INFO.AUTHOR_KEY_EN is 0: no author key signed "
                       "the ID key; the policy requires one", "AUTHOR_KEY_EN=1", actual)


def check_trusted_key(c: Context) -> CheckResult:
    """The launch's ID key, or its author key (which vouches for every ID key it signed), is trusted."""
    rules = c.policy.id_block
    r = c.report
    idk = r.id_key_digest
    auk = r.author_key_digest if r.key_info.author_key_en else None
    actual = f"ID key {idk.hex() if any(idk) else 'none'}; author key {auk.hex() if auk else 'none'}"
    if not rules.trusted_id_keys and not rules.trusted_author_keys:
        return CheckResult("id_block.trusted_key", SKIP, "ID and author keys not checked (no trusted keys in "
                           "[id_block])", None, actual)
    want = (f"ID key in {len(rules.trusted_id_keys or ())} trusted, "
            f"or author key in {len(rules.trusted_author_keys or ())} trusted")
    if any(idk):
        for k in rules.trusted_id_keys or ():
            if hmac.compare_digest(k, idk):
                return CheckResult("id_block.trusted_key", PASS, f"ID key {_short(idk)} is trusted", want, actual)
    if auk is not None and any(auk):
        for k in rules.trusted_author_keys or ():
            if hmac.compare_digest(k, auk):
                return CheckResult("id_block.trusted_key", PASS, f"author key {_short(auk)} is trusted "
                                   f"(it signed ID key {_short(idk)})", want, actual)
    if not any(idk):
        why = "the VM was launched without an ID block (ID_KEY_DIGEST is zero), so it names no owner"
    else:
        why = (f"neither ID key {_short(idk)} nor author key {_short(auk) if auk else '(none)'} is one this "
               "policy trusts: the launch was signed by someone else")
    return CheckResult("id_block.trusted_key", FAIL, why, want, actual)


def check_binding(c: Context) -> CheckResult:
    """Is the launch bound to its owner (binding.py)? Not a failure by itself: only secrets say
    `unsafe_unbound` may go to an unbound launch, and then every such verdict carries a warning."""
    from .binding import launch_binding
    if c.match is None:
        return CheckResult("binding.owner_launch", SKIP, "no firmware matched; binding not applicable")
    b = launch_binding(c.policy.platform, c.policy.id_block, c.match.firmware,
                       c.match.shape.kernel_hashes is not None)
    want = "pinned boot chain and a named owner"
    if b.bound:
        return CheckResult("binding.owner_launch", PASS, f"launch bound to its owner: {b.pinned_by}; owner named "
                           f"by {b.owner_named_by}", want, "bound")
    unsafe = [s.path for s in c.policy.secrets if s.unsafe_unbound]
    if unsafe:
        return CheckResult("binding.owner_launch", WARN, f"UNSAFE: launch NOT bound to its owner ({b.missing()}); "
                           f"secrets marked unsafe_unbound may still go to it: {', '.join(unsafe)}", want, "unbound")
    return CheckResult("binding.owner_launch", SKIP, f"launch not bound to its owner ({b.missing()}); "
                       "no secret of this policy is released to it", want, "unbound")


RULES = RULES + (check_id_block_present, check_author_key_present, check_trusted_key, check_binding)
