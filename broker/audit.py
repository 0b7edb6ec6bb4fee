"""The audit log: one row per auth, attest, release and denial (and admin change)."""
from __future__ import annotations

import json
from typing import Any, cast

import orjson
from sqlalchemy import Table, and_, insert, or_, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session as OrmSession

from verifier.verdict import Verdict

from .db import AuditRecord, now_ms
from .hotsql import Hot, run

_A = cast(Table, AuditRecord.__table__)
_INSERT = Hot(insert(_A))  # built once: it runs on every request


def verdict_facts(verdict: Verdict | None) -> tuple[str | None, str | None]:
    """(firmware id, measurement hex) named by a verdict's facts, whatever the verifier calls them."""
    if verdict is None:
        return None, None
    facts = verdict.facts or {}
    fw = facts.get("firmware_id")
    if fw is None and isinstance(facts.get("firmware"), dict):
        fw = facts["firmware"].get("id")
    meas = facts.get("measurement")
    return (str(fw) if fw is not None else None), (str(meas) if meas is not None else None)


def verdict_json(verdict: Verdict) -> str:
    """The one JSON form of a verdict (`Verdict.to_dict`), kept in the audit log and the session's
    verdict cache. The checks go to orjson as they are: it writes a dataclass as its fields in
    order and an Enum as its value, which is `CheckResult.to_dict`, without a dict per check."""
    doc = {"accepted": verdict.accepted, "evidence_sha384": verdict.evidence_sha384, "policy_id": verdict.policy_id,
           "facts": verdict.facts, "checks": verdict.checks}
    return orjson.dumps(doc, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def row(*, event: str, outcome: str, reason: str, tenant: str | None = None, session_id: str | None = None,
        resource: str | None = None, firmware_id: str | None = None, measurement: str | None = None,
        verdict: Verdict | dict[str, Any] | None = None, verdict_text: str | None = None) -> dict[str, Any]:
    """An audit row's values. `verdict_text` is the verdict's JSON when the caller already has it."""
    if verdict is not None:
        if isinstance(verdict, Verdict):
            fw, meas = verdict_facts(verdict)
            firmware_id = firmware_id or fw
            measurement = measurement or meas
            verdict_text = verdict_text or verdict_json(verdict)
        else:
            verdict_text = verdict_text or json.dumps(verdict, default=str)
    if tenant is None and outcome == "denied":
        reason = untrusted_text(reason)  # a refusal before anything verified may echo the caller's words
    return {"at": now_ms(), "tenant": tenant, "event": event, "session_id": session_id, "resource": resource,
            "firmware_id": firmware_id, "measurement": measurement, "outcome": outcome,
            "reason": reason[:4000], "verdict_json": verdict_text}


UNTRUSTED_REASON_CHARS = 240


def untrusted_text(text: str, limit: int = UNTRUSTED_REASON_CHARS) -> str:
    """A reason that may quote what an unauthenticated caller sent: non-printable and non-ASCII
    characters escaped (no forged lines, no look-alike text), cut to `limit` characters."""
    head = json.dumps(text[:limit])[1:-1]  # \n, \u202e, \" ...: what it is, not what it renders as
    if len(head) > limit or len(text) > limit:
        return head[:limit] + f" [cut; {len(text)} characters]"
    return head


def short_retention(table: Any) -> Any:
    """The rows kept only for the short retention (AUTH_AUDIT_RETENTION_HOURS): challenges, and
    operator-only denials (refused before anything was verified: no tenant's business)."""
    return or_(table.c.event == "auth", and_(table.c.tenant.is_(None), table.c.outcome == "denied"))


def write(db: Connection | OrmSession, rows: list[dict[str, Any]], commit: bool = True) -> None:
    """Insert audit rows (one statement) in the caller's transaction; commit unless told not to."""
    if rows:
        run(db, _INSERT, rows)
    if commit:
        db.commit()


def record(db: Connection | OrmSession, *, commit: bool = True, **fields: Any) -> None:
    """One audit row (see `row` for the fields); `db` is a Core Connection or an ORM Session."""
    write(db, [row(**fields)], commit)


def read(orm: OrmSession, tenant: str | None, after_id: int = 0, limit: int = 100) -> list[dict[str, Any]]:
    """A tenant's records (tenant=None: the operator's view of every record)."""
    q = select(AuditRecord).where(AuditRecord.id > after_id).order_by(AuditRecord.id).limit(limit)
    if tenant is not None:
        q = q.where(AuditRecord.tenant == tenant)
    out = []
    for r in orm.execute(q).scalars():
        out.append({"id": r.id, "at_ms": r.at, "tenant": r.tenant, "event": r.event, "session": r.session_id,
                    "resource": r.resource, "firmware_id": r.firmware_id, "measurement": r.measurement,
                    "outcome": r.outcome, "reason": r.reason,
                    "verdict": json.loads(r.verdict_json) if r.verdict_json else None})
    return out
