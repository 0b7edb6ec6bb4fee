"""Storage: SQLAlchemy 2 models, engine setup and the schema migration step.

Everything that matters between requests lives here (sessions, nonces, secrets,
firmware, audit, the token signing key), so several broker replicas can share
one database. SQLite (a file) by default, PostgreSQL by URL.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from verifier.errors import FirmgateError

log = logging.getLogger(__name__)

# Bump with every schema change and add a step to MIGRATIONS.
SCHEMA_VERSION = 1


def now_ms() -> int:
    return int(time.time() * 1000)


class Base(DeclarativeBase):
    pass


class SchemaVersion(Base):
    __tablename__ = "fg_schema_version"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1: one row
    version: Mapped[int] = mapped_column(Integer)
    migrated_at: Mapped[int] = mapped_column(BigInteger)


class Tenant(Base):
    __tablename__ = "fg_tenants"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[int] = mapped_column(BigInteger)


class ApiToken(Base):
    """Admin API tokens: only the SHA-256 of the token is stored."""

    __tablename__ = "fg_api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger)


class Session(Base):
    """One KBS session: inserted by the /attest that spends its nonce (/auth stores nothing; broker/nonces.py)."""

    __tablename__ = "fg_sessions"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # uuid4 hex, the cookie
    nonce: Mapped[str] = mapped_column(String(64))  # SHA-256 (hex) of the nonce as issued
    tee: Mapped[str] = mapped_column(String(32))
    tenant_hint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # attesting (nonce spent) -> attested | failed ("new": rows of brokers before stateless /auth)
    state: Mapped[str] = mapped_column(String(16), default="new")
    created_at: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[int] = mapped_column(BigInteger, index=True)
    evidence_json: Mapped[str | None] = mapped_column(Text, nullable=True)  # primary evidence as sent
    tee_pubkey_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    expected_report_data: Mapped[str | None] = mapped_column(String(128), nullable=True)  # hex
    expected_host_data: Mapped[str | None] = mapped_column(String(64), nullable=True)  # hex; from init-data
    measurement: Mapped[str | None] = mapped_column(String(96), nullable=True)
    token_jti: Mapped[str | None] = mapped_column(String(64), nullable=True)


class SessionVerdict(Base):
    """A tenant's appraisal of a session's evidence, valid while the policy is unchanged."""

    __tablename__ = "fg_session_verdicts"
    __table_args__ = (UniqueConstraint("session_id", "tenant", "policy_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(String(32), index=True)
    tenant: Mapped[str] = mapped_column(String(64))
    policy_id: Mapped[str] = mapped_column(String(128))
    accepted: Mapped[bool] = mapped_column(Boolean)
    verdict_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[int] = mapped_column(BigInteger)


class Secret(Base):
    """A resource value, AES-256-GCM encrypted under the master key (AAD = tenant + path)."""

    __tablename__ = "fg_secrets"
    __table_args__ = (UniqueConstraint("tenant", "path"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    path: Mapped[str] = mapped_column(String(256))  # "<repo>/<type>/<tag>", repo == tenant
    nonce: Mapped[bytes] = mapped_column(LargeBinary(12))
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)


class FirmwareBlob(Base):
    """Firmware bytes uploaded by a tenant (or sent by a guest) whose digest a policy allows."""

    __tablename__ = "fg_firmware"
    sha384: Mapped[str] = mapped_column(String(96), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    source: Mapped[str] = mapped_column(String(80))  # "tenant:<name>" or "guest:<session>"
    created_at: Mapped[int] = mapped_column(BigInteger)


class AuditRecord(Base):
    __tablename__ = "fg_audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[int] = mapped_column(BigInteger, index=True)
    tenant: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    event: Mapped[str] = mapped_column(String(32))  # auth | attest | release | deny | admin
    session_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    resource: Mapped[str | None] = mapped_column(String(256), nullable=True)
    firmware_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    measurement: Mapped[str | None] = mapped_column(String(96), nullable=True)
    outcome: Mapped[str] = mapped_column(String(16))  # ok | denied | error
    reason: Mapped[str] = mapped_column(Text)
    verdict_json: Mapped[str | None] = mapped_column(Text, nullable=True)


class KeyMaterial(Base):
    """Broker keys shared by every replica (the EAR token key), encrypted under the master key."""

    __tablename__ = "fg_keys"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    nonce: Mapped[bytes] = mapped_column(LargeBinary(12))
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[int] = mapped_column(BigInteger)


def _private_sqlite_file(database: str | None) -> None:
    """Create a new SQLite file 0600 before SQLite does (it would use 0644 under the usual umask);
    SQLite gives its -wal and -shm files the mode of the database file, so they are 0600 too."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    try:
        fd = os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        mode = os.stat(database).st_mode & 0o777
        if mode & 0o077:
            log.warning("%s is mode %o: others may read the broker's database (chmod 600 it)", database, mode)
        return
    except OSError:
        return  # no such directory etc.: SQLite reports it when it connects
    os.close(fd)


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL and a busy timeout so replicas and threads can share it."""
    kwargs: dict[str, Any] = {"future": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    else:
        kwargs.update(pool_size=10, max_overflow=20)
    engine = create_engine(url, **kwargs)
    if engine.dialect.name != "sqlite":
        _ping_when_idle(engine)
    if engine.dialect.name == "sqlite":
        _private_sqlite_file(engine.url.database)
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=30000")
            _journal_mode_wal(cur)
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
    return engine


def _journal_mode_wal(cur: Any) -> None:
    """Switch a SQLite file to WAL. The switch needs the file to itself and SQLite answers "locked"
    at once instead of waiting in busy_timeout, which workers opening a fresh file together hit:
    retry for up to 30 s, like the busy timeout."""
    import sqlite3
    deadline = time.monotonic() + 30.0
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# A pooled server connection idle longer than this is pinged before use. pool_pre_ping pings on
# every checkout: a round trip per request, about a tenth of a handshake's broker CPU on
# PostgreSQL (bench/broker.py). A connection back in use within the second is one that just
# worked; if it died in between, its statement fails, the request gets a 503 and the connection
# is discarded (hotsql.run / SQLAlchemy invalidate it), so an outage costs no restart.
PING_IDLE_S = 1.0


def _ping_when_idle(engine: Engine) -> None:
    @event.listens_for(engine.pool, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        record.info["fg_idle_since"] = time.monotonic()

    @event.listens_for(engine.pool, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("fg_idle_since")
        if since is None or time.monotonic() - since < PING_IDLE_S:
            return  # new (just connected), or used a moment ago
        try:
            ping(dbapi_conn)
        except Exception as exc:  # any failure is a dead connection: the pool reconnects
            raise DisconnectionError("pooled connection failed its ping") from exc


def ping(dbapi_conn: Any) -> None:
    """One `SELECT 1` on a driver connection, its transaction ended; raises if the server is gone."""
    cur = dbapi_conn.cursor()
    try:
        cur.execute("SELECT 1")
    finally:
        cur.close()
    dbapi_conn.rollback()  # end the ping's transaction (psycopg begins one for any statement)


# Ordered migration steps: MIGRATIONS[n] upgrades a schema at version n to n+1.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {}


class SchemaError(FirmgateError):
    """The database schema is newer than this code (or a migration step is missing)."""


def _lock(conn: Connection) -> None:
    # Workers or replicas starting together: one migrates, the others wait. PostgreSQL: an advisory
    # lock. SQLite: take the write lock before looking at the schema (BEGIN IMMEDIATE; the others
    # wait in busy_timeout). pysqlite opens no transaction before a read or DDL by itself, so without
    # it two gunicorn workers on a fresh file both saw no schema and one failed creating it.
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(7310255)"))
    elif conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def migrate(engine: Engine) -> int:
    """Create or upgrade the schema to SCHEMA_VERSION; returns the version found before."""
    with engine.begin() as conn:
        _lock(conn)
        if not inspect(conn).has_table(SchemaVersion.__tablename__):
            Base.metadata.create_all(conn)
            conn.execute(cast(Table, SchemaVersion.__table__).insert().values(id=1, version=SCHEMA_VERSION, migrated_at=now_ms()))
            return 0
        found = conn.execute(select(SchemaVersion.version).where(SchemaVersion.id == 1)).scalar_one()
        if found > SCHEMA_VERSION:
            raise SchemaError(f"database schema version {found} is newer than this broker ({SCHEMA_VERSION})")
        version = found
        while version < SCHEMA_VERSION:
            if version not in MIGRATIONS:
                raise SchemaError(f"no migration step from schema version {version}")
            MIGRATIONS[version](conn)
            version += 1
        # New tables added since are created; existing ones are left to the steps above.
        Base.metadata.create_all(conn)
        conn.execute(cast(Table, SchemaVersion.__table__).update().where(SchemaVersion.id == 1)
                     .values(version=SCHEMA_VERSION, migrated_at=now_ms()))
        return int(found)


def schema_version(engine: Engine) -> int | None:
    with engine.connect() as conn:
        if not inspect(conn).has_table(SchemaVersion.__tablename__):
            return None
        return int(conn.execute(select(SchemaVersion.version).where(SchemaVersion.id == 1)).scalar_one())
