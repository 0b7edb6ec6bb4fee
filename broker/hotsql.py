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


@contextmanager
def one_round_trip(db: Connection | OrmSession) -> Iterator[None]:
    """On PostgreSQL (psycopg), what `run` sends inside the block, and a `db.commit()` ending it, go
    to the server in one round trip (psycopg's pipeline mode); a statement's error surfaces at
    that commit, as the same SQLAlchemy exception. Elsewhere the block runs as written."""
    if not isinstance(db, Connection) or db.dialect.driver != "psycopg":
        yield
        return
    if not db.in_transaction():
        db.begin()
    raw = db.connection.dbapi_connection
    assert raw is not None
    try:
        with raw.pipeline():
            yield
    except DBAPIError:  # raised by SQLAlchemy's commit() inside the block
        _end_failed(db, raw)
        raise
    except db.dialect.loaded_dbapi.Error as exc:  # raised when the pipeline synced at the block's end
        err = _wrap(db, exc, "(pipeline)", None, raw, None)
        _end_failed(db, raw)
        raise err from exc


def _end_failed(db: Connection, raw: Any) -> None:
    """A failed commit in a pipeline leaves the server's transaction aborted while SQLAlchemy counts
    it as ended: end it on the driver too, so the next statement on this connection runs."""
    if db.invalidated:
        return
    try:
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
        if many:
            cursor.executemany(sql, args)
        else:
            cursor.execute(sql, args)
        return list(cursor.fetchall()) if fetch else []
    except db.dialect.loaded_dbapi.Error as exc:
        raise _wrap(db, exc, sql, args, raw, cursor) from exc
    finally:
        cursor.close()
