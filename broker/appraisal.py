"""The broker's only contact with the verifier: parse + verify evidence, appraise per tenant.

`Appraiser` is the seam (a Protocol); `VerifierAppraiser` is the real one over
verifier.evidence / verifier.verify / verifier.appraise. The broker never looks
inside verifier types beyond what this module extracts into `Attested`.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from verifier.appraise.appraise import snp_claims  # the Trustee claim names, one source for EAR and token
from verifier.errors import EvidenceError, FirmgateError
from verifier.verdict import Verdict

log = logging.getLogger(__name__)
ENDORSEMENT_MAGIC = b"\xd2"   # CBOR tag 18 (COSE_Sign1): no PE add-on (MZ) or OVMF image starts so


@dataclass(frozen=True)
class Attested:
    """What the broker needs from verified evidence (signature and chain already checked)."""

    report_data: bytes
    host_data: bytes
    measurement: bytes
    snp_claims: dict[str, Any]
    handle: Any = field(repr=False, compare=False)  # the verifier's VerifiedReport, for appraisal


@dataclass(frozen=True)
class Parsed:
    """Evidence that parsed, not yet verified: enough to check the bindings before any signature work."""

    report_data: bytes
    host_data: bytes
    measurement: bytes
    handle: Any = field(repr=False, compare=False)  # the verifier's Evidence


class Appraiser(Protocol):
    def parse(self, primary_evidence: Any) -> Parsed:
        """Parse the guest's primary evidence; raises FirmgateError (EvidenceError) with the reason."""

    def verify(self, parsed: Parsed) -> Attested:
        """Verify chain and signature; raises FirmgateError with the reason."""

    def tenants(self) -> list[str]:
        """Tenants that have a loadable policy."""

    def policy_id(self, tenant: str) -> str | None:
        """An id that changes whenever the tenant's policy changes; None if it has none."""

    def appraise(self, attested: Attested, tenant: str, expected_report_data: bytes,
                 expected_host_data: bytes | None = None) -> Verdict:
        """The tenant's current policy applied to the evidence (never raises for a rejection).
        `expected_host_data`: the init-data digest when the guest sent init-data."""

    def release_allowed(self, tenant: str, verdict: Verdict, resource_path: str) -> tuple[bool, str]:
        """Whether the tenant's policy gives `resource_path` to the firmware the verdict matched."""

    def add_firmware(self, data: bytes) -> list[str]:
        """Make firmware bytes (a UKI add-on or an image) available to appraisal; returns the
        sha384 digests of the firmware images taken. Raises FirmwareError when no policy allows them.
        A publisher's endorsement (a COSE_Sign1, CBOR tag 18) is taken the same way: kept for the
        firmware it endorses; returns ["endorsement:<id>"]; raises TrustError when no policy trusts it."""

    def lists_firmware(self, tenant: str, data: bytes) -> bool:
        """Whether `tenant`'s own policy allows (lists, not revoked) the firmware in `data`; raises
        FirmwareError for bytes that hold no firmware. Other tenants' policies play no part."""

    def trusts_endorsement(self, tenant: str, data: bytes) -> bool:
        """Whether `tenant`'s own policy trusts the publisher that signed the endorsement `data` (and
        its signature holds). Other tenants' policies play no part."""


class VerifierAppraiser:
    """The real verifier, with the tenants' policies from a directory (re-read when they change)."""

    def __init__(self, policies_dir: str, trust_root_pem: str | None = None, kds_cache: str | None = None,
                 kds_offline: bool = True, measure_cache: str | None = None) -> None:
        from verifier.appraise.store import PolicyStore
        self.policies_dir = Path(policies_dir)
        self._options = self._make_options(trust_root_pem, kds_cache, kds_offline)
        self._store = PolicyStore(self.policies_dir, cache_dir=measure_cache)

    @staticmethod
    def _make_options(trust_root_pem: str | None, kds_cache: str | None, kds_offline: bool) -> Any:
        from cryptography import x509

        from verifier.options import default_options
        root = None
        if trust_root_pem:
            try:
                root = x509.load_pem_x509_certificate(Path(trust_root_pem).read_bytes())
            except (OSError, ValueError) as exc:
                raise EvidenceError(f"--trust-root {trust_root_pem}: not a readable PEM certificate") from exc
        return default_options(trust_root=root, kds_cache=Path(kds_cache) if kds_cache else None,
                               offline=kds_offline)

    def parse(self, primary_evidence: Any) -> Parsed:
        from verifier.evidence import evidence_from_json
        try:
            evidence = evidence_from_json(primary_evidence)
        except FirmgateError:
            raise
        except Exception as exc:  # a parser gap must not become a 500: fail closed with a 401
            log.warning("evidence parser raised %s", type(exc).__name__, exc_info=True)
            raise EvidenceError(f"evidence does not parse ({type(exc).__name__})") from exc
        r = evidence.report
        return Parsed(bytes(r.report_data), bytes(r.host_data), bytes(r.measurement), evidence)

    def verify(self, parsed: Parsed) -> Attested:
        from verifier.verify import verify_report
        try:
            verified = verify_report(parsed.handle, self._options)
        except FirmgateError:
            raise
        except Exception as exc:  # hostile certificates can make a library raise anything: fail closed, 401
            log.warning("verifier raised %s on guest evidence", type(exc).__name__, exc_info=True)
            raise EvidenceError(f"evidence could not be verified ({type(exc).__name__})") from exc
        report = verified.report
        return Attested(report_data=bytes(report.report_data), host_data=bytes(report.host_data),
                        measurement=bytes(report.measurement), snp_claims=snp_claims(report, verified.tcb.get("reported")),
                        handle=verified)

    def tenants(self) -> list[str]:
        return list(self._store.tenants())

    def _loaded(self, tenant: str) -> Any | None:
        try:
            return self._store.get(tenant)
        except FirmgateError:  # no file, or never a good version: no policy
            return None

    def policy_id(self, tenant: str) -> str | None:
        loaded = self._loaded(tenant)
        return None if loaded is None else str(loaded.policy_id)

    def appraise(self, attested: Attested, tenant: str, expected_report_data: bytes,
                 expected_host_data: bytes | None = None) -> Verdict:
        from verifier.appraise.appraise import appraise
        loaded = self._loaded(tenant)
        if loaded is None:
            raise EvidenceError(f"tenant {tenant} has no usable policy")
        return appraise(attested.handle, loaded, expected_report_data=expected_report_data,
                        expected_host_data=expected_host_data)

    def release_allowed(self, tenant: str, verdict: Verdict, resource_path: str) -> tuple[bool, str]:
        from verifier.appraise.appraise import release_allowed
        loaded = self._loaded(tenant)
        if loaded is None:
            return False, "no policy"
        ok, why = release_allowed(loaded, verdict, resource_path)
        return bool(ok), str(why)

    def lists_firmware(self, tenant: str, data: bytes) -> bool:
        from verifier.appraise.reference import extract_firmware
        payload = extract_firmware(data)  # FirmwareError for something that is no firmware
        self._store.refresh()  # the owner may have just listed it
        loaded = self._loaded(tenant)
        return loaded is not None and bool(loaded.allows_firmware_digest(hashlib.sha384(payload).hexdigest()))

    def loaded_policy(self, tenant: str) -> tuple[Any | None, list[str]]:
        """For the console: the tenant's LoadedPolicy in force (or None) and the errors of a newer file
        that was refused (the last good version stays in force meanwhile)."""
        loaded = self._loaded(tenant)
        return loaded, [e.diagnostics() for e in self._store.last_errors(tenant)]

    def policy_status(self) -> dict[str, Any]:
        """For the operator's console: every tenant's policy id, commit and refused errors."""
        self._store.refresh()
        return dict(self._store.status())

    def trusts_endorsement(self, tenant: str, data: bytes) -> bool:
        from verifier.endorse.admit import EndorsementRefused, verify_with
        self._store.refresh()  # the owner may have just added the publisher
        loaded = self._loaded(tenant)
        if loaded is None:
            return False
        try:
            verify_with(data, loaded.policy.publishers)
        except EndorsementRefused:
            return False
        return True

    def add_firmware(self, data: bytes) -> list[str]:
        from verifier.appraise.reference import extract_firmware
        if data[:1] == ENDORSEMENT_MAGIC:
            self._store.refresh()
            return [f"endorsement:{self._store.add_endorsement(data)}"]
        payload = extract_firmware(data)  # FirmwareError for something that is no firmware
        # Policies first (at most one re-read a second): the owner may have just listed this digest.
        self._store.refresh()
        self._store.add_firmware(data)    # FirmwareError unless some policy allows the digest
        # The digest only: which tenants took it is not the uploader's business.
        return [hashlib.sha384(payload).hexdigest()]
