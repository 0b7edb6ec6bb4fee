"""Append-only journal: one JSON object per line, fsync'd after every record.

Each record carries `seq`, the UTC time, the transaction id and the SHA-384 of
the previous line (`prev`), so a reader sees a torn or edited history. A crash
can leave a last line without its newline: the reader skips it (its fsync never
returned, so nothing relied on it) and the next append cuts it off and says so
in `dropped_torn_bytes`, so the chain stays whole.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InstallFailed

MAX_LINE = 64 * 1024  # records are small; anything longer is not ours

# Events that end a transaction; `in_force` names the firmware left in force.
TERMINAL = frozenset({"committed", "rolled-back", "aborted", "recovered"})


@dataclass(frozen=True)
class Journal:
    path: Path

    def records(self) -> list[dict[str, Any]]:
        """Every complete, well-formed record, in order (a torn last line is skipped)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        out: list[dict[str, Any]] = []
        lines = raw.split(b"\n")
        complete = lines[:-1]  # the part after the last newline was never acknowledged
        prev = ""
        for n, line in enumerate(complete, 1):
            if not line:
                continue
            if len(line) > MAX_LINE:
                raise InstallFailed(f"{self.path}:{n}: record longer than {MAX_LINE} bytes",
                                    "the journal was edited or corrupted; inspect it by hand")
            try:
                rec = json.loads(line)
            except ValueError:
                raise InstallFailed(f"{self.path}:{n}: not a JSON record",
                                    "the journal was edited or corrupted; inspect it by hand") from None
            if not isinstance(rec, dict):
                raise InstallFailed(f"{self.path}:{n}: record is not an object",
                                    "the journal was edited or corrupted; inspect it by hand")
            if rec.get("prev", "") != prev:
                raise InstallFailed(f"{self.path}:{n}: chain broken (prev digest does not match line {n - 1})",
                                    "the journal was edited or reordered; inspect it by hand")
            prev = hashlib.sha384(line).hexdigest()
            out.append(rec)
        return out

    def _tail(self) -> tuple[str, int, int]:
        """(digest of the last complete line, its seq, length of the complete part)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return "", 0, 0
        lines = raw.split(b"\n")
        complete = [ln for ln in lines[:-1] if ln]
        last = complete[-1] if complete else b""
        seq = 0
        for ln in reversed(complete):
            try:
                seq = int(json.loads(ln)["seq"])
                break
            except (ValueError, KeyError, TypeError):
                continue
        return (hashlib.sha384(last).hexdigest() if last else ""), seq, len(raw) - len(lines[-1])

    def append(self, event: str, tx: str | None, **fields: Any) -> dict[str, Any]:
        prev, seq, good = self._tail()
        rec: dict[str, Any] = {"seq": seq + 1, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "tx": tx, "event": event, **fields, "prev": prev}
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            torn = os.fstat(fd).st_size - good
            if torn > 0:  # an unacknowledged fragment from a crash: cut it, say so
                os.ftruncate(fd, good)
                rec["dropped_torn_bytes"] = torn
            line = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
            os.write(fd, line + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        return rec

    def in_force(self) -> dict[str, Any] | None:
        """The last terminal record that names a firmware (what `firmware` should point at)."""
        for rec in reversed(self.records()):
            if rec.get("event") in TERMINAL and rec.get("in_force"):
                found: dict[str, Any] = rec
                return found
        return None

    def open_transaction(self) -> list[dict[str, Any]]:
        """Records of the last transaction if it has no terminal record, else []."""
        recs = self.records()
        for i in range(len(recs) - 1, -1, -1):
            if recs[i].get("event") == "begin":
                tx = recs[i].get("tx")
                mine = [r for r in recs[i:] if r.get("tx") == tx]
                if any(r.get("event") in TERMINAL for r in mine):
                    return []
                return mine
        return []
