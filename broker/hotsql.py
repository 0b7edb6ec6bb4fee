"""The KBS routes' per-handshake statements, run on the request connection's DBAPI cursor.

SQLAlchemy Core costs about as much CPU per statement as SQLite takes to run
it (bench/README.md, "broker"): an execution context, compiled-cache lookups,
result metadata. The handful of statements every handshake runs are fixed, so
each is compiled once per dialect and parameter shape and then handed to the
driver directly, inside the transaction of the request's SQLAlchemy
`Connection` (its `commit()`/`rollback()` end it, the pool still checks the
connection out, pings and resets it). Driver errors become the same
`sqlalchemy.exc.DBAPIError` subclasses (IntegrityError, OperationalError...)
that `Connection.execute` raises, and a lost connection is invalidated, so the
error handlers and the pool behave as before.

Anything that is not a `Connection` (the ORM session of the admin API, tests)
goes through `execute` as usual. The SQL text is SQLAlchemy's own compilation
of the Core statement: no dialect is written by hand.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.sql.expression import Executable

_Compiled = tuple[str, tuple[str, ...] | None, dict[str, Any]]


class Hot:
    """A Core statement built once at import, compiled once per (dialect, parameter names)."""

    def __init__(self, stmt: Executable) -> None:
        self.stmt = stmt
        self._forms: dict[tuple[str, tuple[str, ...]], _Compiled] = {}
        self._lock = threading.Lock()

    def compiled(self, dialect: Dialect, keys: tuple[str, ...]) -> _Compiled:
        """(SQL text, bind names in order for a positional driver or None, default bind values)."""
        form = self._forms.get((dialect.name, keys))
        if form is None:
            comp = self.stmt.compile(dialect=dialect, column_keys=list(keys))  # type: ignore[attr-defined]
            if any(b.expanding for b in comp.binds.values()):
                raise TypeError("expanding (IN) parameters are not supported here")
            defaults = {k: v for k, v in comp.params.items() if k not in keys}
            order = tuple(comp.positiontup) if dialect.positional else None
            form = (comp.string, order, defaults)
            with self._lock:  # a dict write under the GIL is atomic; the lock keeps the intent plain
                self._forms[(dialect.name, keys)] = form
        return form


def _args(order: tuple[str, ...] | None, defaults: dict[str, Any], params: Mapping[str, Any]) -> Any:
    merged = {**defaults, **params} if defaults else params
    return tuple(merged[k] for k in order) if order is not None else merged


def _wrap(db: Connection, exc: Any, sql: str, args: Any, raw: Any, cursor: Any) -> StatementError:
    """The exception `Connection.execute` would raise for the driver's `exc` (a lost connection invalidated)."""
    lost = db.dialect.is_disconnect(exc, raw, cursor)
    if lost:
        db.invalidate(exc)
    err: StatementError = DBAPIError.instance(sql, args, exc, db.dialect.loaded_dbapi.Error,
                                              connection_invalidated=lost, dialect=db.dialect)
    return err


def _psycopg(db: Connection | OrmSession) -> Any | None:
    """The psycopg driver connection under `db`, or None (SQLite, an ORM session, or a connection
    invalidated earlier in the request: the plain path then raises SQLAlchemy's own error)."""
    if not isinstance(db, Connection) or db.dialect.driver != "psycopg" or db.invalidated:
        return None
    return db.connection.dbapi_connection


def _idle(raw: Any) -> bool:
    return bool(raw.info.transaction_status == 0)  # psycopg.pq.TransactionStatus.IDLE: no transaction open


@contextmanager
def committed(db: Connection | OrmSession) -> Iterator[None]:
    """What `run` sends inside the block, committed together at its end; if a statement fails,
    none of them is (the same SQLAlchemy exception `Connection.execute` raises). Do not commit
    or read inside the block (a read would sync the pipeline, and with it commit what came before).

    On PostgreSQL (psycopg) the block is one round trip when no transaction is open: the
    statements are pipelined in autocommit mode, and the Sync that ends the pipeline ends them as
    one implicit transaction (PostgreSQL, "Pipeline Mode": with no BEGIN, an error rolls back
    every statement since the last Sync and skips the rest). psycopg's own transaction in a
    pipeline costs two more round trips (it waits for BEGIN and for COMMIT). With a transaction
    already open (reads before the block) the statements are pipelined inside it and committed.
    Elsewhere the block runs as written, then commits."""
    raw = _psycopg(db)
    if raw is None:
        yield
        db.commit()
        return
    assert isinstance(db, Connection)
    implicit = _idle(raw)
    if implicit:
        raw.autocommit = True
    try:
        with raw.pipeline():
            try:
                yield
            except BaseException:
                if implicit:
                    # The block broke off before its end: in Python, or in the driver before a
                    # statement reached the server (psycopg refuses a NUL in text there). The Sync
                    # that psycopg sends on leaving the pipeline would commit the statements queued
                    # so far: drop the connection first, and the server rolls back an implicit
                    # transaction that no Sync ended. (A server's error surfaces only at that Sync,
                    # outside this block, and has then cancelled every statement of it.)
                    db.invalidate()
                raise
            if not implicit:
                db.commit()
    except DBAPIError:  # raised by SQLAlchemy's commit() inside the block
        _end_failed(db, raw, implicit)
        raise
    except db.dialect.loaded_dbapi.Error as exc:  # raised when the pipeline synced at the block's end
        err = _wrap(db, exc, "(pipeline)", None, raw, None)
        _end_failed(db, raw, implicit)
        raise err from exc
    if implicit:
        raw.autocommit = False  # idle again: the Sync ended the implicit transaction
        db.commit()  # SQLAlchemy's bookkeeping; psycopg has no transaction to end (no round trip)


def read(db: Connection | OrmSession, hot: Hot, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """`run(..., fetch=True)` for a read that needs no transaction: on PostgreSQL with none open,
    one round trip in autocommit mode (psycopg would send BEGIN and wait for it first)."""
    raw = _psycopg(db)
    if raw is None or not _idle(raw):
        return run(db, hot, params, fetch=True)
    assert isinstance(db, Connection)
    raw.autocommit = True
    try:
        return run(db, hot, params, fetch=True)
    finally:
        if not db.invalidated:
            raw.autocommit = False


def reusable(db: Connection) -> bool:
    """After a request, before its connection is kept for the next: end a transaction the driver
    still has open although SQLAlchemy counts none, and say whether the connection may be kept
    (not a psycopg one left in autocommit mode by a block cut off before its Sync)."""
    raw = _psycopg(db)
    if raw is not None:
        if raw.autocommit:
            return False
        if not _idle(raw):
            raw.rollback()
        return True
    sqlite_conn = db.connection.dbapi_connection
    if getattr(sqlite_conn, "in_transaction", False):
        sqlite_conn.rollback()  # type: ignore[union-attr]
    return True


def _end_failed(db: Connection, raw: Any, implicit: bool) -> None:
    """A failed commit in a pipeline leaves the server's transaction aborted while SQLAlchemy counts
    it as ended: end it on the driver too (and leave autocommit mode), so the next statement on
    this connection runs."""
    if db.invalidated:
        return
    try:
        if implicit:
            raw.autocommit = False
        else:
            raw.rollback()
    except db.dialect.loaded_dbapi.Error:
        db.invalidate()


def run(db: Connection | OrmSession, hot: Hot, params: Mapping[str, Any] | Sequence[Mapping[str, Any]] = (),
        fetch: bool = False) -> list[tuple[Any, ...]]:
    """Execute `hot` with one parameter set, or many (a list: executemany); the rows if `fetch`."""
    many = isinstance(params, Sequence)
    if not isinstance(db, Connection):
        res = db.execute(hot.stmt, list(params) if many else params)  # type: ignore[arg-type]
        return [tuple(r) for r in res] if fetch else []
    if many and not params:
        return []
    sets: Sequence[Mapping[str, Any]] = params if isinstance(params, Sequence) else [params]
    first = sets[0]
    sql, order, defaults = hot.compiled(db.dialect, tuple(first))
    if not db.in_transaction():
        db.begin()  # SQLAlchemy's own transaction: its commit()/rollback() end what we run here
    raw = db.connection.dbapi_connection
    assert raw is not None
    cursor = raw.cursor()
    args: Any = [_args(order, defaults, p) for p in sets] if many else _args(order, defaults, first)
    try:
        if many and getattr(getattr(raw, "pgconn", None), "pipeline_status", None):
            # In a pipeline psycopg's executemany nests one, which syncs what is queued before it
            # (`committed` counts on a single Sync): queue each row as its own statement instead.
            for a in args:
                cursor.execute(sql, a)
        elif many:
            cursor.executemany(sql, args)
        else:
            cursor.execute(sql, args)
        return list(cursor.fetchall()) if fetch else []
    except db.dialect.loaded_dbapi.Error as exc:
        raise _wrap(db, exc, sql, args, raw, cursor) from exc
    finally:
        cursor.close()
