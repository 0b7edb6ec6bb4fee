"""host-install errors. Each carries a remediation hint (InstallError.hint).

Exit codes follow DESIGN.md: bad input (missing VM directory, broken vm.toml,
unusable add-on or image) exits 2; an install that ran and failed or was
rolled back (InstallFailed) exits 1.
"""
from __future__ import annotations

from typing import Any

from verifier.errors import InstallError, InstallFailed

__all__ = [
    "InstallError", "InstallFailed", "VmDirError", "VmConfigError", "AddonRejected",
    "ImageRejected", "VmBusy", "BootFailed", "RecoveryNeeded", "ChannelError",
]


class VmDirError(InstallError):
    """The VM directory is missing or is not a host-install VM directory (exit 2)."""


class VmConfigError(InstallError):
    """vm.toml does not parse or holds a bad value: path, line and reason (exit 2)."""

    def __init__(self, path: str, line: int | None, why: str, hint: str = "") -> None:
        self.path = path
        self.line = line
        self.why = why
        where = path if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {why}", hint or "fix vm.toml (see docs/host.md for the keys)")


class AddonRejected(InstallError):
    """The add-on is not usable: no .efifw section, unknown fwid, malformed (exit 2)."""


class ImageRejected(InstallError):
    """The firmware image cannot run in this VM: too large, not SNP-capable, wrong format (exit 2)."""


class VmBusy(InstallFailed):
    """Another host-install holds this VM's lock (exit 1: nothing was changed)."""


class BootFailed(InstallFailed):
    """The new firmware did not come back; the old one was restored (exit 1)."""

    def __init__(self, message: str, hint: str = "", result: Any = None) -> None:
        self.result = result
        super().__init__(message, hint)


class RecoveryNeeded(InstallFailed):
    """The VM could not be brought back automatically; the operator must act (exit 1)."""


class ChannelError(InstallError):
    """A malformed or oversized request on the update channel (exit 2)."""
