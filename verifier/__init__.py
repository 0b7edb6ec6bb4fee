"""firmgate verifier: parse -> verify -> appraise SEV-SNP evidence for guest-supplied firmware."""
from __future__ import annotations

from typing import Any

from .errors import FirmgateError
from .verdict import CheckResult, Outcome, Verdict

# The verification API is imported lazily so that `import verifier.errors` stays light.
_LAZY = {
    "AttestationReport": "verifier.abi.report",
    "Product": "verifier.abi.fields",
    "TcbVersion": "verifier.abi.fields",
    "Evidence": "verifier.evidence",
    "load_evidence": "verifier.evidence",
    "evidence_from_json": "verifier.evidence",
    "VerifyOptions": "verifier.options",
    "default_options": "verifier.options",
    "VerifiedReport": "verifier.verify",
    "verify_report": "verifier.verify",
    "verify_evidence": "verifier.pipeline",
    "verify_to_report": "verifier.pipeline",
    "TrustStore": "verifier.trust",
}

__all__ = ["FirmgateError", "CheckResult", "Outcome", "Verdict", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'verifier' has no attribute {name!r}")
