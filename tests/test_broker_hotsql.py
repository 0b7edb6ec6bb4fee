"""broker.hotsql: the handshake statements run on the driver's cursor behave as Connection.execute does.

Real SQLite and (when FIRMGATE_TEST_PG_URL is set) real PostgreSQL: same rows, same
transaction boundaries, and driver errors surface as SQLAlchemy's exception classes
(the broker's error handlers and its IntegrityError handling depend on that).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session as OrmSession

from broker import audit, nonces
from broker.db import AuditRecord, SessionVerdict, make_engine, migrate
from broker.hotsql import Hot, run
from tests.test_broker_support import DbSpec, db  # noqa: F401 - the fixture

KEY = nonces.nonce_key(b"\x07" * 32)


def _spent(db: object, hint: str | None = None) -> nonces.NewSession:
    """A challenge whose nonce is spent (its session row inserted and committed)."""
    new = nonces.new_session(KEY, "snp", 60, hint)
    assert nonces.consume(db, KEY, new.id, new.nonce).ok  # type: ignore[arg-type]
    return new


@pytest.fixture
def engine(db: DbSpec) -> Iterator[Engine]:  # noqa: F811 - the fixture
    """The broker's schema in the test database (SQLite, or a PostgreSQL schema of its own)."""
    eng = make_engine(db.url)
    migrate(eng)
    yield eng
    eng.dispose()


def _verdict_row(sid: str) -> dict[str, object]:
    return {"session_id": sid, "tenant": "acme", "policy_id": "p1", "accepted": True, "verdict_json": "{}",
            "created_at": 1}


def test_session_lifecycle_and_rollback(engine: Engine) -> None:
    with engine.connect() as conn:
        new = nonces.new_session(KEY, "snp", 60, "acme")
        won = nonces.consume(conn, KEY, new.id, new.nonce)
        assert won.ok and won.nonce == new.nonce and won.tenant_hint == "acme"
        again = nonces.consume(conn, KEY, new.id, new.nonce)
        assert not again.ok and "replay" in again.reason and again.tenant_hint == "acme"
        assert "not this session's nonce" in nonces.consume(conn, KEY, "0" * 32, new.nonce).reason
        # Written, then rolled back: neither the state nor the verdict may stay.
        nonces.mark_attested(conn, new.id, {"measurement": "ab" * 48, "tee_pubkey_json": "{}"})
        nonces.add_verdicts(conn, [_verdict_row(new.id)])
        conn.rollback()
        row = nonces.load(conn, new.id, "acme", "p1")
        assert row is not None and row.state == "attesting" and row.verdict_json is None
        nonces.mark_attested(conn, new.id, {"measurement": "ab" * 48, "tee_pubkey_json": "{}"})
        nonces.add_verdicts(conn, [_verdict_row(new.id)])
        audit.write(conn, [audit.row(event="attest", outcome="ok", reason="r", session_id=new.id)])
    # A new connection sees what was committed.
    with engine.connect() as conn:
        row = nonces.load(conn, new.id, "acme", "p1")
        assert row is not None and row.state == "attested" and row.verdict_json == "{}"
        assert row.measurement == "ab" * 48 and row.secret_nonce is None
        n = conn.execute(select(AuditRecord.id).where(AuditRecord.session_id == new.id)).all()
        assert len(n) == 1
        # The unique (session, tenant, policy) constraint: SQLAlchemy's IntegrityError, as before.
        with pytest.raises(IntegrityError):
            nonces.add_verdicts(conn, [_verdict_row(new.id)])
        conn.rollback()
        assert nonces.evidence_json(conn, new.id) is None
        assert nonces.load(conn, "f" * 32) is None


def test_orm_session_takes_the_ordinary_path(engine: Engine) -> None:
    with OrmSession(engine) as orm:
        new = _spent(orm)
        nonces.add_verdicts(orm, [_verdict_row(new.id)])
        orm.commit()
        got = orm.execute(select(SessionVerdict.tenant).where(SessionVerdict.session_id == new.id)).scalars()
        assert list(got) == ["acme"]


def test_expanding_parameters_are_refused() -> None:
    from sqlalchemy.dialects import sqlite
    hot = Hot(select(AuditRecord.id).where(AuditRecord.id.in_([1, 2])))
    with pytest.raises(TypeError, match="expanding"):
        hot.compiled(sqlite.dialect(), ())


def test_empty_many_runs_nothing(tmp_path: object) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/x.db")
    migrate(engine)
    try:
        with engine.connect() as conn:
            assert run(conn, Hot(select(AuditRecord.id)), []) == []
            assert not conn.in_transaction()
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_idle_connection_is_pinged_and_a_used_one_fails_once(db: DbSpec, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """PostgreSQL: a pooled connection idle past PING_IDLE_S is pinged and replaced if dead; one
    reused sooner is not pinged, so its death costs that one request a DBAPIError (a 503), then
    the pool hands out a live connection."""
    if db.kind != "postgres":
        pytest.skip("server connections only")
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import DBAPIError

    from broker import db as dbmod
    from tests.test_broker_support import PG_URL
    assert PG_URL is not None
    engine = make_engine(db.url)
    migrate(engine)
    killer = create_engine(PG_URL, isolation_level="AUTOCOMMIT")

    def kill_pooled() -> int:
        with engine.connect() as conn:
            pid = int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
        with killer.connect() as k:
            assert k.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar_one() is True
        return pid

    try:
        monkeypatch.setattr(dbmod, "PING_IDLE_S", 0.0)  # every checkout counts as idle: pinged
        dead = kill_pooled()
        with engine.connect() as conn:
            assert int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one()) != dead
        monkeypatch.setattr(dbmod, "PING_IDLE_S", 3600.0)  # never idle long enough: not pinged
        kill_pooled()
        with pytest.raises(DBAPIError) as lost, engine.connect() as conn:
            run(conn, Hot(select(AuditRecord.id).limit(1)), {}, fetch=True)
        assert lost.value.connection_invalidated is True  # seen as a lost connection, not bad SQL
        with engine.connect() as conn:  # the dead one was discarded
            assert run(conn, Hot(select(AuditRecord.id).limit(1)), {}, fetch=True) == []
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()
        killer.dispose()


def test_committed_blocks_commit_together_or_not_at_all(engine: Engine) -> None:
    """The block's statements and its commit: all written, or (a failing statement) none, with
    SQLAlchemy's IntegrityError; on PostgreSQL this is psycopg's pipeline mode."""
    from broker.hotsql import committed
    with engine.connect() as conn:
        new = _spent(conn)
        with committed(conn):
            nonces.mark_attested(conn, new.id, {"measurement": "cd" * 48})
            nonces.add_verdicts(conn, [_verdict_row(new.id)])
            audit.write(conn, [audit.row(event="attest", outcome="ok", reason="one", session_id=new.id)], commit=False)
        with pytest.raises(IntegrityError), committed(conn):
            nonces.mark_failed(conn, new.id)
            nonces.add_verdicts(conn, [_verdict_row(new.id)])  # the same (session, tenant, policy) again
            audit.write(conn, [audit.row(event="attest", outcome="ok", reason="two", session_id=new.id)], commit=False)
        conn.rollback()
    with engine.connect() as conn:
        row = nonces.load(conn, new.id, "acme", "p1")
        assert row is not None and row.state == "attested" and row.measurement == "cd" * 48
        reasons = conn.execute(select(AuditRecord.reason).where(AuditRecord.session_id == new.id)).scalars()
        assert list(reasons) == ["one"]


def test_nonces_are_stateless_until_spent(engine: Engine) -> None:
    """/auth's challenge stores nothing; its nonce is bound to its cookie, expires, and is spent once."""
    from broker.db import Session
    plain, hinted = nonces.new_session(KEY, "snp", 60, None), nonces.new_session(KEY, "snp", 60, "a" * 63)
    assert len(plain.nonce) == 44 and len(hinted.nonce) == nonces.MAX_NONCE_CHARS  # Trustee's length
    with engine.connect() as conn:
        assert conn.execute(select(Session.id)).all() == []  # issuing wrote nothing
        other = nonces.new_session(KEY, "snp", 60, None)
        refused = [
            nonces.consume(conn, KEY, plain.id, other.nonce),              # another session's nonce
            nonces.consume(conn, KEY, other.id, plain.nonce),
            nonces.consume(conn, nonces.nonce_key(b"\x08" * 32), plain.id, plain.nonce),  # another key
            nonces.consume(conn, KEY, plain.id, plain.nonce[:-4] + "AAAA"),  # a changed tag
            nonces.consume(conn, KEY, plain.id, "not base64!"),
            nonces.consume(conn, KEY, plain.id, ""),
            nonces.consume(conn, KEY, "zz" * 16, plain.nonce),
        ]
        assert all(not r.ok and "not this session's nonce" in r.reason for r in refused)
        assert conn.execute(select(Session.id)).all() == []  # refusals spend nothing
        # A hint changed in the nonce breaks its tag.
        import base64
        raw = bytearray(base64.b64decode(hinted.nonce))
        raw[8] ^= 1
        assert not nonces.consume(conn, KEY, hinted.id, base64.b64encode(bytes(raw)).decode()).ok
        expired = nonces.new_session(KEY, "snp", -1, "acme")
        late = nonces.consume(conn, KEY, expired.id, expired.nonce)
        assert not late.ok and "expired" in late.reason and late.tenant_hint == "acme"
        won = nonces.consume(conn, KEY, hinted.id, hinted.nonce)
        assert won.ok and won.tenant_hint == "a" * 63 and won.expires_at == hinted.expires_at
        assert "replay" in nonces.consume(conn, KEY, hinted.id, hinted.nonce).reason
        rows = conn.execute(select(Session.id, Session.state, Session.nonce)).all()
        import hashlib
        assert [tuple(r) for r in rows] == [(hinted.id, "attesting", hashlib.sha256(hinted.nonce.encode()).hexdigest())]


def _python_error(conn: object, sid: str) -> None:
    _ = 1 / 0


def _nul_in_text(conn: object, sid: str) -> None:
    # psycopg refuses a NUL in text before the statement reaches the server.
    audit.write(conn, [audit.row(event="attest", outcome="ok", reason="nul \x00 here", session_id=sid)],  # type: ignore[arg-type]
                commit=False)


@pytest.mark.parametrize(("break_off", "raised"), [(_python_error, ZeroDivisionError), (_nul_in_text, DBAPIError)])
def test_a_committed_block_broken_off_commits_nothing(engine: Engine, db: DbSpec, break_off: Any,  # noqa: F811
                                                      raised: type[BaseException]) -> None:
    """A block broken off after some of its statements, in Python or by the driver refusing a statement
    before it reaches the server: none of them is committed. On PostgreSQL the connection is dropped
    before psycopg's Sync could commit the implicit transaction (outside review of issue 17, finding 1)."""
    from broker.hotsql import committed
    if break_off is _nul_in_text and db.kind != "postgres":
        pytest.skip("server connections only (a driver refusing a statement mid-pipeline is psycopg's case)")
    with engine.connect() as conn:
        new = _spent(conn)
        with pytest.raises(raised), committed(conn):
            nonces.mark_attested(conn, new.id, {"measurement": "ef" * 48})
            audit.write(conn, [audit.row(event="attest", outcome="ok", reason="half", session_id=new.id)],
                        commit=False)
            break_off(conn, new.id)
        if not conn.invalidated:
            conn.rollback()
    with engine.connect() as conn:
        row = nonces.load(conn, new.id, "acme", "p1")
        assert row is not None and row.state == "attesting" and row.measurement is None
        assert list(conn.execute(select(AuditRecord.id).where(AuditRecord.session_id == new.id))) == []


def test_a_nonce_in_another_base64_spelling_is_refused() -> None:
    """The base64 decoder ignores a last character's spare bits: only the spelling issued is the nonce
    (outside review of issue 17, finding 2), so REPORT_DATA, the token and the row name that one."""
    import base64
    new = nonces.new_session(KEY, "snp", 60, None)
    raw = base64.b64decode(new.nonce)
    last = new.nonce.rstrip("=")[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    twin = new.nonce.rstrip("=")[:-1] + alphabet[alphabet.index(last) ^ 1] + "=" * new.nonce.count("=")
    assert twin != new.nonce and base64.b64decode(twin) == raw
    assert nonces._read(KEY, new.id, twin) is None
    assert nonces._read(KEY, new.id, new.nonce) is not None
