"""On-disk cache of launch measurements.

Keyed by the firmware's SHA-384, the shape's key() and the sev-snp-measure
version (a new version may measure differently, so it gets a fresh namespace).
Each value is a small JSON file written atomically (temp file + os.replace);
an entry that does not parse, or that names another shape or firmware, is
ignored and recomputed.

Trust: whoever can write the cache directory can change expected
measurements, so give it the same protection as the policy files.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

from .launch import MEASUREMENT_SIZE, SEV_SNP_MEASURE_VERSION

log = logging.getLogger(__name__)

_FORMAT = 1
_SEED_KEY = "snp:ovmf-hash"  # the firmware-pages-only digest, shared by every shape
_MAX_ENTRY_BYTES = 64 * 1024
_HEX384 = re.compile(r"[0-9a-f]{96}")


class MeasurementCache:
    def __init__(self, directory: str | Path, *, tool_version: str = SEV_SNP_MEASURE_VERSION) -> None:
        self.root = Path(directory)
        self.tool_version = tool_version
        safe_version = re.sub(r"[^0-9A-Za-z.+-]", "_", tool_version)
        self.base = self.root / f"v{_FORMAT}" / f"sev-snp-measure-{safe_version}"

    def _path(self, fw_sha384: str, key: str) -> Path:
        if not _HEX384.fullmatch(fw_sha384):
            raise ValueError("firmware digest must be 96 lowercase hex digits")
        name = hashlib.sha256(key.encode()).hexdigest()
        return self.base / fw_sha384 / f"{name}.json"

    def _read(self, fw_sha384: str, key: str) -> bytes | None:
        path = self._path(fw_sha384, key)
        try:
            with path.open("rb") as fh:
                raw = fh.read(_MAX_ENTRY_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("measurement cache entry %s unreadable (%s); recomputing", path, exc)
            return None
        measurement: str | None = None
        try:
            doc = json.loads(raw) if len(raw) <= _MAX_ENTRY_BYTES else None
            if (isinstance(doc, dict) and doc.get("format") == _FORMAT and doc.get("firmware") == fw_sha384
                    and doc.get("key") == key and doc.get("sev_snp_measure") == self.tool_version
                    and isinstance(doc.get("measurement"), str) and _HEX384.fullmatch(doc["measurement"])):
                measurement = doc["measurement"]
        except (ValueError, UnicodeDecodeError):
            pass
        if measurement is None:
            log.warning("measurement cache entry %s is corrupt; recomputing", path)
            return None
        value = bytes.fromhex(measurement)
        return value if len(value) == MEASUREMENT_SIZE else None

    def _write(self, fw_sha384: str, key: str, value: bytes) -> None:
        if len(value) != MEASUREMENT_SIZE:
            raise ValueError("a measurement is 48 bytes")
        path = self._path(fw_sha384, key)
        doc = {"format": _FORMAT, "firmware": fw_sha384, "key": key, "sev_snp_measure": self.tool_version,
               "measurement": value.hex()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
            try:
                with os.fdopen(fd, "w") as fh:
                    json.dump(doc, fh)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:  # a cache that cannot be written only costs time
            log.warning("cannot write measurement cache entry %s: %s", path, exc)

    def get(self, fw_sha384: str, shape_key: str) -> bytes | None:
        return self._read(fw_sha384, "shape:" + shape_key)

    def put(self, fw_sha384: str, shape_key: str, measurement: bytes) -> None:
        self._write(fw_sha384, "shape:" + shape_key, measurement)

    def get_seed(self, fw_sha384: str) -> bytes | None:
        return self._read(fw_sha384, _SEED_KEY)

    def put_seed(self, fw_sha384: str, seed: bytes) -> None:
        self._write(fw_sha384, _SEED_KEY, seed)
