"""Bounded file input and atomic file output for the CLI commands (the verifier's, the owner's and
the guest's): one reader that refuses what is not a regular file or is too large, one writer that
never leaves half a file."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import FirmwareError, UsageError
from ..regularfile import read_regular


def read_bounded(path: str, limit: int, what: str) -> bytes:
    """Read a file of at most `limit` bytes; a missing or huge file is a usage/firmware error."""
    try:
        data = read_regular(path, limit)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise FirmwareError(f"{what} {path} is larger than {limit} bytes")
    return data


def write_file(path: str, data: bytes) -> None:
    """Write through a temp file in the same directory, so a failed write leaves no half file."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from exc
