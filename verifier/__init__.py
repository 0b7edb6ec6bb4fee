"""firmgate verifier: parse -> verify -> appraise SEV-SNP evidence for guest-supplied firmware."""
from .errors import FirmgateError
from .verdict import CheckResult, Outcome, Verdict

__all__ = ["FirmgateError", "CheckResult", "Outcome", "Verdict"]
