"""Which tenants can accept a MEASUREMENT: an index over every tenant's reference table.

An attestation without a tenant hint is appraised only for the tenants this
index names (docs/protocol.md, "Tenant selection"). A policy accepts a report
only when its reference table holds the report's MEASUREMENT (the
`firmware.measurement` check fails otherwise), so a tenant outside
`candidates(m)` would only add a rejected verdict: skipping it changes no
answer and no release decision.

Admission by other means. Builds admitted on a trusted publisher's
endorsement are measured when their bytes arrive (the store, before tenants are
selected) and reach the index through `ReferenceTable.on_add` like any others.
A policy section that could only admit firmware during the appraisal itself
registers a predicate with `register_open_admission`: every tenant whose policy
it holds for is then always a candidate, and is appraised as before.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

from .policy import TenantPolicy

OpenAdmission = Callable[[TenantPolicy], bool]
_open_admission: list[OpenAdmission] = []


def register_open_admission(predicate: OpenAdmission) -> None:
    """Make tenants for whose policy `predicate` is true candidates for every measurement."""
    if predicate not in _open_admission:
        _open_admission.append(predicate)


def admits_unlisted_firmware(policy: TenantPolicy) -> bool:
    return any(pred(policy) for pred in _open_admission)


class MeasurementIndex:
    """measurement -> tenants whose reference table holds it, plus the always-candidate tenants.

    A superset is harmless (an extra tenant is appraised and rejected); a missing
    tenant is not, so entries are added before and removed after the tables change."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_measurement: dict[bytes, set[str]] = {}
        self._of: dict[str, set[bytes]] = {}
        self._open: set[str] = set()

    def set_tenant(self, tenant: str, measurements: list[bytes], open_admission: bool) -> None:
        """The tenant's whole entry (its policy was (re)loaded)."""
        with self._lock:
            self._drop(tenant)
            self._add(tenant, measurements)
            if open_admission:
                self._open.add(tenant)

    def add(self, tenant: str, measurements: list[bytes]) -> None:
        """Measurements added to a tenant's table (firmware bytes arrived)."""
        with self._lock:
            self._add(tenant, measurements)

    def remove(self, tenant: str) -> None:
        with self._lock:
            self._drop(tenant)

    def candidates(self, measurement: bytes) -> list[str]:
        with self._lock:
            found = self._by_measurement.get(bytes(measurement), set()) | self._open
        return sorted(found)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_measurement)

    def _add(self, tenant: str, measurements: list[bytes]) -> None:
        mine = self._of.setdefault(tenant, set())
        for m in measurements:
            self._by_measurement.setdefault(bytes(m), set()).add(tenant)
            mine.add(bytes(m))

    def _drop(self, tenant: str) -> None:
        self._open.discard(tenant)
        for m in self._of.pop(tenant, set()):
            users = self._by_measurement.get(m)
            if users is not None:
                users.discard(tenant)
                if not users:
                    del self._by_measurement[m]
