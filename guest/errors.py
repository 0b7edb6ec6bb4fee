"""Errors of the guest client, in the one error tree (verifier.errors): exit codes follow DESIGN.md."""
from __future__ import annotations

from verifier.errors import FetchError, FirmgateError, TrustError


class GuestError(FirmgateError):
    """Something on the guest's side failed (no evidence device, a bad answer, a local file)."""

    exit_code = 2


class EvidenceUnavailable(FetchError):
    """Neither configfs-tsm nor /dev/sev-guest gave a report (not an SNP guest, or no permission)."""


class TsmRace(EvidenceUnavailable):
    """Another writer touched the configfs-tsm entry between our write and our reads."""


class BrokerUnreachable(FetchError):
    """The broker could not be reached or answered something that is not the KBS protocol."""


class BrokerDenied(TrustError):
    """The broker refused (401/404 with {"type", "detail"}): `detail` is its reason, verbatim."""

    def __init__(self, step: str, status: int, variant: str, detail: str) -> None:
        self.step, self.status, self.variant, self.detail = step, status, variant, detail
        super().__init__(f"broker denied {step} ({status} {variant}): {detail}")


class BadResponse(FetchError):
    """The broker's answer (JWE, token, challenge) does not have the shape the protocol requires."""
