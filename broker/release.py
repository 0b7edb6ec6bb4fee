"""RELEASE: whether a resource goes to a session, decided from data only (no Flask here).

The broker hands in the tenant's appraisal Verdict of the session's evidence
(computed with the tenant's CURRENT policy, so a policy change that revokes a
firmware takes effect at the next request) and the policy's answer for this
resource path. A denial carries `reason` (for the audit log) and `detail` (for
the requester). The requester of a policy denial reads only `public_denial`: the
failed checks describe the policy of the repository it asked for, which may be
another tenant's.
"""
from __future__ import annotations

from dataclasses import dataclass

from verifier.verdict import Verdict


@dataclass(frozen=True)
class ReleaseDecision:
    allowed: bool
    reason: str                  # for the audit log
    variant: str = "PolicyDeny"  # KBS error variant when denied
    detail: str = ""             # for the requester; "" = same as reason

    @property
    def public(self) -> str:
        return self.detail or self.reason


PUBLIC_DENIAL = "not allowed for this resource"


def public_denial(decision: ReleaseDecision, measurement: str | None) -> str:
    """What the requester of a denied resource reads: the same generic words for every policy
    denial, and only the requester's own evidence. The resource may be another tenant's: naming
    its failed rules would describe that tenant's policy (its table size, minimum TCB, VMPLs,
    revocations, which firmware gets which secret). The full reason goes to the resource owner's
    audit log (docs/security.md REVIEW-5)."""
    if decision.allowed or decision.variant != "PolicyDeny":
        return decision.public
    return PUBLIC_DENIAL + (f" (your evidence: MEASUREMENT {measurement})" if measurement else "")


def summarize_failures(verdict: Verdict, limit: int = 8) -> str:
    fails = verdict.failures
    parts = [f"{c.name}: {c.message}" for c in fails[:limit]]
    if len(fails) > limit:
        parts.append(f"... and {len(fails) - limit} more")
    return "; ".join(parts) if parts else "no checks ran"


def decide(*, verdict: Verdict | None, path_allowed: tuple[bool, str] | None,
           tenant_has_policy: bool) -> ReleaseDecision:
    """Release only if the tenant has a policy, it accepted the evidence, and it allows the path."""
    if not tenant_has_policy:
        # Same words whether the tenant does not exist or has no policy: reveal nothing.
        return ReleaseDecision(False, "no policy of this repository accepts this resource request")
    if verdict is None:
        return ReleaseDecision(False, "the session's evidence has not been appraised", "AttestationError")
    if not verdict.accepted:
        return ReleaseDecision(False, "policy rejected the evidence: " + summarize_failures(verdict))
    if path_allowed is None:
        return ReleaseDecision(False, "policy does not list this resource")
    ok, why = path_allowed
    if not ok:
        return ReleaseDecision(False, f"policy does not allow this resource for the matched firmware: {why}")
    return ReleaseDecision(True, why or "policy allows this resource for the matched firmware")
