"""Which tenants an attestation is appraised for, and waiting for policies still loading.

An unmodified guest names no tenant. /attest appraises only the tenants whose
reference tables hold the report's MEASUREMENT (plus tenants that admit
firmware by other means), through the appraiser's measurement index: the cost
of an attestation does not grow with the number of tenants (issue 21,
docs/protocol.md "Tenant selection"). An appraiser without an index (a test
double) gets the old behaviour: every tenant.

While the broker's first policy load runs in the background, tenants already
loaded are served at once; a request that needs a tenant not loaded yet waits
up to POLICY_LOAD_WAIT seconds (an unhinted /attest is appraised for tenants
as they load, and answered as soon as one accepts), then gets 503 (could not
decide), never a denial that the policy did not make.
"""
from __future__ import annotations

import time

from flask import current_app

from .appraisal import Attested
from .state import BrokerState

POLL_S = 0.05


def candidates(st: BrokerState, attested: Attested, hint: str | None) -> list[str]:
    assert st.appraiser is not None
    if hint:
        return [hint]
    index = getattr(st.appraiser, "candidates", None)
    if index is None:
        return list(st.appraiser.tenants())
    return list(index(attested))


def policies_loading(st: BrokerState) -> bool:
    loading = getattr(st.appraiser, "loading", None)
    return bool(loading()) if loading is not None else False


def tenant_pending(st: BrokerState, tenant: str) -> bool:
    pending = getattr(st.appraiser, "pending", None)
    return bool(pending(tenant)) if pending is not None else False


def _wait_s() -> float:
    return float(current_app.config.get("POLICY_LOAD_WAIT", 30))


def wait_for_tenant(st: BrokerState, tenant: str) -> bool:
    """Wait (bounded) until `tenant`'s policy file had its first load; True if it has (or has no file)."""
    deadline = time.monotonic() + _wait_s()
    while tenant_pending(st, tenant):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True


class LoadWait:
    """`while not accepted and wait.more(): look again`: sleeps a little while policies are still
    loading and the deadline is not reached; `timed_out` says which of the two ended it."""

    def __init__(self, st: BrokerState) -> None:
        self.st = st
        self.deadline: float | None = None
        self.timed_out = False

    def more(self) -> bool:
        if not policies_loading(self.st):
            return False
        now = time.monotonic()
        if self.deadline is None:
            self.deadline = now + _wait_s()
        if now >= self.deadline:
            self.timed_out = True
            return False
        time.sleep(POLL_S)
        return True
