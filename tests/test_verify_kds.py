"""The KDS client against a real HTTP server on loopback: cache, offline mode, 429 and errors."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from verifier.abi.fields import Product
from verifier.certs import load_certificates
from verifier.errors import FetchError
from verifier.kds.fetch import DirFetcher, FirstOf, HttpFetcher
from verifier.options import default_options
from verifier.pipeline import verify_to_report

from conftest import SNP_VECTORS


class _Kds(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        type(self).hits.append(self.path)
        roots = SNP_VECTORS / "roots"
        if self.path == "/vcek/v1/Milan/cert_chain":
            body = (roots / "milan" / "ask.pem").read_bytes() + (roots / "milan" / "ark.pem").read_bytes()
            self.send_response(200)
        elif self.path.startswith("/vcek/v1/Milan/"):
            body = (SNP_VECTORS / "virtee-milan-v2" / "vcek.der").read_bytes()
            self.send_response(200)
        elif self.path.startswith("/vcek/v1/Turin/"):
            body = b"<html>captive portal</html>"
            self.send_response(200)
        elif self.path.startswith("/vcek/v1/Genoa/"):
            body = b"slow down"
            self.send_response(429)
            self.send_header("Retry-After", "7")
        else:
            body = b"not found"
            self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def kds() -> Iterator[str]:
    _Kds.hits = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Kds)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_fetch_cache_then_offline(kds: str, tmp_path: Path) -> None:
    raw = (SNP_VECTORS / "virtee-milan-v2" / "report.bin").read_bytes()
    online = default_options(fetcher=HttpFetcher(tmp_path, base_url=kds), product="Milan")
    v = verify_to_report(raw, online)
    assert v.accepted and len(_Kds.hits) == 1      # the VCEK, once (AMD's chain ships in the package)
    v = verify_to_report(raw, online)
    assert v.accepted and len(_Kds.hits) == 1      # served from the on-disk cache
    offline = default_options(fetcher=HttpFetcher(tmp_path, base_url=kds, offline=True), product="Milan")
    assert verify_to_report(raw, offline).accepted


def test_offline_without_cache_cannot_decide(tmp_path: Path) -> None:
    f = HttpFetcher(tmp_path, offline=True, base_url="http://127.0.0.1:9")
    with pytest.raises(FetchError, match="offline"):
        f.chain(Product.MILAN, "VCEK")


def test_rate_limit_and_errors(kds: str, tmp_path: Path) -> None:
    f = HttpFetcher(tmp_path, base_url=kds)
    from verifier.abi.fields import TcbVersion
    tcb = TcbVersion(bootloader=1, tee=0, snp=1, microcode=1)
    with pytest.raises(FetchError, match="429.*7"):
        f.vcek(Product.GENOA, bytes(64), tcb)
    with pytest.raises(FetchError, match="404"):
        f.chain(Product.TURIN, "VLEK")
    with pytest.raises(FetchError, match="unreachable"):
        HttpFetcher(tmp_path, base_url="http://127.0.0.1:9", timeout=2).chain(Product.MILAN, "VCEK")


def test_dir_fetcher_then_kds(tmp_path: Path) -> None:
    both = FirstOf(DirFetcher(tmp_path / "empty"), DirFetcher(SNP_VECTORS / "roots"))
    certs = load_certificates(both.chain(Product.GENOA, "VLEK"))
    assert [c.subject.rfc4514_string().split(",")[0] for c in certs] == ["CN=SEV-VLEK-Genoa", "CN=ARK-Genoa"]
    assert both.crl(Product.GENOA, "VCEK") is None
    with pytest.raises(FetchError):
        FirstOf(DirFetcher(tmp_path)).chain(Product.MILAN, "VCEK")


def test_cached_crl_is_read_offline(tmp_path: Path) -> None:
    from verifier.kds import crl_url
    f = HttpFetcher(tmp_path, offline=True, base_url="http://127.0.0.1:9")
    assert f.local_crl(Product.MILAN, "VCEK") is None
    f._path("http://127.0.0.1:9" + crl_url(Product.MILAN, "VCEK").removeprefix("https://kdsintf.amd.com")
            ).write_bytes(b"crl-bytes")
    assert f.local_crl(Product.MILAN, "VCEK") == b"crl-bytes"
    assert FirstOf(DirFetcher(tmp_path / "none"), f).local_crl(Product.MILAN, "VCEK") == b"crl-bytes"


def test_garbage_is_not_cached(kds: str, tmp_path: Path) -> None:
    from verifier.abi.fields import TcbVersion
    f = HttpFetcher(tmp_path, base_url=kds)
    tcb = TcbVersion(bootloader=1, tee=0, snp=1, microcode=1, fmc=1)
    with pytest.raises(FetchError, match="not a certificate"):
        f.vcek(Product.TURIN, bytes(64), tcb)
    assert list(tmp_path.iterdir()) == []
