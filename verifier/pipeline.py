"""The one composition point: bytes or Evidence -> parse -> verify -> (appraise, later) -> Verdict."""
from __future__ import annotations

import hashlib

from .errors import (
    ChainError,
    EvidenceError,
    ExpiredError,
    FetchError,
    FirmgateError,
    RevokedError,
    SignatureError,
    TrustError,
)
from .evidence import Evidence, load_evidence
from .options import VerifyOptions
from .verdict import CheckResult, Outcome, Verdict
from .verify import VerifiedReport, verify_report

# Which named check a raised error stands for (most specific class first).
_ERROR_CHECKS: tuple[tuple[type[FirmgateError], str], ...] = (
    (EvidenceError, "evidence.parse"),
    (SignatureError, "report.signature"),
    (ExpiredError, "cert.validity"),
    (RevokedError, "cert.revocation"),
    (ChainError, "cert.chain"),
    (TrustError, "evidence.trust"),
    (FetchError, "evidence.fetch"),
)


def check_name_for(exc: FirmgateError) -> str:
    return next((name for cls, name in _ERROR_CHECKS if isinstance(exc, cls)), "evidence.error")


def evidence_digest(data: bytes | Evidence) -> str:
    raw = data.report.raw if isinstance(data, Evidence) else data
    return hashlib.sha384(raw).hexdigest()


def verify_to_report(data: bytes | Evidence, options: VerifyOptions) -> VerifiedReport:
    """Parse (if bytes) and verify; raises FirmgateError subclasses. For callers that appraise next."""
    evidence = data if isinstance(data, Evidence) else load_evidence(data)
    return verify_report(evidence, options)


def verify_evidence(data: bytes | Evidence, options: VerifyOptions) -> Verdict:
    """A Verdict in every case: a parse/verify error becomes one failed check with a stable name.

    FetchError (KDS unreachable) is re-raised: "could not decide" is not a rejection.
    """
    digest = evidence_digest(data)
    try:
        verified = verify_to_report(data, options)
    except FetchError:
        raise
    except FirmgateError as exc:
        return Verdict(checks=(CheckResult(check_name_for(exc), Outcome.FAIL, exc.diagnostics()),),
                       evidence_sha384=digest)
    return Verdict(checks=verified.checks, evidence_sha384=digest, facts=verified.facts())
