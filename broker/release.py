"""RELEASE: whether a resource goes to a session, decided from data only (no Flask here).

The broker hands in the tenant's appraisal Verdict of the session's evidence
(computed with the tenant's CURRENT policy, so a policy change that revokes a
firmware takes effect at the next request) and the policy's answer for this
resource path. Every denial carries a reason the guest may see: its own failed
checks, never anything about other tenants or whether the resource exists.
"""
from __future__ import annotations

from dataclasses import dataclass

from verifier.verdict import Verdict


@dataclass(frozen=True)
class ReleaseDecision:
    allowed: bool
    reason: str
    variant: str = "PolicyDeny"  # KBS error variant when denied


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
