"""KBS sessions and their nonces, all in the database (replicas share them).

A nonce is 32 random bytes (base64), bound to one session, single-use and
expiring. `consume` is one conditional UPDATE, so of two requests racing with
the same session exactly one sees rowcount 1, on SQLite and PostgreSQL alike.
"""
from __future__ import annotations

import base64
import secrets
import uuid
from dataclasses import dataclass

from sqlalchemy import delete, update
from sqlalchemy.orm import Session as OrmSession

from .db import AuditRecord, Session, SessionVerdict, now_ms

# Sessions are kept this long after they expire (audit has the history), then deleted.
GRACE_MS = 3600 * 1000


@dataclass(frozen=True)
class Consumed:
    ok: bool
    reason: str
    session: Session | None


def new_session(orm: OrmSession, tee: str, ttl_s: int, tenant_hint: str | None, commit: bool = True) -> Session:
    t = now_ms()
    row = Session(id=uuid.uuid4().hex, nonce=base64.b64encode(secrets.token_bytes(32)).decode(),
                  tee=tee, tenant_hint=tenant_hint, state="new", created_at=t, expires_at=t + ttl_s * 1000)
    orm.add(row)
    if commit:
        orm.commit()
    return row


def consume(orm: OrmSession, session_id: str) -> Consumed:
    """Atomically move a live, unused session to `attesting`; say why not otherwise."""
    t = now_ms()
    won = orm.execute(update(Session)
                      .where(Session.id == session_id, Session.state == "new", Session.expires_at > t)
                      .values(state="attesting")
                      .returning(Session.id)).first()
    orm.commit()
    row = orm.get(Session, session_id, populate_existing=True)
    if won is not None and row is not None:
        return Consumed(True, "", row)
    if row is None:
        return Consumed(False, "unknown session (no /auth, or it was purged)", None)
    if row.state != "new":
        return Consumed(False, "the session's nonce was already used (replay); start again at /auth", row)
    return Consumed(False, "the session expired; start again at /auth", row)


def purge_expired(orm: OrmSession, audit_days: int = 90, auth_audit_hours: int = 24) -> None:
    """Delete sessions an hour past expiry, `auth` audit rows (no decision in them) after
    `auth_audit_hours`, and every other audit row after `audit_days`. Bounded per call."""
    t = now_ms()
    old = [sid for (sid,) in orm.query(Session.id).filter(Session.expires_at < t - GRACE_MS).limit(500)]
    if old:
        orm.execute(delete(SessionVerdict).where(SessionVerdict.session_id.in_(old)))
        orm.execute(delete(Session).where(Session.id.in_(old)))
    for cutoff, only_auth in ((t - auth_audit_hours * 3600 * 1000, True), (t - audit_days * 86400 * 1000, False)):
        q = orm.query(AuditRecord.id).filter(AuditRecord.at < cutoff)
        if only_auth:
            q = q.filter(AuditRecord.event == "auth")
        ids = [i for (i,) in q.limit(5000)]
        if ids:
            orm.execute(delete(AuditRecord).where(AuditRecord.id.in_(ids)))
    orm.commit()
