"""pipeline.verify_evidence: one Verdict shape for every outcome; "could not decide" is not a rejection."""
from __future__ import annotations

import datetime as dt
import hashlib

import pytest

from sim.platform import SimPlatform
from verifier.errors import FetchError
from verifier.evidence import load_evidence
from verifier.kds.fetch import HttpFetcher
from verifier.options import VerifyOptions
from verifier.pipeline import verify_evidence
from verifier.trust import DEFAULT_TRUST_STORE
from verifier.verdict import Outcome

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def sim() -> SimPlatform:
    return SimPlatform("Genoa", "VCEK", now=NOW)


def _opts(p: SimPlatform, **kw) -> VerifyOptions:
    kw.setdefault("now", NOW)
    return VerifyOptions(trust_store=DEFAULT_TRUST_STORE.with_simulated_root(p.ark),
                         certs=(p.leaf, p.intermediate), **kw)


def test_accepted_verdict_carries_digest_and_facts(sim: SimPlatform) -> None:
    raw = sim.sign_report()
    v = verify_evidence(raw, _opts(sim))
    assert v.accepted and v.evidence_sha384 == hashlib.sha384(raw).hexdigest()
    assert v.facts["simulated"] is True and v.facts["product"] == "Genoa"
    assert v.to_dict()["checks"][0]["name"] == "report.signature"
    # The same from an Evidence value.
    assert verify_evidence(load_evidence(raw), _opts(sim)).evidence_sha384 == v.evidence_sha384


@pytest.mark.parametrize("make,name", [
    (lambda p: (p.sign_report()[:100], {}), "evidence.parse"),
    (lambda p: (p.sign_report(bad_signature=True), {}), "report.signature"),
    (lambda p: (p.sign_report(), {"now": NOW + dt.timedelta(days=365 * 30)}), "cert.validity"),
    (lambda p: (p.sign_report(), {"trust_store": DEFAULT_TRUST_STORE}), "cert.chain"),
])
def test_errors_become_one_named_failed_check(sim: SimPlatform, make, name: str) -> None:
    raw, kw = make(sim)
    opts = _opts(sim, **kw) if "trust_store" not in kw else VerifyOptions(
        now=NOW, certs=(sim.leaf, sim.intermediate), **kw)
    v = verify_evidence(raw, opts)
    assert not v.accepted and len(v.checks) == 1
    assert v.checks[0].name == name and v.checks[0].outcome is Outcome.FAIL and v.checks[0].message


def test_fetch_failure_is_raised_not_rejected(sim: SimPlatform, tmp_path) -> None:
    opts = VerifyOptions(now=NOW, trust_store=DEFAULT_TRUST_STORE.with_simulated_root(sim.ark),
                         fetcher=HttpFetcher(tmp_path, offline=True))
    with pytest.raises(FetchError):
        verify_evidence(sim.sign_report(), opts)
