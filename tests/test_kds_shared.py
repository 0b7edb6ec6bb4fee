"""AMD KDS for a fleet (issue 21): answers cached in the shared database, so replicas fetch each item
once; HTTP 429 honoured with a back-off; work continues offline from the cache.

A real HTTP server on loopback plays KDS (real AMD certificates from ../shared); the "replicas"
are fetchers with their own disk caches over one real database (SQLite, and PostgreSQL when
FIRMGATE_TEST_PG_URL is set).
"""
from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import SNP_VECTORS
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_broker_support import DbSpec, db  # noqa: F401

from broker.db import make_engine, migrate
from broker.kds_store import SharedKdsFetcher
from verifier.abi.fields import Product, TcbVersion
from verifier.errors import FetchError
from verifier.kds.fetch import HttpFetcher, RateLimited, retry_after_seconds

TCB = TcbVersion(bootloader=3, tee=0, snp=8, microcode=115)


def _crl() -> bytes:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CRL issuer")])
    now = dt.datetime.now(dt.UTC)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(name).last_update(now)
           .next_update(now + dt.timedelta(days=1)).sign(key, hashes.SHA384()))
    return crl.public_bytes(serialization.Encoding.DER)


class _Kds(BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []
    mode = "ok"            # ok | 429 | down
    crl = b""

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        roots = SNP_VECTORS / "roots" / "milan"
        status, headers = 200, {}
        if type(self).mode == "429":
            status, body, headers = 429, b"slow down", {"Retry-After": "30"}
        elif type(self).mode == "429-bare":
            status, body = 429, b"slow down"
        elif type(self).mode == "down":
            status, body = 503, b"maintenance"
        elif self.path == "/vcek/v1/Milan/cert_chain":
            body = (roots / "ask.pem").read_bytes() + (roots / "ark.pem").read_bytes()
        elif self.path == "/vcek/v1/Milan/crl":
            body = type(self).crl
        elif self.path.startswith("/vcek/v1/Milan/"):
            body = (SNP_VECTORS / "virtee-milan-v2" / "vcek.der").read_bytes()
        else:
            status, body = 404, b"not found"
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def kds() -> Iterator[str]:
    _Kds.hits, _Kds.mode, _Kds.crl = [], "ok", _crl()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Kds)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _replica(db_url: str, disk: Path, kds_url: str, offline: bool = False) -> SharedKdsFetcher:
    engine = make_engine(db_url)
    migrate(engine)
    return SharedKdsFetcher(engine, HttpFetcher(disk, base_url=kds_url, offline=offline))


def test_replicas_fetch_each_item_once(db: DbSpec, kds: str, tmp_path: Path) -> None:  # noqa: F811
    replicas = [_replica(db.url, tmp_path / f"disk{i}", kds) for i in range(3)]
    chains = [r.chain(Product.MILAN, "VCEK") for r in replicas]
    vceks = [r.vcek(Product.MILAN, bytes(64), TCB) for r in replicas]
    crls = [r.crl(Product.MILAN, "VCEK") for r in replicas]
    assert len(set(chains)) == len(set(vceks)) == len(set(crls)) == 1
    assert vceks[0] == (SNP_VECTORS / "virtee-milan-v2" / "vcek.der").read_bytes()
    # Three items, three replicas: one fetch each.
    assert sorted(h.split("?")[0][:18] for h in _Kds.hits) == ["/vcek/v1/Milan/000", "/vcek/v1/Milan/cer",
                                                               "/vcek/v1/Milan/crl"], _Kds.hits
    # A replica with no disk cache and no network still works from the shared table.
    offline = _replica(db.url, tmp_path / "disk-offline", "http://127.0.0.1:9", offline=True)
    assert offline.chain(Product.MILAN, "VCEK") == chains[0]
    assert offline.local_crl(Product.MILAN, "VCEK") == crls[0]
    for r in (*replicas, offline):
        r.engine.dispose()


def test_rate_limit_backs_off_and_a_stale_crl_is_still_used(db: DbSpec, kds: str, tmp_path: Path,  # noqa: F811
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    r = _replica(db.url, tmp_path / "disk", kds)
    crl = r.crl(Product.MILAN, "VCEK")
    _Kds.mode = "429"
    with pytest.raises(RateLimited) as err:
        r.chain(Product.MILAN, "VCEK")
    assert err.value.retry_after >= 30                 # Retry-After honoured
    hits = len(_Kds.hits)
    with pytest.raises(RateLimited, match="not asking"):
        r.vcek(Product.MILAN, bytes(64), TCB)           # within the back-off: KDS is not asked at all
    assert len(_Kds.hits) == hits
    # The CRL goes stale; KDS cannot be asked: the shared copy is used rather than none.
    import broker.kds_store as ks
    monkeypatch.setattr(ks, "CRL_MAX_AGE", -1.0)
    assert r.crl(Product.MILAN, "VCEK") == crl
    assert len(_Kds.hits) == hits
    r.engine.dispose()


def test_kds_down_and_nothing_cached_cannot_decide(db: DbSpec, kds: str, tmp_path: Path) -> None:  # noqa: F811
    _Kds.mode = "down"
    r = _replica(db.url, tmp_path / "disk", kds)
    with pytest.raises(FetchError, match="HTTP 503"):
        r.chain(Product.MILAN, "VCEK")
    r.engine.dispose()


def test_backoff_doubles_and_retry_after_is_bounded(kds: str, tmp_path: Path) -> None:
    from verifier.kds import fetch
    _Kds.mode = "429-bare"   # no Retry-After: our own back-off, doubling
    f = HttpFetcher(tmp_path, base_url=kds)
    delays = []
    for _ in range(4):
        with pytest.raises(RateLimited) as err:
            f.chain(Product.MILAN, "VCEK")
        delays.append(err.value.retry_after)
        f._not_before = 0.0  # let the next attempt through, to see the back-off grow
    assert delays == [fetch.BACKOFF_FIRST * 2 ** i for i in range(4)]
    assert retry_after_seconds("120") == 120.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") is None   # an HTTP-date is not trusted
    assert retry_after_seconds("99999999") is None
