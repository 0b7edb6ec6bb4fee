"""KBS sessions and their nonces: issued without state, spent in the database (replicas share it).

/auth stores nothing. The session id (the cookie) is 16 random bytes; the nonce
carries what /attest needs to know of the challenge and is authenticated to the
session id with an HMAC under a key derived from the master key (every replica
derives the same one):

    nonce = base64(version 1 | tee | expires_at ms (6 bytes) | tenant hint | tag)
    tag   = HMAC-SHA256(key, "firmgate kbs nonce\\0" | session id | everything before it)[:24]

32 bytes without a hint: 44 characters, Trustee's nonce length. The guest treats
it as opaque (KBS-FACTS section 2). /attest checks the tag and the expiry, then
spends the nonce: one INSERT of the session row, whose primary key is the
session id, committed at once. Of two requests racing with the same session
exactly one inserts it, on SQLite and PostgreSQL alike, and a spent nonce stays
spent until its row is purged, an hour after it expired.

So an unauthenticated /auth costs the broker no database write at all (before,
a session row and an audit row each; docs/security.md). The row is created
where the nonce is spent, and holds what the evidence proved.

These run on every handshake, so they are SQLAlchemy Core statements built
once and run by `hotsql.run` on the request's connection (`state.get_db()`):
compiled once per dialect, executed on the driver's cursor inside that
connection's transaction. `db` may be a Core Connection or an ORM Session
(which executes the same statements the ordinary way); both commit.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any, cast

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import Table, and_, bindparam, delete, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as OrmSession

from . import audit
from .db import AuditRecord, Secret, Session, SessionVerdict, now_ms
from .hotsql import Hot, committed, read, run

Db = Connection | OrmSession

# Sessions are kept this long after they expire (audit has the history), then deleted.
GRACE_MS = 3600 * 1000

_S = cast(Table, Session.__table__)
_V = cast(Table, SessionVerdict.__table__)
_SEC = cast(Table, Secret.__table__)

TEES = ("snp",)          # the TEEs a nonce can name (its tee byte is the index)
_VERSION = 1
_TAG = 24                # bytes of HMAC-SHA256 kept
_HEAD = 8                # version, tee, expires_at (6 bytes)
MAX_HINT = 63            # a tenant name (limits.valid_tenant)
MAX_NONCE_CHARS = 4 * -(-(_HEAD + MAX_HINT + _TAG) // 3)   # 128
_DOMAIN = b"firmgate kbs nonce\0"

# The per-handshake statements, built once (SQLAlchemy then only looks up their compiled form).
_INSERT_SESSION = Hot(insert(_S))
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


def nonce_key(master_key: bytes) -> bytes:
    """The nonces' HMAC key, derived from the master key (HKDF-SHA256): the same on every replica."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"firmgate kbs nonce v1").derive(master_key)


def _tag(key: bytes, session_id: bytes, body: bytes) -> bytes:
    return hmac.new(key, _DOMAIN + session_id + body, hashlib.sha256).digest()[:_TAG]


def new_session(key: bytes, tee: str, ttl_s: int, tenant_hint: str | None) -> NewSession:
    """A challenge: a fresh session id and its nonce (nothing is stored). `tenant_hint` must be a
    valid tenant name (the caller checked it), `tee` one of TEES."""
    hint = (tenant_hint or "").encode("ascii")
    if len(hint) > MAX_HINT:
        raise ValueError("tenant hint longer than a tenant name")
    sid = secrets.token_bytes(16)
    expires_at = now_ms() + ttl_s * 1000
    body = bytes((_VERSION, TEES.index(tee))) + expires_at.to_bytes(6, "big") + hint
    return NewSession(sid.hex(), base64.b64encode(body + _tag(key, sid, body)).decode("ascii"), expires_at)


@dataclass(frozen=True)
class _Challenge:
    tee: str
    expires_at: int
    tenant_hint: str | None


def _read(key: bytes, session_id: str, nonce: str) -> _Challenge | None:
    """What this broker put in `nonce` for `session_id` (a 32-hex cookie), or None if it did not issue it."""
    if not isinstance(nonce, str) or not 0 < len(nonce) <= MAX_NONCE_CHARS:
        return None
    try:
        raw = base64.b64decode(nonce, validate=True)
        sid = bytes.fromhex(session_id)
    except (binascii.Error, ValueError):
        return None
    if base64.b64encode(raw).decode("ascii") != nonce:
        return None  # the decoder ignores a last character's spare bits: only the form we issued counts
    if len(raw) < _HEAD + _TAG or len(sid) != 16:
        return None
    body, tag = raw[:-_TAG], raw[-_TAG:]
    if not hmac.compare_digest(tag, _tag(key, sid, body)) or body[0] != _VERSION or body[1] >= len(TEES):
        return None
    hint = body[_HEAD:].decode("ascii", "replace")  # ours: ASCII by construction
    return _Challenge(TEES[body[1]], int.from_bytes(body[2:_HEAD], "big"), hint or None)


def consume(db: Db, key: bytes, session_id: str, nonce: str) -> Consumed:
    """Spend `nonce` of session `session_id`: its row inserted and committed at once (the nonce is
    spent whatever happens next); say why not otherwise (not ours, expired, already spent)."""
    challenge = _read(key, session_id, nonce)
    if challenge is None:
        return Consumed(False, "runtime-data.nonce is not this session's nonce (a nonce from /auth with "
                        "this session's cookie)")
    t = now_ms()
    if challenge.expires_at <= t:
        return Consumed(False, "the session expired; start again at /auth", tenant_hint=challenge.tenant_hint)
    try:
        with committed(db):  # the INSERT and its commit: one round trip on PostgreSQL
            run(db, _INSERT_SESSION, {"id": session_id, "nonce": hashlib.sha256(nonce.encode("ascii")).hexdigest(),
                                      "tee": challenge.tee, "tenant_hint": challenge.tenant_hint,
                                      "state": "attesting", "created_at": t, "expires_at": challenge.expires_at})
    except IntegrityError:  # the row is there: this nonce was spent before
        db.rollback()
        return Consumed(False, "the session's nonce was already used (replay); start again at /auth",
                        tenant_hint=challenge.tenant_hint)
    return Consumed(True, "", nonce, challenge.tenant_hint, challenge.expires_at)


def mark_failed(db: Db, session_id: str) -> None:
    """The caller commits (with the denial's audit row)."""
    run(db, _SET_STATE, {"sid": session_id, "state": "failed"})


def mark_attested(db: Db, session_id: str, values: dict[str, Any]) -> None:
    """Record what the evidence proved; the caller commits (with the verdicts and audit rows)."""
    run(db, _SET_STATE, {"sid": session_id, "state": "attested", **values})


def load(db: Db, session_id: str, tenant: str = "", policy_id: str = "", path: str = "") -> AttestedSession | None:
    """The session, with its verdict for `tenant` under `policy_id` when one is cached, and the
    sealed value of `tenant`'s resource `path` when there is one."""
    rows = read(db, _LOAD, {"sid": session_id, "tenant": tenant, "policy_id": policy_id, "path": path})
    if not rows:
        return None
    r = rows[0]
    return AttestedSession(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9])


def evidence_json(db: Db, session_id: str) -> str | None:
    rows = read(db, _EVIDENCE, {"sid": session_id})
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
