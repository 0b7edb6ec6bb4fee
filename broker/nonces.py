"""KBS sessions and their nonces, all in the database (replicas share them).

A nonce is 32 random bytes (base64), bound to one session, single-use and
expiring. `consume` is one conditional UPDATE, so of two requests racing with
the same session exactly one sees its row back, on SQLite and PostgreSQL alike.

These run on every handshake, so they are SQLAlchemy Core statements built
once and run by `hotsql.run` on the request's connection (`state.get_db()`):
compiled once per dialect, executed on the driver's cursor inside that
connection's transaction. `db` may be a Core Connection or an ORM Session
(which executes the same statements the ordinary way); both commit.
"""
from __future__ import annotations

import base64
import secrets
import uuid
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, delete, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session as OrmSession

from . import audit
from .db import AuditRecord, Secret, Session, SessionVerdict, now_ms
from .hotsql import Hot, run

Db = Connection | OrmSession

# Sessions are kept this long after they expire (audit has the history), then deleted.
GRACE_MS = 3600 * 1000

_S = cast(Table, Session.__table__)
_V = cast(Table, SessionVerdict.__table__)
_SEC = cast(Table, Secret.__table__)

# The per-handshake statements, built once (SQLAlchemy then only looks up their compiled form).
_INSERT_SESSION = Hot(insert(_S))
_CONSUME = Hot(update(_S).where(_S.c.id == bindparam("sid"), _S.c.state == "new", _S.c.expires_at > bindparam("now"))
            .values(state="attesting").returning(_S.c.nonce, _S.c.tenant_hint, _S.c.expires_at))
_WHY_NOT = Hot(select(_S.c.state, _S.c.tenant_hint).where(_S.c.id == bindparam("sid")))
_SET_STATE = Hot(update(_S).where(_S.c.id == bindparam("sid")))
_INSERT_VERDICTS = Hot(insert(_V))
_EVIDENCE = Hot(select(_S.c.evidence_json).where(_S.c.id == bindparam("sid")))
# A session and, in the same statement, its verdict for one tenant under one policy version and
# the sealed value of the resource asked for (one round trip per /resource instead of two; the
# value is opened only once the release is decided).
_LOAD = Hot(select(_S.c.id, _S.c.state, _S.c.expires_at, _S.c.tee_pubkey_json, _S.c.measurement,
                _S.c.expected_report_data, _S.c.expected_host_data, _V.c.verdict_json,
                _SEC.c.nonce, _SEC.c.ciphertext)
         .select_from(_S.outerjoin(_V, and_(_V.c.session_id == _S.c.id, _V.c.tenant == bindparam("tenant"),
                                            _V.c.policy_id == bindparam("policy_id")))
                      .outerjoin(_SEC, and_(_SEC.c.tenant == bindparam("tenant"), _SEC.c.path == bindparam("path"))))
         .where(_S.c.id == bindparam("sid")))


@dataclass(frozen=True)
class NewSession:
    id: str
    nonce: str
    expires_at: int


@dataclass(frozen=True)
class Consumed:
    """The outcome of `consume`: on success the session's nonce, hint and expiry, else why not."""

    ok: bool
    reason: str
    nonce: str = ""
    tenant_hint: str | None = None
    expires_at: int = 0


@dataclass(frozen=True)
class AttestedSession:
    """What /resource needs of a session (the evidence is fetched only if re-appraisal needs it),
    with the cached verdict for the tenant and policy version asked about, if there is one."""

    id: str
    state: str
    expires_at: int
    tee_pubkey_json: str | None
    measurement: str | None
    expected_report_data: str | None
    expected_host_data: str | None
    verdict_json: str | None = None
    secret_nonce: bytes | None = None       # the sealed resource value asked for, if `load` was given a path
    secret_ciphertext: bytes | None = None


def new_session(db: Db, tee: str, ttl_s: int, tenant_hint: str | None, commit: bool = True) -> NewSession:
    t = now_ms()
    row = NewSession(uuid.uuid4().hex, base64.b64encode(secrets.token_bytes(32)).decode(), t + ttl_s * 1000)
    run(db, _INSERT_SESSION, {"id": row.id, "nonce": row.nonce, "tee": tee, "tenant_hint": tenant_hint,
                            "state": "new", "created_at": t, "expires_at": row.expires_at})
    if commit:
        db.commit()
    return row


def consume(db: Db, session_id: str) -> Consumed:
    """Atomically move a live, unused session to `attesting` (committed at once); say why not otherwise."""
    t = now_ms()
    won = run(db, _CONSUME, {"sid": session_id, "now": t}, fetch=True)
    db.commit()
    if won:
        nonce, hint, expires_at = won[0]
        return Consumed(True, "", nonce, hint, int(expires_at))
    rows = run(db, _WHY_NOT, {"sid": session_id}, fetch=True)
    db.commit()  # end the read: the denial's audit row is written in a transaction of its own
    if not rows:
        return Consumed(False, "unknown session (no /auth, or it was purged)")
    state, hint = rows[0]
    if state != "new":
        return Consumed(False, "the session's nonce was already used (replay); start again at /auth",
                        tenant_hint=hint)
    return Consumed(False, "the session expired; start again at /auth", tenant_hint=hint)


def mark_failed(db: Db, session_id: str) -> None:
    """The caller commits (with the denial's audit row)."""
    run(db, _SET_STATE, {"sid": session_id, "state": "failed"})


def mark_attested(db: Db, session_id: str, values: dict[str, Any]) -> None:
    """Record what the evidence proved; the caller commits (with the verdicts and audit rows)."""
    run(db, _SET_STATE, {"sid": session_id, "state": "attested", **values})


def load(db: Db, session_id: str, tenant: str = "", policy_id: str = "", path: str = "") -> AttestedSession | None:
    """The session, with its verdict for `tenant` under `policy_id` when one is cached, and the
    sealed value of `tenant`'s resource `path` when there is one."""
    rows = run(db, _LOAD, {"sid": session_id, "tenant": tenant, "policy_id": policy_id, "path": path}, fetch=True)
    if not rows:
        return None
    r = rows[0]
    return AttestedSession(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9])


def evidence_json(db: Db, session_id: str) -> str | None:
    rows = run(db, _EVIDENCE, {"sid": session_id}, fetch=True)
    return rows[0][0] if rows else None


def add_verdicts(db: Db, rows: list[dict[str, Any]]) -> None:
    """SessionVerdict rows: session_id, tenant, policy_id, accepted, verdict_json, created_at."""
    if rows:
        run(db, _INSERT_VERDICTS, rows)


def purge_expired(db: Db, audit_days: int = 90, auth_audit_hours: int = 24) -> None:
    """Delete sessions an hour past expiry, `auth` audit rows (no decision in them) and operator-only
    denials (nothing verified in them) after `auth_audit_hours`, and every other audit row after
    `audit_days`. Bounded per call."""
    t = now_ms()
    old = list(db.execute(select(_S.c.id).where(_S.c.expires_at < t - GRACE_MS).limit(500)).scalars())
    if old:
        db.execute(delete(_V).where(_V.c.session_id.in_(old)))
        db.execute(delete(_S).where(_S.c.id.in_(old)))
    a = cast(Table, AuditRecord.__table__)
    for cutoff, only_auth in ((t - auth_audit_hours * 3600 * 1000, True), (t - audit_days * 86400 * 1000, False)):
        q = select(a.c.id).where(a.c.at < cutoff)
        if only_auth:
            q = q.where(audit.short_retention(a))
        ids = list(db.execute(q.limit(5000)).scalars())
        if ids:
            db.execute(delete(a).where(a.c.id.in_(ids)))
    db.commit()
