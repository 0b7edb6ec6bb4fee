"""One exception tree for all of firmgate, phrased for the reader.

Every error carries a one-line message a person can act on (`diagnostics()`)
and the CLI exit code that DESIGN.md's contract assigns to its class:
0 accepted/done, 1 rejected, 2 bad input or usage, 3 could not decide.
"""
from __future__ import annotations


class FirmgateError(Exception):
    """Base of every error firmgate raises on purpose."""

    exit_code: int = 2

    def diagnostics(self) -> str:
        return str(self) or self.__class__.__name__


# -- bad input (exit 2) -----------------------------------------------------
class EvidenceError(FirmgateError):
    """Evidence that cannot be parsed: wrong size, bad layout, reserved bits set."""


class MalformedReport(EvidenceError):
    pass


class UnsupportedReportVersion(EvidenceError):
    pass


class CertificateFormatError(EvidenceError):
    """A certificate, certificate table or extension that does not parse."""


class FirmwareError(FirmgateError):
    """A UKI add-on or firmware image that is malformed or cannot be an SNP firmware."""


class FirmwareFormatError(FirmwareError):
    """A firmware file whose bytes do not follow its format (IGVM: a length, offset, checksum or
    header that does not fit); raised by the strict readers before anything is measured."""


class UsageError(FirmgateError):
    """Bad command-line input that argparse could not catch (missing file, bad hex...)."""


# -- rejected (exit 1) ------------------------------------------------------
class TrustError(FirmgateError):
    """The evidence parsed, but it is not trustworthy."""

    exit_code = 1


class ChainError(TrustError):
    pass


class SignatureError(TrustError):
    pass


class RevokedError(TrustError):
    pass


class ExpiredError(ChainError):
    pass


# -- could not decide (exit 3) ----------------------------------------------
class FetchError(FirmgateError):
    """A needed service (AMD KDS, a CRL URL) could not be reached; __cause__ says why."""

    exit_code = 3


# -- policy files -------------------------------------------------------------
class PolicyFileError(FirmgateError):
    """A policy file that does not parse or is inconsistent: path, line, field, why."""

    def __init__(self, path: str, line: int | None, field: str | None, why: str) -> None:
        self.path = path
        self.line = line
        self.field = field
        self.why = why
        super().__init__(self.diagnostics())

    def diagnostics(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        what = f" [{self.field}]" if self.field else ""
        return f"{where}:{what} {self.why}"


class PolicyErrors(FirmgateError):
    """Several PolicyFileErrors found in one run (`policy check` reports all of them)."""

    def __init__(self, errors: list[PolicyFileError]) -> None:
        self.errors = errors
        super().__init__(self.diagnostics())

    def diagnostics(self) -> str:
        return "\n".join(e.diagnostics() for e in self.errors)


# -- host install ---------------------------------------------------------------
class InstallError(FirmgateError):
    """A host-install failure; `hint` tells the operator what to do next."""

    def __init__(self, message: str, hint: str = "") -> None:
        self.hint = hint
        super().__init__(message)

    def diagnostics(self) -> str:
        msg = super().diagnostics()
        return f"{msg} (hint: {self.hint})" if self.hint else msg


class InstallFailed(InstallError):
    """The install ran and failed (e.g. rolled back): exit 1, not bad input."""

    exit_code = 1
