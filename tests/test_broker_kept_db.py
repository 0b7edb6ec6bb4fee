"""broker.state.get_db: connections kept checked out between requests (issue 17) start every request clean.

Real SQLite and (with FIRMGATE_TEST_PG_URL) real PostgreSQL, over the app's own routes: the
same connection serves the next request, no transaction survives a request (not even one
only the driver knows of), a server connection that died while kept is replaced after its
idle ping, and a dropped app gives its connections back.
"""
from __future__ import annotations

import gc
from typing import Any

from sqlalchemy import text

from broker import create_app
from tests.test_broker_support import DbSpec, db, random_master_key  # noqa: F401 - the fixture


def _app(spec: DbSpec) -> Any:
    return create_app({"DATABASE_URL": spec.url, "MASTER_KEY": random_master_key(), "APPRAISER": object(),
                       "OPERATOR_TOKEN": "op"})


def _attest_without_cookie(client: Any) -> None:
    """A request that uses the KBS connection: a refusal, audited (one INSERT and a commit)."""
    r = client.post("/kbs/v0/attest", json={})
    assert r.status_code == 401 and "no kbs-session-id cookie" in r.get_json()["detail"]


def _driver_busy(conn: Any) -> bool:
    raw = conn.connection.dbapi_connection
    info = getattr(raw, "info", None)
    return info.transaction_status != 0 if info is not None else bool(raw.in_transaction)


def test_a_kept_connection_serves_the_next_request_clean(db: DbSpec) -> None:  # noqa: F811 - the fixture
    app = _app(db)
    st = app.extensions["firmgate"]
    client = app.test_client()
    _attest_without_cookie(client)
    assert len(st.idle_db) == 1
    first = st.idle_db[0][0]
    for _ in range(3):
        _attest_without_cookie(client)
        assert [c for c, _t in st.idle_db] == [first]  # the same one, back after each request
        assert not first.in_transaction() and not _driver_busy(first)
    # A transaction only the driver knows of (SQLAlchemy counts none) is ended at teardown too.
    with app.test_request_context("/"):
        from broker.state import get_db
        conn = get_db()
        assert conn is first
        conn.connection.dbapi_connection.cursor().execute("SELECT 1 FROM fg_audit")
        if db.kind == "sqlite":
            conn.connection.dbapi_connection.execute("BEGIN")
        assert _driver_busy(conn) and not conn.in_transaction()
    assert not _driver_busy(first)
    _attest_without_cookie(client)
    with st.sessions() as orm:
        assert orm.execute(text("SELECT count(*) FROM fg_audit")).scalar_one() == 5
    st.engine.dispose()


def test_a_dead_kept_connection_is_replaced(db: DbSpec) -> None:  # noqa: F811 - the fixture
    if db.kind != "postgres":
        import pytest
        pytest.skip("server connections only")
    app = _app(db)
    st = app.extensions["firmgate"]
    client = app.test_client()
    _attest_without_cookie(client)
    kept, _used = st.idle_db.pop()
    pid = kept.connection.dbapi_connection.info.backend_pid
    st.idle_db.append((kept, 0.0))  # idle for ages: pinged before use
    with st.engine.connect() as other:
        assert other.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar_one()
        other.commit()
    _attest_without_cookie(client)  # the ping fails, another connection serves the request
    assert len(st.idle_db) == 1 and st.idle_db[0][0] is not kept
    st.engine.dispose()


def test_a_dropped_app_gives_its_connections_back(db: DbSpec) -> None:  # noqa: F811 - the fixture
    app = _app(db)
    st = app.extensions["firmgate"]
    _attest_without_cookie(app.test_client())
    engine = st.engine
    assert engine.pool.checkedout() == 1
    del app, st
    gc.collect()
    assert engine.pool.checkedout() == 0
    engine.dispose()
