"""Per-app handles (engine, secret box, token key, appraiser) and the per-request ORM session.

Like flaskr/db.py: `init_app(app)` builds what lives as long as the process,
`get_orm()` opens one ORM session per app context and `teardown_appcontext`
closes it. Nothing here holds state that another replica would need.
"""
from __future__ import annotations

import logging
import os
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import Flask, current_app, g
from sqlalchemy import select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import sessionmaker

from .appraisal import Appraiser
from .config import default_state_dir, make_state_dir
from .db import PING_IDLE_S, FirmwareBlob, make_engine, migrate, ping
from .hotsql import reusable
from .nonces import nonce_key
from .secretbox import SecretBox, load_master_key, new_master_key
from .tokens import TokenKey

log = logging.getLogger(__name__)


@dataclass
class BrokerState:
    engine: Engine
    sessions: sessionmaker[OrmSession]
    box: SecretBox
    token_key: TokenKey
    appraiser: Appraiser | None
    appraiser_error: str | None
    firmware_seen: set[str]
    nonce_key: bytes  # the KBS nonces' HMAC key (broker/nonces.py), derived from the master key
    firmware_checked_at: float = 0.0
    # Connections kept checked out between requests (get_db), with when each was last used.
    idle_db: deque[tuple[Connection, float]] = field(default_factory=deque)


def _master_key(app: Flask) -> bytes:
    cfg = app.config
    if cfg.get("MASTER_KEY"):
        key = cfg["MASTER_KEY"]
        return key if isinstance(key, bytes) else load_master_key(env=str(key))
    if cfg.get("MASTER_KEY_FILE") or os.environ.get("FIRMGATE_MASTER_KEY"):
        return load_master_key(cfg.get("MASTER_KEY_FILE"))
    # Development default: a key file beside the default SQLite file, created once (0600).
    path = os.path.join(_state_dir(app), "master.key")
    if not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(new_master_key())
        log.warning("created a new master key in %s; back it up (secrets are unreadable without it)", path)
    return load_master_key(path)


def _appraiser(app: Flask, engine: Engine | None = None) -> tuple[Appraiser | None, str | None]:
    if app.config.get("APPRAISER") is not None:
        return app.config["APPRAISER"], None
    try:
        from .appraisal import VerifierAppraiser
        return VerifierAppraiser(app.config["POLICIES_DIR"], app.config.get("TRUST_ROOT_PEM"),
                                 app.config.get("KDS_CACHE"), bool(app.config.get("KDS_OFFLINE", True)),
                                 app.config.get("MEASURE_CACHE"),
                                 background=bool(app.config.get("POLICY_LOAD_BACKGROUND", True)),
                                 kds_engine=engine), None
    except Exception as exc:  # noqa: BLE001 - the broker still serves admin/ops routes; attest says why
        log.error("appraisal unavailable: %s", exc)
        return None, f"appraisal unavailable: {exc}"


def database_url(app: Flask) -> str:
    url = app.config.get("DATABASE_URL")
    if url:
        return str(url)
    return "sqlite:///" + os.path.join(_state_dir(app), "firmgate.db")


def _state_dir(app: Flask) -> Path:
    """The default database's and master key's directory (config STATE_DIR, docs/protocol.md), 0700."""
    return make_state_dir(app.config.get("STATE_DIR") or default_state_dir())


def init_app(app: Flask) -> None:
    engine = make_engine(database_url(app))
    migrate(engine)
    factory = sessionmaker(engine, expire_on_commit=False)
    master = _master_key(app)
    box = SecretBox(master)
    with factory() as orm:
        token_key = TokenKey.load_or_create(orm, box)
    appraiser, why = _appraiser(app, engine)
    st = BrokerState(engine, factory, box, token_key, appraiser, why, set(), nonce_key(master))
    weakref.finalize(st, _close_idle, st.idle_db)
    app.extensions["firmgate"] = st
    app.teardown_appcontext(_close_orm)


def state() -> BrokerState:
    st: BrokerState = current_app.extensions["firmgate"]
    return st


def get_orm() -> OrmSession:
    if "fg_orm" not in g:
        g.fg_orm = state().sessions()
    orm: OrmSession = g.fg_orm
    return orm


# At most this many connections are kept checked out between requests (the rest go back to the pool).
MAX_IDLE_DB = 16


def get_db() -> Connection:
    """The request's Core connection: the KBS routes' few statements per handshake go through it
    (an ORM unit of work costs several times more CPU than the statement it emits).

    Connections are kept checked out between requests, in a last-in first-out list on the app's
    state: a pool checkout and return (with its reset) per request cost about as much as a
    statement (bench/broker.py). A request starts outside a transaction and teardown ends any it
    left open, so a kept connection holds no lock or snapshot between requests. One idle for
    PING_IDLE_S or more is pinged first, as the pool does on checkout (a server connection may
    have died meanwhile); an invalidated or failing one is closed and the next one taken. The
    list is not per thread: werkzeug's development server starts a thread per request."""
    if "fg_db" not in g:
        st = state()
        conn: Connection | None = None
        while conn is None:
            try:
                kept, used_at = st.idle_db.pop()
            except IndexError:
                conn = st.engine.connect()
                break
            if not kept.closed and not kept.invalidated and _alive(kept, used_at):
                conn = kept
            else:
                _close_quietly(kept)
        g.fg_db = conn
    db: Connection = g.fg_db
    return db


def _alive(conn: Connection, used_at: float) -> bool:
    if conn.dialect.name == "sqlite" or time.monotonic() - used_at < PING_IDLE_S:
        return True  # a file, or used a moment ago
    try:
        raw = conn.connection.dbapi_connection
        if raw is None:
            return False
        ping(raw)
        return True
    except Exception:  # noqa: BLE001 - any failure is a dead connection: check out another
        conn.invalidate()
        return False


def _close_quietly(conn: Connection) -> None:
    try:
        conn.close()
    except Exception as exc:  # noqa: BLE001 - a dead connection must not fail a request
        log.warning("closing a database connection failed: %s", type(exc).__name__)


def _close_idle(idle: deque[tuple[Connection, float]]) -> None:
    """When the app's state goes (tests build many apps): its kept connections back to the pool."""
    while idle:
        _close_quietly(idle.pop()[0])


def _close_orm(_exc: BaseException | None) -> None:
    # Closing (and for the kept connection, rolling back) ends whatever a failed request left uncommitted.
    orm = g.pop("fg_orm", None)
    if orm is not None:
        try:
            orm.close()
        except Exception as exc:  # noqa: BLE001 - a dead connection at teardown must not become an HTML 500
            log.warning("closing the database orm failed: %s", type(exc).__name__)
    db: Connection | None = g.pop("fg_db", None)
    if db is None:
        return
    idle = current_app.extensions["firmgate"].idle_db
    try:
        if not db.invalidated:
            if db.in_transaction():
                db.rollback()
            if reusable(db) and len(idle) < MAX_IDLE_DB:
                idle.append((db, time.monotonic()))
                return
    except Exception as exc:  # noqa: BLE001 - a dead connection at teardown must not become an HTML 500
        log.warning("ending the request's database transaction failed: %s", type(exc).__name__)
    _close_quietly(db)


def sync_firmware(st: BrokerState, db: Connection | OrmSession, min_interval: float = 1.0) -> None:
    """Give the appraiser firmware bytes uploaded through any replica since we last looked
    (at most once a second: uploads through this replica are added at once anyway)."""
    if st.appraiser is None:
        return
    now = time.monotonic()
    if now - st.firmware_checked_at < min_interval:
        return
    st.firmware_checked_at = now
    sizes = {d: n for d, n in db.execute(select(FirmwareBlob.sha384, FirmwareBlob.size)).all()}
    # Smallest first: an endorsement (a few KiB) must be known before the firmware it admits.
    for digest in sorted(set(sizes) - st.firmware_seen, key=lambda d: (sizes[d], d)):
        data = db.execute(select(FirmwareBlob.data).where(FirmwareBlob.sha384 == digest)).scalar()
        if data is not None:
            try:
                st.appraiser.add_firmware(data)
            except Exception as exc:  # noqa: BLE001 - one bad blob must not stop attestation
                log.error("stored firmware %s not usable: %s", digest, exc)
        st.firmware_seen.add(digest)


def app_state_summary(st: BrokerState) -> dict[str, Any]:
    out: dict[str, Any] = {"appraiser": "ok" if st.appraiser is not None else st.appraiser_error}
    from .tenant_select import policies_loading
    if policies_loading(st):
        out["policies"] = "loading"  # tenants loaded so far are served; the others wait (docs/protocol.md)
    return out
