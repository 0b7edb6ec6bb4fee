"""AMD KDS answers (VCEKs, cert chains, CRLs) cached in the broker's shared database.

N broker replicas share one database: what one of them fetched from AMD KDS,
the others read from the table `fg_kds_cache` instead of asking KDS again (KDS
rate-limits by client address, HTTP 429). Order per item: the database, then
the replica's disk cache and AMD KDS (verifier.kds.fetch.HttpFetcher, which
honours 429 with a back-off). When KDS cannot be asked (offline, unreachable,
rate-limited), a stale CRL in the database is used rather than none, and a
warning logged; VCEKs and chains never go stale (they are signed by the pinned ARK,
which the verifier checks on every use).

Only bytes that parsed as certificates / a CRL are stored (HttpFetcher checks
before it returns them), and the verifier checks each against AMD's pinned roots
on every use: the table is a cache, not a trust anchor.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

from sqlalchemy import BigInteger, LargeBinary, String, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Mapped, mapped_column

from verifier.abi.fields import Product, TcbVersion
from verifier.errors import FetchError
from verifier.kds import chain_url, crl_url, vcek_url
from verifier.kds.fetch import CRL_MAX_AGE, MAX_RESPONSE, HttpFetcher

from .db import Base, now_ms

log = logging.getLogger(__name__)


class KdsCacheEntry(Base):
    """One AMD KDS answer, by the SHA-256 of its URL."""

    __tablename__ = "fg_kds_cache"
    url_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    url: Mapped[str] = mapped_column(String(512))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    fetched_at: Mapped[int] = mapped_column(BigInteger)


class SharedKdsFetcher:
    """A CertFetcher: the shared database first, then `http` (disk cache, AMD KDS)."""

    def __init__(self, engine: Engine, http: HttpFetcher) -> None:
        self.engine = engine
        self.http = http
        KdsCacheEntry.__table__.create(engine, checkfirst=True)  # type: ignore[attr-defined]

    def _row(self, url: str) -> tuple[bytes, int] | None:
        key = hashlib.sha256(url.encode()).hexdigest()
        try:
            with self.engine.connect() as conn:
                row = conn.execute(select(KdsCacheEntry.body, KdsCacheEntry.fetched_at)
                                   .where(KdsCacheEntry.url_sha256 == key)).first()
        except SQLAlchemyError as exc:  # the database is down: the disk cache and KDS still work
            log.warning("KDS cache table unreadable (%s); asking the disk cache / KDS", type(exc).__name__)
            return None
        if row is None or len(row[0]) > MAX_RESPONSE:
            return None
        return bytes(row[0]), int(row[1])

    def _store(self, url: str, body: bytes) -> None:
        key = hashlib.sha256(url.encode()).hexdigest()
        table = KdsCacheEntry.__table__
        try:
            with self.engine.begin() as conn:
                updated = conn.execute(table.update().where(table.c.url_sha256 == key)  # type: ignore[attr-defined]
                                       .values(body=body, fetched_at=now_ms())).rowcount
                if not updated:
                    conn.execute(table.insert().values(url_sha256=key, url=url[:512], body=body,  # type: ignore[attr-defined]
                                                       fetched_at=now_ms()))
        except IntegrityError:
            pass  # another replica stored it at the same moment: same bytes from the same URL
        except SQLAlchemyError as exc:
            log.warning("KDS cache table not writable (%s); the answer is cached on disk only", type(exc).__name__)

    def _get(self, url: str, fetch: Callable[[], bytes | None], max_age_s: float | None) -> bytes:
        cached = self._row(url)
        if cached is not None and (max_age_s is None or (now_ms() - cached[1]) / 1000 < max_age_s):
            return cached[0]
        try:
            body = fetch()
            if body is None:
                raise FetchError(f"no source had {url}")
        except FetchError:
            if cached is not None:  # offline, unreachable or rate-limited: a stale CRL beats none
                log.warning("AMD KDS not reachable; using the shared cache's copy of %s from %s", url,
                            time.strftime("%Y-%m-%d %H:%M", time.gmtime(cached[1] / 1000)))
                return cached[0]
            raise
        if cached is None or cached[0] != body or max_age_s is not None:
            self._store(url, body)
        return body

    def vcek(self, product: Product, chip_id: bytes, tcb: TcbVersion) -> bytes:
        return self._get(vcek_url(product, chip_id, tcb), lambda: self.http.vcek(product, chip_id, tcb), None)

    def chain(self, product: Product, signer: str) -> bytes:
        return self._get(chain_url(product, signer), lambda: self.http.chain(product, signer), None)

    def crl(self, product: Product, signer: str) -> bytes | None:
        return self._get(crl_url(product, signer), lambda: self.http.crl(product, signer), CRL_MAX_AGE)

    def local_crl(self, product: Product, signer: str) -> bytes | None:
        """The CRL without network access: the shared table's copy, else the disk cache's."""
        cached = self._row(crl_url(product, signer))
        return cached[0] if cached is not None else self.http.local_crl(product, signer)
