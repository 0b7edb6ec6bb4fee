"""Evidence from Linux configfs-tsm (Documentation/ABI/testing/configfs-tsm-report).

The kernel's protocol, per report entry `<root>/<name>/`:
  mkdir <name>            create an entry (private to the caller only by convention)
  write inblob            up to 64 bytes of REPORT_DATA; bumps `generation`
  read  outblob           the report, generated on this read for the current inblob
  read  auxblob           the provider's extra data: for sev_guest, the GUID certificate table
  read  generation        a counter bumped by every write to the entry: a changed value
                          between our write and our reads means another writer raced us
  read  provider          "sev_guest" on SEV-SNP
  rmdir <name>            release it

The file operations go through a `TsmBackend`, so the same client code runs
against the real configfs (`FsTsmBackend`) and against the simulated SNP host
(`sim.host.SimTsmBackend`), which plays the kernel's part behind the same calls.
"""
from __future__ import annotations

import errno
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .errors import EvidenceUnavailable, TsmRace

DEFAULT_ROOT = "/sys/kernel/config/tsm/report"
INBLOB_SIZE = 64
MAX_OUTBLOB = 32 * 1024       # an SNP report is 1184 bytes; bound what we read anyway
MAX_AUXBLOB = 64 * 1024       # the certificate table (ARK, ASK, VCEK; DER or PEM) is a few KiB
MAX_SMALL = 256               # generation, provider


class TsmBackend(Protocol):
    """The file operations the client performs on a configfs-tsm report tree."""

    def mkdir(self, name: str) -> None: ...
    def write(self, name: str, attr: str, data: bytes) -> None: ...
    def read(self, name: str, attr: str, limit: int) -> bytes: ...
    def rmdir(self, name: str) -> None: ...


class FsTsmBackend:
    """The real configfs tree (or a configfs mounted elsewhere: `root`)."""

    def __init__(self, root: str | os.PathLike[str] = DEFAULT_ROOT) -> None:
        self.root = Path(root)

    def available(self) -> bool:
        return self.root.is_dir()

    def mkdir(self, name: str) -> None:
        os.mkdir(self.root / name, 0o700)

    def write(self, name: str, attr: str, data: bytes) -> None:
        # One write(2) call: configfs binary attributes take the whole value at once.
        fd = os.open(self.root / name / attr, os.O_WRONLY)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.EIO, f"short write to {attr}")
        finally:
            os.close(fd)

    def read(self, name: str, attr: str, limit: int) -> bytes:
        with open(self.root / name / attr, "rb") as fh:
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise EvidenceUnavailable(f"configfs-tsm {attr} is larger than {limit} bytes")
        return data

    def rmdir(self, name: str) -> None:
        os.rmdir(self.root / name)


@dataclass(frozen=True)
class TsmReport:
    outblob: bytes        # the raw SNP report
    auxblob: bytes        # the GUID certificate table ("" when the host supplies none)
    provider: str
    generation: int


def _generation(backend: TsmBackend, name: str) -> int:
    raw = backend.read(name, "generation", MAX_SMALL).strip()
    if not raw.isdigit():
        raise EvidenceUnavailable(f"configfs-tsm generation is not a number: {raw[:32]!r}")
    return int(raw)


def get_report(report_data: bytes, backend: TsmBackend, *, name: str | None = None) -> TsmReport:
    """One report for `report_data` (64 bytes) through configfs-tsm; the entry is removed afterwards."""
    if len(report_data) != INBLOB_SIZE:
        raise ValueError(f"report_data must be {INBLOB_SIZE} bytes, got {len(report_data)}")
    entry = name or f"firmgate-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        backend.mkdir(entry)
    except OSError as exc:
        raise EvidenceUnavailable(f"cannot create configfs-tsm entry {entry}: {exc.strerror or exc}") from exc
    try:
        try:
            before = _generation(backend, entry)
            backend.write(entry, "inblob", report_data)
            written = _generation(backend, entry)
            if written != before + 1:
                raise TsmRace(f"configfs-tsm entry {entry} was written by someone else "
                              f"(generation {before} -> {written}, expected {before + 1})")
            outblob = backend.read(entry, "outblob", MAX_OUTBLOB)
            try:
                auxblob = backend.read(entry, "auxblob", MAX_AUXBLOB)
            except FileNotFoundError:
                auxblob = b""  # kernels before 6.8 have no auxblob
            provider = backend.read(entry, "provider", MAX_SMALL).decode("ascii", "replace").strip()
            after = _generation(backend, entry)
        except OSError as exc:
            raise EvidenceUnavailable(f"configfs-tsm {entry}: {exc.strerror or exc}") from exc
        if after != written:
            raise TsmRace(f"configfs-tsm entry {entry} changed while we read it "
                          f"(generation {written} -> {after}); the report may not be for our REPORT_DATA")
        if not outblob:
            raise EvidenceUnavailable(f"configfs-tsm {entry}: empty outblob (provider {provider or 'unknown'})")
        return TsmReport(outblob, auxblob, provider, after)
    finally:
        try:
            backend.rmdir(entry)
        except OSError:
            pass  # best effort: a stale entry holds no secret, only a report
