"""The broker's only contact with the verifier: parse + verify evidence, appraise per tenant.

`Appraiser` is the seam (a Protocol); `VerifierAppraiser` is the real one over
verifier.evidence / verifier.verify / verifier.appraise. The broker never looks
inside verifier types beyond what this module extracts into `Attested`.
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from verifier.errors import EvidenceError, FirmgateError
from verifier.verdict import Verdict


@dataclass(frozen=True)
class Attested:
    """What the broker needs from verified evidence (signature and chain already checked)."""

    report_data: bytes
    host_data: bytes
    measurement: bytes
    snp_claims: dict[str, Any]
    handle: Any = field(repr=False, compare=False)  # the verifier's VerifiedReport, for appraisal


class Appraiser(Protocol):
    def verify(self, primary_evidence: Any) -> Attested:
        """Parse and verify (chain + signature); raises FirmgateError with the reason."""

    def tenants(self) -> list[str]:
        """Tenants that have a loadable policy."""

    def policy_id(self, tenant: str) -> str | None:
        """An id that changes whenever the tenant's policy changes; None if it has none."""

    def appraise(self, attested: Attested, tenant: str, expected_report_data: bytes) -> Verdict:
        """The tenant's current policy applied to the evidence (never raises for a rejection)."""

    def release_allowed(self, tenant: str, verdict: Verdict, resource_path: str) -> tuple[bool, str]:
        """Whether the tenant's policy gives `resource_path` to the firmware the verdict matched."""

    def add_firmware(self, data: bytes) -> list[str]:
        """Make firmware bytes (a UKI add-on or an image) available to appraisal; returns the
        sha384 digests of the firmware images taken. Raises FirmwareError when no policy allows them."""


def _report_of(verified: Any) -> Any:
    return getattr(verified, "report", verified)


def snp_claims(report: Any) -> dict[str, Any]:
    """The `snp` part of the EAR annotated evidence (Trustee-like names), from a parsed report."""
    pol = report.policy
    claims: dict[str, Any] = {
        "measurement": report.measurement.hex(),
        "chip_id": report.chip_id.hex(),
        "host_data": report.host_data.hex(),
        "report_data": report.report_data.hex(),
        "reported_tcb": f"{report.reported_tcb:016x}",
        "guest_svn": report.guest_svn,
        "vmpl": report.vmpl,
        "policy": int(getattr(pol, "value", getattr(pol, "raw", 0)) or 0) if not isinstance(pol, int) else pol,
    }
    for name in ("debug", "migrate_ma", "smt", "single_socket", "abi_major", "abi_minor"):
        if hasattr(pol, name):
            claims[f"policy_{name}"] = getattr(pol, name)
    return claims


class VerifierAppraiser:
    """The real verifier, with the tenants' policies from a directory (re-read when they change)."""

    def __init__(self, policies_dir: str, trust_root_pem: str | None = None) -> None:
        self.policies_dir = Path(policies_dir)
        self.trust_root_pem = trust_root_pem
        self._lock = threading.Lock()
        from verifier.appraise.store import PolicyStore  # landed by the policy issue
        self._store = PolicyStore(self.policies_dir)
        self._options = self._make_options()

    def _make_options(self) -> Any:
        from verifier import options as vopts
        kwargs: dict[str, Any] = {}
        if self.trust_root_pem:
            kwargs["trust_root_pem"] = Path(self.trust_root_pem).read_bytes()
        return vopts.default_options(**kwargs)

    def verify(self, primary_evidence: Any) -> Attested:
        from verifier.evidence import evidence_from_json
        from verifier.verify import verify_report
        try:
            evidence = evidence_from_json(primary_evidence)
        except FirmgateError:
            raise
        except (ValueError, TypeError, KeyError) as exc:  # a parser bug must not become a 500
            raise EvidenceError(f"evidence does not parse: {exc}") from exc
        verified = verify_report(evidence, self._options)
        report = _report_of(verified)
        return Attested(report_data=bytes(report.report_data), host_data=bytes(report.host_data),
                        measurement=bytes(report.measurement), snp_claims=snp_claims(report), handle=verified)

    def tenants(self) -> list[str]:
        return sorted(p.stem for p in self.policies_dir.glob("*.toml"))

    def _loaded(self, tenant: str) -> Any | None:
        if not (self.policies_dir / f"{tenant}.toml").is_file():
            return None
        with self._lock:
            try:
                return self._store.get(tenant)
            except FirmgateError:
                return None

    def policy_id(self, tenant: str) -> str | None:
        loaded = self._loaded(tenant)
        if loaded is None:
            return None
        pid = getattr(loaded, "policy_id", None) or getattr(loaded, "digest", None)
        if pid:
            return str(pid)
        return hashlib.sha256((self.policies_dir / f"{tenant}.toml").read_bytes()).hexdigest()

    def appraise(self, attested: Attested, tenant: str, expected_report_data: bytes) -> Verdict:
        from verifier.appraise.appraise import appraise
        loaded = self._loaded(tenant)
        if loaded is None:
            raise EvidenceError(f"tenant {tenant} has no usable policy")
        return appraise(attested.handle, loaded, expected_report_data=expected_report_data)

    def release_allowed(self, tenant: str, verdict: Verdict, resource_path: str) -> tuple[bool, str]:
        from verifier.appraise.appraise import release_allowed
        loaded = self._loaded(tenant)
        if loaded is None:
            return False, "no policy"
        ok, why = release_allowed(loaded, verdict, resource_path)
        return bool(ok), str(why)

    def add_firmware(self, data: bytes) -> list[str]:
        with self._lock:
            return list(self._store.add_firmware(data))
