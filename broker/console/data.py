"""What the console shows, read from the database and the policy store; no Flask here.

Every tenant query filters on `AuditRecord.tenant == tenant` (or the secrets'
tenant column): a tenant's pages are built from its own rows only. Audit rows
that belong to no tenant (challenges, denials before a tenant was known,
evidence-level records) are the operator's and never appear here.
"""
from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import func, select
from sqlalchemy.orm import Session as OrmSession

from ..db import AuditRecord, Secret, Tenant

HOUR_MS = 3600 * 1000
PAGE_SIZE = 50
MAX_VERDICT_CHARS = 256 * 1024   # a stored verdict larger than this is shown as "too large"
SINCE = {"1h": 3600, "24h": 24 * 3600, "7d": 7 * 24 * 3600, "30d": 30 * 24 * 3600, "all": None}
OUTCOMES = ("all", "ok", "denied")
EVENTS = ("all", "attest", "release", "deny", "admin")


def utc(ms: int | None) -> str:
    if ms is None:
        return "never"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@dataclass(frozen=True)
class Check:
    name: str
    outcome: str
    message: str
    expected: str | None
    actual: str | None


@dataclass(frozen=True)
class Row:
    id: int
    at: str
    event: str
    outcome: str
    resource: str | None
    firmware_id: str | None
    measurement: str | None
    reason: str
    policy_id: str | None
    checks: tuple[Check, ...]      # failures first, then warnings, then the rest (each in verdict order)
    verdict_note: str | None       # why the checks are missing, if they are

    @property
    def failed(self) -> int:
        return sum(1 for c in self.checks if c.outcome == "fail")


def _checks(verdict_json: str | None) -> tuple[tuple[Check, ...], str | None, str | None]:
    if not verdict_json:
        return (), None, None
    if len(verdict_json) > MAX_VERDICT_CHARS:
        return (), None, "verdict too large to show"
    try:
        doc = orjson.loads(verdict_json)
    except orjson.JSONDecodeError:
        return (), None, "verdict unreadable"
    if not isinstance(doc, dict):
        return (), None, "verdict unreadable"
    out = []
    for c in doc.get("checks") or ():
        if isinstance(c, dict):
            out.append(Check(str(c.get("name", "")), str(c.get("outcome", "")), str(c.get("message", "")),
                             None if c.get("expected") is None else str(c["expected"]),
                             None if c.get("actual") is None else str(c["actual"])))
    pid = doc.get("policy_id")
    rank = {"fail": 0, "warn": 1}
    out.sort(key=lambda c: rank.get(c.outcome, 2))  # stable: verdict order within each group
    return tuple(out), (str(pid) if pid else None), None


def activity(orm: OrmSession, tenant: str, *, outcome: str = "all", event: str = "all", since: str = "24h",
             before: int | None = None, now_ms: int | None = None) -> list[Row]:
    """The tenant's newest audit rows (PAGE_SIZE), filtered; `before` pages back by row id."""
    q = select(AuditRecord).where(AuditRecord.tenant == tenant)
    if outcome != "all":
        q = q.where(AuditRecord.outcome == outcome)
    if event != "all":
        q = q.where(AuditRecord.event == event)
    window = SINCE.get(since)
    if window is not None:
        t = now_ms if now_ms is not None else int(time.time() * 1000)
        q = q.where(AuditRecord.at >= t - window * 1000)
    if before is not None:
        q = q.where(AuditRecord.id < before)
    q = q.order_by(AuditRecord.id.desc()).limit(PAGE_SIZE)
    rows = []
    for r in orm.execute(q).scalars():
        checks, pid, note = _checks(r.verdict_json)
        rows.append(Row(r.id, utc(r.at), r.event, r.outcome, r.resource, r.firmware_id, r.measurement, r.reason,
                        pid, checks, note))
    return rows


@dataclass(frozen=True)
class HourCount:
    start_ms: int
    releases: int
    denials: int


def per_hour(orm: OrmSession, tenant: str, hours: int = 24, now_ms: int | None = None) -> list[HourCount]:
    """Releases and denials of the tenant in each of the last `hours` hours (oldest first), counted in SQL."""
    t = now_ms if now_ms is not None else int(time.time() * 1000)
    end = (t // HOUR_MS + 1) * HOUR_MS
    start = end - hours * HOUR_MS
    bucket = (AuditRecord.at // HOUR_MS).label("h")
    kind = AuditRecord.outcome
    q = (select(bucket, AuditRecord.event, kind, func.count())
         .where(AuditRecord.tenant == tenant, AuditRecord.at >= start, AuditRecord.at < end,
                AuditRecord.event.in_(("attest", "release", "deny")))
         .group_by(bucket, AuditRecord.event, kind))
    rel = [0] * hours
    den = [0] * hours
    first = start // HOUR_MS
    for h, ev, oc, n in orm.execute(q):
        i = int(h) - first
        if not 0 <= i < hours:
            continue
        if ev == "release" and oc == "ok":
            rel[i] += int(n)
        elif oc == "denied":
            den[i] += int(n)
    return [HourCount(start + i * HOUR_MS, rel[i], den[i]) for i in range(hours)]


@dataclass(frozen=True)
class SecretRow:
    path: str
    size: int
    updated: str
    last_release: str


def secrets_of(orm: OrmSession, tenant: str) -> list[SecretRow]:
    """The tenant's secrets: names, sizes, last change and last release. Never a value."""
    last = dict(orm.execute(
        select(AuditRecord.resource, func.max(AuditRecord.at))
        .where(AuditRecord.tenant == tenant, AuditRecord.event == "release", AuditRecord.outcome == "ok")
        .group_by(AuditRecord.resource)).all())
    rows = orm.execute(select(Secret.path, func.length(Secret.ciphertext), Secret.updated_at)
                       .where(Secret.tenant == tenant).order_by(Secret.path)).all()
    return [SecretRow(path, int(n) - 16, utc(upd), utc(last.get(path))) for path, n, upd in rows]


# -- the policy in force ----------------------------------------------------------------------------
def fmt(value: Any) -> str:
    """One rule value as text, the same way everywhere (None = not checked)."""
    if value is None:
        return "not checked"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex() or "(empty)"
    if isinstance(value, (frozenset, set)):
        return ", ".join(sorted(fmt(v) for v in value)) or "none"
    if isinstance(value, (tuple, list)):
        return ", ".join(fmt(v) for v in value) or "none"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        parts = [f"{f.name}={fmt(getattr(value, f.name))}" for f in dataclasses.fields(value)
                 if getattr(value, f.name) is not None]
        return " ".join(parts) or "-"
    return str(value)


@dataclass(frozen=True)
class RuleSection:
    """One part of the policy: a list of (rule, value), or a table of entries."""

    title: str
    pairs: tuple[tuple[str, str], ...] = ()
    columns: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()


# Shown in their own tables (firmware, shapes) or as facts (tenant, path, digest): not repeated as rules.
_SPECIAL = {"tenant", "path", "digest", "base_dir", "firmware", "shapes", "description"}


def rule_sections(policy: Any) -> list[RuleSection]:
    """Every rule of a policy, read from its dataclass fields (rules added later show up by themselves)."""
    out: list[RuleSection] = []
    top: list[tuple[str, str]] = []
    for f in dataclasses.fields(policy):
        if f.name in _SPECIAL:
            continue
        value = getattr(policy, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            pairs = tuple((g.name, fmt(getattr(value, g.name))) for g in dataclasses.fields(value))
            out.append(RuleSection(f.name, pairs=pairs))
        elif isinstance(value, tuple) and value and all(dataclasses.is_dataclass(v) for v in value):
            cols = tuple(g.name for g in dataclasses.fields(value[0]))
            rows = tuple(tuple(fmt(getattr(v, c)) for c in cols) for v in value)
            out.append(RuleSection(f.name, columns=cols, rows=rows))
        else:
            top.append((f.name, fmt(value)))
    shapes = getattr(policy, "shapes", ())
    if shapes:
        cols = tuple(g.name for g in dataclasses.fields(shapes[0]))
        out.insert(0, RuleSection("shapes", columns=cols,
                                  rows=tuple(tuple(fmt(getattr(s, c)) for c in cols) for s in shapes)))
    if top:
        out.insert(0, RuleSection("firmware rules", pairs=tuple(top)))
    return out


@dataclass(frozen=True)
class TableRow:
    firmware_id: str
    svn: str
    revoked: bool
    vmm: str
    vcpus: str
    vcpu_type: str
    guest_features: str
    kernel_hashes: str
    measurement: str


@dataclass(frozen=True)
class PolicyView:
    policy_id: str
    commit: str | None
    dirty: bool
    loaded_at: str
    description: str
    digest: str
    refused: tuple[str, ...]        # errors of a newer file that was refused (the last good one is in force)
    firmware: tuple[tuple[str, str, str, str, str], ...]   # id, sha384, svn, bytes, state
    sections: tuple[RuleSection, ...]
    table: tuple[TableRow, ...]


def policy_view(loaded: Any, refused: list[str]) -> PolicyView:
    """The console's view of a verifier LoadedPolicy (its policy, provenance and reference table)."""
    policy, table = loaded.policy, loaded.table
    revoked = set(policy.revoked)
    missing = dict(getattr(table, "missing", {}))
    fw_rows = []
    for fw in policy.firmware:
        st = "revoked" if fw.id in revoked else ("measured" if table.measured(fw.id)
                                                   else missing.get(fw.id, "not measured"))
        fw_rows.append((fw.id, fw.sha384, str(fw.svn), fw.location, st))
    trows = []
    for meas, match in table.entries():
        s = match.shape
        trows.append(TableRow(match.firmware.id, str(match.firmware.svn), match.firmware.id in revoked,
                              fmt(getattr(s, "vmm", None)), str(getattr(s, "vcpus", "")),
                              fmt(getattr(s, "vcpu_type", None)), hex(int(getattr(s, "guest_features", 0))),
                              "yes" if getattr(s, "kernel_hashes", None) is not None else "no", meas.hex()))
    trows.sort(key=lambda r: (r.firmware_id, r.vmm, r.vcpu_type, int(r.vcpus) if r.vcpus.isdigit() else 0))
    return PolicyView(str(loaded.policy_id), loaded.commit, bool(loaded.dirty), utc(int(loaded.loaded_at * 1000)),
                      policy.description, policy.digest, tuple(refused), tuple(fw_rows),
                      tuple(rule_sections(policy)), tuple(trows))


# -- the operator's view --------------------------------------------------------------------------
@dataclass(frozen=True)
class TenantRow:
    name: str
    created: str
    policy_id: str | None
    refused: int


def tenant_list(orm: OrmSession, status: dict[str, Any]) -> list[TenantRow]:
    """Tenants in the database, and tenants that only have a policy file, with their policy state."""
    created = {n: c for n, c in orm.execute(select(Tenant.name, Tenant.created_at))}
    names = sorted(set(created) | set(status))
    out = []
    for n in names:
        s = status.get(n) or {}
        out.append(TenantRow(n, utc(created[n]) if n in created else "no account (policy file only)",
                             s.get("policy_id"), len(s.get("refused") or ())))
    return out
