"""APPRAISE: a verified report + the tenant's policy in force -> Verdict.

Every rule runs (no short-circuit) and gives one named CheckResult; the verdict
keeps the verification's own checks first, so one list explains everything.
The facts carry what an attestation result needs: status (affirming / warning /
contraindicated), the AR4SI trustworthiness vector, the matched firmware and
shape, product, signer, TCB, the policy's id and commit, and whether the
platform was simulated.

AR4SI: draft-ietf-rats-ar4si, section 2.3 (trustworthiness claims and their
integer codes): 0 no claim; 2 affirming; 32..95 warning; 96..127 contraindicated.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any

from ..endorse.admit import recheck
from ..errors import FirmgateError
from ..verdict import CheckResult, Outcome, Verdict
from .binding import launch_binding
from .checks import RULES, Context
from .reference import split_firmware
from .report_rules import RULES as REPORT_RULES
from .store import LoadedPolicy, PolicyStore

log = logging.getLogger("firmgate.appraise")

AFFIRMING, WARNING, CONTRAINDICATED = "affirming", "warning", "contraindicated"
TRUST_CLAIMS = ("instance-identity", "configuration", "executables", "file-system", "hardware",
                "runtime-opaque", "storage-opaque", "sourced-data")

# Which AR4SI claim each check speaks to (checks not listed count towards "hardware":
# they are the verification's chain / TCB / product checks).
_CLAIM_OF: dict[str, str] = {
    "report.signature": "instance-identity", "report.chip_id": "instance-identity",
    "binding.report_data": "instance-identity", "report.report_data": "instance-identity",
    "firmware.measurement": "executables", "firmware.revoked": "executables", "firmware.min_svn": "executables",
    "firmware.supplied": "executables", "firmware.endorsement": "executables",
    "guest.debug": "runtime-opaque",
    "guest.migrate_ma": "configuration", "guest.smt": "configuration", "guest.single_socket": "configuration",
    "guest.abi_min": "configuration", "guest.svn_min": "configuration", "guest.vmpl": "configuration",
    "report.vmpl": "configuration", "binding.host_data": "configuration", "tcb.provisional": "configuration",
    "tcb.committed_eq_current": "configuration",
    # the owner's ID block names who launched it; the binding says what runs after the firmware is pinned
    "id_block.present": "instance-identity", "id_block.author_key_present": "instance-identity",
    "id_block.trusted_key": "instance-identity", "binding.owner_launch": "executables",
    "guest.family_id": "configuration", "guest.image_id": "configuration", "guest.migration_agent": "configuration",
    "guest.policy_bits": "configuration", "guest.key_info": "configuration",
}
# AR4SI codes per claim: (affirming, warning, contraindicated)
_CODES: dict[str, tuple[int, int, int]] = {
    "instance-identity": (2, 2, 96),   # 2 recognised, 96 not recognised (no warning tier defined)
    "configuration": (2, 32, 96),      # 2 approved, 32 known vulnerabilities / unsafe-but-allowed, 96 unsupportable
    "executables": (2, 32, 96),        # 2 approved executables only, 96 unrecognised or forbidden
    "hardware": (2, 32, 96),           # 2 genuine, 32 known vulnerabilities (e.g. simulated, allowed), 96 contraindicated
    "runtime-opaque": (2, 32, 96),     # 2 encrypted memory; debug on makes memory readable by the host
}


_BY_RANK = (Outcome.SKIP, Outcome.PASS, Outcome.WARN, Outcome.FAIL)


def _rank(o: Outcome) -> int:
    # Identity tests: hashing an Enum member (a dict lookup) runs Python code, this runs none.
    return 3 if o is Outcome.FAIL else 2 if o is Outcome.WARN else 1 if o is Outcome.PASS else 0


def trust_vector(checks: tuple[CheckResult, ...]) -> dict[str, int]:
    """AR4SI vector: the worst outcome of the checks bearing on each claim; 0 = no claim made."""
    worst: dict[str, int] = {}
    for c in checks:
        claim = _CLAIM_OF.get(c.name, "hardware")
        rank = _rank(c.outcome)
        if rank > worst.get(claim, 0):
            worst[claim] = rank
    out: dict[str, int] = {}
    for claim in TRUST_CLAIMS:
        o = _BY_RANK[worst.get(claim, 0)]
        if o is Outcome.SKIP or claim not in _CODES:
            out[claim] = 0
        else:
            a, w, x = _CODES[claim]
            out[claim] = a if o is Outcome.PASS else w if o is Outcome.WARN else x
    return out


def status_of(checks: tuple[CheckResult, ...]) -> str:
    if not checks or any(c.outcome is Outcome.FAIL for c in checks):
        return CONTRAINDICATED
    if any(c.outcome is Outcome.WARN for c in checks):
        return WARNING
    return AFFIRMING


def snp_claims(report: Any, reported: Any | None) -> dict[str, Any]:
    """The `snp` part of an EAR's annotated evidence, with the claim names Trustee's SNP verifier uses."""
    pol = report.policy
    out: dict[str, Any] = {
        "measurement": report.measurement.hex(),
        "report_data": report.report_data.hex(),
        "host_data": report.host_data.hex(),
        "chip_id": report.chip_id.hex(),
        "guest_svn": report.guest_svn,
        "vmpl": report.vmpl,
        "policy_abi_major": pol.abi_major,
        "policy_abi_minor": pol.abi_minor,
        "policy_smt_allowed": pol.smt,
        "policy_migrate_ma": pol.migrate_ma,
        "policy_debug_allowed": pol.debug,
        "policy_single_socket": pol.single_socket,
        "platform_smt_enabled": report.platform_info.smt_en,
        "platform_tsme_enabled": report.platform_info.tsme_en,
    }
    if reported is not None:
        for k, v in reported.components().items():
            out[f"reported_tcb_{k}"] = v
    return out


def _root_name(verified: Any) -> str | None:
    """The CN of the chain's root (AMD's ARK, or a --trust-root), as plain verification shows it."""
    from ..certs import common_name
    root = getattr(verified, "root", None)
    return common_name(root) if root is not None else None


def _supplied_check(loaded: LoadedPolicy, firmware: bytes, endorsements: tuple[bytes, ...] = (),
                    now: int | None = None) -> CheckResult:
    """Firmware bytes that came with the evidence: extracted, accepted if the policy lists their digest,
    or if a publisher it trusts endorsed them (an add-on's `.corim` sections, or `endorsements`) and
    the endorsement is valid at `now` (None: the current time)."""
    try:
        payload, carried = split_firmware(firmware)
        if loaded.policy.firmware_by_digest(hashlib.sha384(payload).hexdigest()) is None and loaded.policy.publishers:
            adm = loaded.table.add_endorsed(payload, carried + tuple(endorsements), now)
            e = adm.endorsement
            return CheckResult("firmware.supplied", Outcome.PASS, f"firmware sent with the evidence is {e.fwid} "
                               f"(svn {e.svn}), endorsed by publisher {adm.publisher} (endorsement {e.id}); "
                               "its measurements were recomputed and added", e.sha384, e.sha384)
        fw = loaded.add_firmware_bytes(firmware)
    except FirmgateError as exc:
        return CheckResult("firmware.supplied", Outcome.FAIL, f"firmware sent with the evidence refused: "
                           f"{exc.diagnostics()}", "an allowed firmware digest", None)
    return CheckResult("firmware.supplied", Outcome.PASS, f"firmware sent with the evidence is {fw.id} "
                       f"(svn {fw.svn}); its measurements were added", fw.sha384, fw.sha384)


def _endorsement_check(loaded: LoadedPolicy, sha384: str, now: int | None = None) -> CheckResult | None:
    """For a build admitted on an endorsement: is that admission good at `now` (None: the current time;
    its validity, revocation, the publisher's constraints under the policy in force)? None for a build
    listed by digest."""
    entry = loaded.table.endorsed(sha384)
    if entry is None:
        return None
    adm = entry[1]
    e = adm.endorsement
    why = recheck(loaded.policy.publishers, adm, now)
    if why is not None:
        return CheckResult("firmware.endorsement", Outcome.FAIL, why, "a valid endorsement", e.id)
    return CheckResult("firmware.endorsement", Outcome.PASS, f"firmware {e.fwid} (svn {e.svn}) is endorsed by "
                       f"publisher {adm.publisher} (endorsement {e.id}, valid until {adm.to_dict()['not_after']})",
                       "a valid endorsement", e.id)


def appraise(verified: Any, loaded: LoadedPolicy, *, expected_report_data: bytes | None = None,
             expected_host_data: bytes | None = None, supplied_firmware: bytes | None = None,
             supplied_endorsements: tuple[bytes, ...] = (), now: int | None = None) -> Verdict:
    """Every rule of `loaded`'s policy applied to `verified` (a verifier.verify.VerifiedReport).

    Never raises for a rejection: the reasons are the verdict's failed checks.
    `supplied_firmware`: an add-on (or image) sent with the evidence; added to the
    reference table first if its digest is allowed.
    `now` (Unix seconds; None: the current time): when endorsements must be valid, the time
    `firmgate verify --at` also checks the certificates at.
    """
    report = verified.report
    pre: list[CheckResult] = []
    if supplied_firmware is not None:
        pre.append(_supplied_check(loaded, supplied_firmware, supplied_endorsements, now))
    table = loaded.table
    match = table.lookup(report.measurement)
    ctx = Context(verified=verified, policy=loaded.policy, match=match, missing_firmware=dict(table.missing),
                  table_size=len(table), expected_report_data=expected_report_data,
                  expected_host_data=expected_host_data)
    results: list[CheckResult] = list(getattr(verified, "checks", ())) + pre
    for rule in RULES + REPORT_RULES:
        try:
            results.append(rule(ctx))
        except Exception as exc:  # a rule bug must fail closed and name itself, never crash the broker
            log.exception("rule %s raised", rule.__name__)
            results.append(CheckResult("rule." + rule.__name__.removeprefix("check_"), Outcome.FAIL,
                                       f"rule could not be evaluated: {type(exc).__name__}"))
    endorsed = _endorsement_check(loaded, match.firmware.sha384, now) if match is not None else None
    if endorsed is not None:
        results.append(endorsed)
    checks = tuple(results)
    status = status_of(checks)
    tcb = getattr(verified, "tcb", {}) or {}
    facts: dict[str, Any] = {
        "status": status,
        "trust_vector": trust_vector(checks),
        "tenant": loaded.tenant,
        "policy": {"id": loaded.policy_id, "tenant": loaded.tenant, "commit": loaded.commit, "dirty": loaded.dirty,
                   "sha256": loaded.digest},
        "firmware": None if match is None else {"id": match.firmware.id, "svn": match.firmware.svn,
                                                "sha384": match.firmware.sha384},
        "endorsement": _endorsement_facts(loaded, match),
        "shape": None if match is None else match.shape.key(),
        "product": str(verified.product),
        "signer": str(verified.signer),
        "simulated": bool(getattr(verified, "simulated", False)),
        "report_version": report.version,
        "root": _root_name(verified),
        "measurement": report.measurement.hex(),
        "tcb": {k: v.to_dict() for k, v in tcb.items()},
        "report_data": report.report_data.hex(),
        "host_data": report.host_data.hex(),
        "snp": snp_claims(report, tcb.get("reported")),
        "reasons": [c.message for c in checks if c.outcome is Outcome.FAIL],
        "binding": None if match is None else launch_binding(
            loaded.policy.platform, loaded.policy.id_block, match.firmware,
            match.shape.kernel_hashes is not None).to_dict(),
    }
    return Verdict(checks=checks, evidence_sha384=hashlib.sha384(report.raw).hexdigest(),
                   policy_id=loaded.policy_id, facts=facts)


def _endorsement_facts(loaded: LoadedPolicy, match: Any) -> dict[str, Any] | None:
    """Which publisher and endorsement admitted the matched firmware (None: listed by digest, or no match)."""
    entry = loaded.table.endorsed(match.firmware.sha384) if match is not None else None
    return None if entry is None else entry[1].to_dict()


def release_allowed(loaded: LoadedPolicy, verdict: Verdict, resource_path: str) -> tuple[bool, str]:
    """May the firmware this verdict matched receive `resource_path`, under the policy in force NOW?

    The verdict may be minutes old (a bearer token): revocation and minimum svn are re-read
    from `loaded`, so a policy change takes effect on the next resource request.
    A secret goes only to a launch bound to its owner (binding.py), unless it says
    `unsafe_unbound`; then the reason starts with UNSAFE_UNBOUND_PREFIX (the audit row keeps it).
    """
    if not verdict.accepted:
        return False, "the attestation was not accepted"
    facts = verdict.facts or {}
    if facts.get("tenant") != loaded.tenant:
        return False, "the attestation was appraised for another tenant"
    rule = loaded.policy.secret(resource_path)
    if rule is None:
        return False, f"the policy of tenant {loaded.tenant} lists no secret {resource_path}"
    fwf = facts.get("firmware") or {}
    fid, digest = fwf.get("id"), fwf.get("sha384")
    if not isinstance(fid, str) or not isinstance(digest, str):
        return False, "the attestation matched no firmware"
    fw = loaded.policy.firmware_by_id(fid)
    if fw is None or fw.sha384 != digest:
        # Admitted on an endorsement: the admission is re-checked under the policy in force now.
        endorsed = loaded.table.endorsed(digest)
        if endorsed is None or endorsed[0].id != fid:
            return False, f"firmware {fid} is no longer allowed by the policy"
        fw, why = endorsed[0], recheck(loaded.policy.publishers, endorsed[1])
        if why is not None:
            return False, why
    if fw.id in loaded.policy.revoked:
        return False, f"firmware {fid} is revoked"
    if loaded.policy.min_firmware_svn is not None and fw.svn < loaded.policy.min_firmware_svn:
        return False, f"firmware svn {fw.svn} below minimum {loaded.policy.min_firmware_svn}"
    if rule.firmware is not None and fid not in rule.firmware:
        return False, f"firmware {fid} may not receive {resource_path} (allowed: {', '.join(rule.firmware)})"
    if rule.min_svn is not None and fw.svn < rule.min_svn:
        return False, f"firmware svn {fw.svn} below minimum {rule.min_svn} for {resource_path}"
    ok = f"firmware {fid} (svn {fw.svn}) may receive {resource_path}"
    if _bound(verdict):
        return True, ok
    if rule.unsafe_unbound:
        return True, (f"{UNSAFE_UNBOUND_PREFIX} launch not bound to its owner, released because "
                      f"{resource_path} says unsafe_unbound = true; {ok}")
    return False, (f"the launch is not bound to its owner, and {resource_path} may go only to a bound launch "
                   "(kernel hashes or an enforces_boot_chain firmware, and a trusted ID/author key or HOST_DATA)")


UNSAFE_UNBOUND_PREFIX = "WARNING unsafe_unbound:"


def _bound(verdict: Verdict) -> bool:
    """Bound by the verdict's own facts AND its binding check passed (a verdict cached before
    binding existed has neither: unbound, fail closed). The owner-naming checks the binding
    relies on passed too, or the verdict would not be accepted."""
    b = (verdict.facts or {}).get("binding")
    passed = any(c.name == "binding.owner_launch" and c.outcome is Outcome.PASS for c in verdict.checks)
    return isinstance(b, dict) and b.get("bound") is True and passed


def appraise_evidence(data: bytes, options: Any, store_or_loaded: PolicyStore | LoadedPolicy, tenant: str | None = None,
                      *, expected_report_data: bytes | None = None, expected_host_data: bytes | None = None,
                      firmware: bytes | None = None, endorsements: tuple[bytes, ...] = ()) -> Verdict:
    """Parse + verify (raising EvidenceError / TrustError / FetchError as verify_report does), then appraise.

    `data`: a raw report or any evidence JSON `verifier.evidence.load_evidence` reads.
    `store_or_loaded`: a PolicyStore (then `tenant` is required) or one LoadedPolicy.
    `firmware`: add-on or image bytes sent with the evidence (see appraise's supplied_firmware).
    """
    from ..evidence import load_evidence
    from ..verify import verify_report
    if isinstance(store_or_loaded, PolicyStore):
        if tenant is None:
            raise FirmgateError("a tenant is needed to pick the policy")
        loaded = store_or_loaded.get(tenant)
    else:
        loaded = store_or_loaded
        if tenant is not None and tenant != loaded.tenant:
            raise FirmgateError(f"policy is for tenant {loaded.tenant!r}, not {tenant!r}")
    verified = verify_report(load_evidence(data), options)
    at = getattr(options, "now", None)  # endorsements are judged when the certificates are
    return appraise(verified, loaded, expected_report_data=expected_report_data,
                    expected_host_data=expected_host_data, supplied_firmware=firmware,
                    supplied_endorsements=endorsements, now=None if at is None else int(at.timestamp()))
