"""Where certificates come from when the evidence lacks them: AMD KDS (cached, or offline) or a directory.

The verifier core never does I/O itself: it asks a CertFetcher, given in
VerifyOptions. Tests use DirFetcher or sim.platform.SimFetcher and never touch
the network.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol

from ..abi.fields import Product, TcbVersion
from ..certs import load_certificates, load_crl
from ..errors import CertificateFormatError, FetchError
from ..observe import emit
from . import KDS_BASE, chain_url, crl_url, vcek_url

MAX_RESPONSE = 64 * 1024
CRL_MAX_AGE = 24 * 3600     # seconds a cached CRL is reused before asking KDS again


class CertFetcher(Protocol):
    def vcek(self, product: Product, chip_id: bytes, tcb: TcbVersion) -> bytes:
        """The DER VCEK for this chip at this TCB."""
        ...

    def chain(self, product: Product, signer: str) -> bytes:
        """PEM: the ASK (signer VCEK) or ASVK (signer VLEK), then the ARK."""
        ...

    def crl(self, product: Product, signer: str) -> bytes | None:
        """The ARK-signed CRL (DER), or None if this source has none."""
        ...


class HttpFetcher:
    """AMD KDS over HTTPS with an on-disk cache. `offline=True` serves the cache only."""

    def __init__(self, cache_dir: Path, *, offline: bool = False, timeout: float = 15.0,
                 base_url: str = KDS_BASE) -> None:
        self.cache_dir = Path(cache_dir)
        self.offline = offline
        self.timeout = timeout
        self.base_url = base_url.rstrip("/")   # tests point this at a loopback server

    def _path(self, url: str) -> Path:
        return self.cache_dir / (hashlib.sha256(url.encode()).hexdigest()[:40] + ".bin")

    def _get(self, url: str, max_age: float | None = None, *, crl: bool = False) -> bytes:
        kind = "crl" if crl else "chain" if url.endswith("/cert_chain") else "vcek"
        try:
            data, source = self._get_counted(url, max_age, crl=crl)
        except FetchError:
            emit("kds_request", kind=kind, source="error")
            raise
        emit("kds_request", kind=kind, source=source)
        return data

    def _get_counted(self, url: str, max_age: float | None, *, crl: bool) -> tuple[bytes, str]:
        url = self.base_url + url.removeprefix(KDS_BASE)
        path = self._path(url)
        if path.is_file() and (max_age is None or self.offline or time.time() - path.stat().st_mtime < max_age):
            return path.read_bytes()[:MAX_RESPONSE], "cache"
        if self.offline:
            raise FetchError(f"offline, and {url} is not in the cache ({self.cache_dir})")
        req = urllib.request.Request(url, headers={"User-Agent": "firmgate"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (https URL we built)
                body: bytes = resp.read(MAX_RESPONSE + 1)
        except urllib.error.HTTPError as exc:
            if exc.code == 429:
                raise FetchError(f"AMD KDS rate limit (HTTP 429) for {url}; retry after "
                                 f"{exc.headers.get('Retry-After', 'a while')} s") from exc
            raise FetchError(f"AMD KDS answered HTTP {exc.code} for {url}") from exc
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise FetchError(f"AMD KDS unreachable for {url}: {exc}") from exc
        if len(body) > MAX_RESPONSE:
            raise FetchError(f"AMD KDS response for {url} is larger than {MAX_RESPONSE} bytes")
        # Only what parses goes into the cache (a proxy's HTML page must not poison it).
        try:
            load_crl(body, url) if crl else load_certificates(body, url)
        except CertificateFormatError as exc:
            raise FetchError(f"AMD KDS answered {url} with something that is not a "
                             f"{'CRL' if crl else 'certificate'}: {exc.diagnostics()}") from exc
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        os.replace(tmp, path)
        return body, "network"

    def vcek(self, product: Product, chip_id: bytes, tcb: TcbVersion) -> bytes:
        return self._get(vcek_url(product, chip_id, tcb))

    def chain(self, product: Product, signer: str) -> bytes:
        return self._get(chain_url(product, signer))

    def crl(self, product: Product, signer: str) -> bytes | None:
        return self._get(crl_url(product, signer), max_age=CRL_MAX_AGE, crl=True)

    def local_crl(self, product: Product, signer: str) -> bytes | None:
        """The cached CRL, whatever its age, without any network access (None if never fetched)."""
        path = self._path(self.base_url + crl_url(product, signer).removeprefix(KDS_BASE))
        return path.read_bytes()[:MAX_RESPONSE] if path.is_file() else None


class DirFetcher:
    """Offline certificates from a directory laid out as `<dir>/<product>/{ark,ask,asvk}.pem`,
    optional `crl.der`/`crl-vlek.der`, and VCEKs as `<dir>/<product>/vcek-<chip id hex>.der`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _read(self, product: Product, name: str) -> bytes | None:
        path = self.root / product.value.lower() / name
        if not path.is_file():
            return None
        if path.stat().st_size > MAX_RESPONSE:
            raise FetchError(f"{path} is larger than {MAX_RESPONSE} bytes")
        return path.read_bytes()

    def vcek(self, product: Product, chip_id: bytes, tcb: TcbVersion) -> bytes:
        hw = chip_id[:8] if product is Product.TURIN else chip_id
        data = self._read(product, f"vcek-{hw.hex()}.der")
        if data is None:
            raise FetchError(f"no VCEK for chip {hw.hex()[:16]}... under {self.root}")
        return data

    def chain(self, product: Product, signer: str) -> bytes:
        inter = self._read(product, "ask.pem" if signer == "VCEK" else "asvk.pem")
        ark = self._read(product, "ark.pem")
        if inter is None or ark is None:
            raise FetchError(f"{self.root}/{product.value.lower()} lacks ark.pem and "
                             f"{'ask' if signer == 'VCEK' else 'asvk'}.pem")
        return inter + b"\n" + ark

    def crl(self, product: Product, signer: str) -> bytes | None:
        return self._read(product, "crl.der" if signer == "VCEK" else "crl-vlek.der")

    local_crl = crl   # a directory is local: its CRL is always used


class FirstOf:
    """Ask several fetchers in order (e.g. a trust directory, then KDS); the first answer wins."""

    def __init__(self, *fetchers: CertFetcher) -> None:
        self.fetchers = fetchers

    def _first(self, call: str, *args: object) -> bytes | None:
        errors: list[str] = []
        for f in self.fetchers:
            try:
                result: bytes | None = getattr(f, call)(*args)
            except FetchError as exc:
                errors.append(exc.diagnostics())
                continue
            if result is not None:
                return result
        if errors:
            raise FetchError("; ".join(errors))
        return None

    def vcek(self, product: Product, chip_id: bytes, tcb: TcbVersion) -> bytes:
        data = self._first("vcek", product, chip_id, tcb)
        if data is None:
            raise FetchError("no source had the VCEK")
        return data

    def chain(self, product: Product, signer: str) -> bytes:
        data = self._first("chain", product, signer)
        if data is None:
            raise FetchError(f"no source had the {product} {signer} chain")
        return data

    def crl(self, product: Product, signer: str) -> bytes | None:
        return self._first("crl", product, signer)

    def local_crl(self, product: Product, signer: str) -> bytes | None:
        for f in self.fetchers:
            local = getattr(f, "local_crl", None)
            data: bytes | None = local(product, signer) if local is not None else None
            if data is not None:
                return data
        return None
