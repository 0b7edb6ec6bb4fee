"""What tenants' policies share: facts about firmware files, and launch measurements.

Thousands of tenants list the same few firmware builds. Reading and hashing a
4 MiB image (the policy check does it, then the reference table), and measuring
it for a shape, is done once per version of the file and once per (firmware
digest, shape) in a process, not once per tenant.

A file's facts are keyed by its real path and its stat (device, inode, size,
mtime and ctime in ns): any write changes the ctime, so a changed file is read
again. Measurements are keyed by the firmware's SHA-384 and the shape's key,
as the on-disk cache (verifier/measure/cache.py) is.
"""
from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..errors import FirmgateError
from ..measure.launch import Shape

MAX_FILE_FACTS = 4096          # firmware file versions remembered (each ~200 bytes)
MAX_MEMO_MEASUREMENTS = 1 << 20  # (digest, shape) measurements remembered (each ~300 bytes)

FileKey = tuple[str, int, int, int, int, int, str, str]


@dataclass(frozen=True)
class FileFacts:
    """One version of a firmware file: its image's SHA-384, and why it cannot be SNP firmware (or None)."""

    sha384: str
    snp_error: str | None


def _file_key(path: Path, fwid: str | None, root: Path | None) -> FileKey:
    """The file version's identity. With `root`, read_firmware_file's confinement first (the same
    refusals, also for a file whose facts are known): inside `root` after symlinks, a regular file."""
    from ..firmware.addon import MAX_ADDON_SIZE
    target = path.resolve(strict=True) if root is not None else path  # OSError for a missing file or a loop
    if root is not None and not target.is_relative_to(root.resolve(strict=True)):
        raise FirmgateError(f"{path.name} resolves outside the policy's directory "
                            "(firmware files must live in the policy tree)")
    st = os.stat(target)  # follows a symlink: the target's identity is what matters
    if root is not None and not stat.S_ISREG(st.st_mode):
        raise FirmgateError(f"{path.name} is not a regular file")
    if st.st_size > MAX_ADDON_SIZE:
        raise FirmgateError(f"{path.name} is larger than {MAX_ADDON_SIZE} bytes")
    return (os.path.realpath(target), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, fwid or "",
            str(root or ""))


_facts: OrderedDict[FileKey, FileFacts] = OrderedDict()
_facts_lock = threading.Lock()


def firmware_file_facts(path: Path, fwid: str | None = None, root: Path | None = None
                        ) -> tuple[FileFacts, bytes | None]:
    """The facts of the firmware image in `path` (an add-on's entry `fwid`, or a raw image), and its
    bytes when they had to be read (None when the facts were known). `root`: as read_firmware_file's
    (the file must live in the policy's directory). Raises OSError / FirmgateError."""
    from ..firmware.image import require_snp_firmware
    from .policy import read_firmware_file
    key = _file_key(path, fwid, root)
    with _facts_lock:
        hit = _facts.get(key)
        if hit is not None:
            _facts.move_to_end(key)
            return hit, None
    payload = read_firmware_file(path, fwid, root=root)
    snp_error: str | None = None
    try:
        require_snp_firmware(payload)
    except FirmgateError as exc:
        snp_error = exc.diagnostics()
    facts = FileFacts(hashlib.sha384(payload).hexdigest(), snp_error)
    if _file_key(path, fwid, root) == key:  # unchanged while we read it: the facts belong to that version
        with _facts_lock:
            _facts[key] = facts
            while len(_facts) > MAX_FILE_FACTS:
                _facts.popitem(last=False)
    return facts, payload


def forget_file_facts() -> None:
    """Drop every remembered file fact (tests, and an operator who distrusts the stat keys)."""
    with _facts_lock:
        _facts.clear()


class MeasurementMemo:
    """(firmware sha384, shape) -> MEASUREMENT, shared by the reference tables of one policy store."""

    def __init__(self, limit: int = MAX_MEMO_MEASUREMENTS) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[tuple[str, str], bytes] = {}
        self._limit = limit

    def get_all(self, digest: str, shapes: list[Shape]) -> dict[Shape, bytes] | None:
        """Every shape's measurement of firmware `digest`, or None if any is unknown."""
        out: dict[Shape, bytes] = {}
        with self._lock:
            for s in shapes:
                m = self._by_key.get((digest, s.key()))
                if m is None:
                    return None
                out[s] = m
        return out

    def put(self, digest: str, table: dict[Shape, bytes]) -> None:
        with self._lock:
            if len(self._by_key) + len(table) > self._limit:
                self._by_key.clear()  # policy churn on a huge scale: start over rather than grow
            for s, m in table.items():
                self._by_key[(digest, s.key())] = m

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_key)
