"""Certificates in, `cryptography` objects out: DER or PEM, one or many per input.

Every real VCEK/VLEK has serial number 0, which RFC 5280 forbids. cryptography
50 still loads it but emits a CryptographyDeprecationWarning on load and on
`.serial_number`. firmgate accepts such certificates on purpose (they are what
AMD issues), so that one warning is silenced, by its exact category and message:
process-wide at import, and again around each load (pytest and `-W` reset the
global filters). All other warnings still reach the user.

Parsed certificates and CRLs are memoised (bounded LRU, keyed by the SHA-256 of the exact
input bytes): a broker sees the same ARK, ASK and VCEK on every handshake from a chip, and
parsing and forcing them costs more than the report signature. A cached object is as safe as
a fresh parse: `cryptography`'s Certificate/CRL objects are immutable, the key covers every
input byte, and only inputs that parsed and forced cleanly are stored (a failure is not
cached, so it is re-parsed and re-raised, with the caller's wording, every time). Nothing
that depends on time (validity, revocation) is decided here, so nothing time-bound is cached.
"""
from __future__ import annotations

import contextlib
import hashlib
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.utils import CryptographyDeprecationWarning

from .errors import CertificateFormatError

_SERIAL_WARNING = r"Parsed a serial number which wasn't positive"
warnings.filterwarnings("ignore", message=_SERIAL_WARNING, category=CryptographyDeprecationWarning)


@contextlib.contextmanager
def _serial_zero_ok() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SERIAL_WARNING, category=CryptographyDeprecationWarning)
        yield


def serial_number(cert: x509.Certificate) -> int:
    """cert.serial_number without the serial-0 deprecation warning."""
    with _serial_zero_ok():
        return cert.serial_number

MAX_CERT_SIZE = 16 * 1024          # a VCEK is ~1.4 KB, an ARK ~1.6 KB; bound hostile input
MAX_CERTS = 16                     # per file or table
MAX_BUNDLE_SIZE = MAX_CERT_SIZE * MAX_CERTS * 2  # PEM base64 overhead


class Lru:
    """A bounded least-recently-used map, safe to share between a worker's threads.

    `get` answers None for a miss, so None is never stored as a value."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data: OrderedDict[Any, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self.lock:
            value = self.data.get(key)
            if value is not None:
                self.data.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        with self.lock:
            self.data[key] = value
            self.data.move_to_end(key)
            while len(self.data) > self.size:
                self.data.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.data.clear()

    def __len__(self) -> int:
        return len(self.data)


# (kind, sha256 of the input bytes) -> the parsed and forced object. kind keeps a DER
# certificate, a PEM block and a CRL apart. 256 entries: a broker's chips times 3 certificates.
PARSED_CACHE = Lru(256)
_T = TypeVar("_T")


def _memo(kind: str, data: bytes, parse: Callable[[], _T]) -> _T:
    key = (kind, hashlib.sha256(data).digest())
    hit = PARSED_CACHE.get(key)
    if hit is not None:
        return hit  # type: ignore[no-any-return]
    value = parse()          # raises on bad input: nothing is stored
    PARSED_CACHE.put(key, value)
    return value


def clear_parsed_cache() -> None:
    PARSED_CACHE.clear()



def _pem_blocks(data: bytes, label: bytes) -> list[bytes]:
    """The `label` PEM blocks of `data`, in order; other blocks (keys, CRLs) are skipped.

    A linear scan with bytes.find: a regex with a lazy body and a back-reference goes
    quadratic on many unterminated BEGIN lines (minutes for 512 KB of hostile input).
    """
    begin, end = b"-----BEGIN " + label + b"-----", b"-----END " + label + b"-----"
    blocks, pos = [], 0
    while (start := data.find(begin, pos)) >= 0:
        stop = data.find(end, start + len(begin))
        if stop < 0:
            raise CertificateFormatError(f"PEM {label.decode()} block without its END line")
        blocks.append(data[start:stop + len(end)] + b"\n")
        pos = stop + len(end)
    return blocks


# What cryptography may raise when it parses a part of a certificate lazily.
LAZY_PARSE_ERRORS = (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType, UnsupportedAlgorithm,
                     x509.InvalidVersion, TypeError)


def _parsed_now(cert: x509.Certificate, what: str) -> x509.Certificate:
    """Force the lazily parsed parts (extensions, key) so that a malformed certificate fails here,
    as bad input, and not later inside verification (RFC 5280 4.2: no duplicate extensions)."""
    try:
        _ = cert.extensions, cert.issuer, cert.subject
        cert.public_key()
    except LAZY_PARSE_ERRORS as exc:
        raise CertificateFormatError(f"{what}: malformed certificate ({exc})") from None
    return cert


def load_certificate(data: bytes, what: str = "certificate") -> x509.Certificate:
    """Exactly one certificate, DER or PEM."""
    certs = load_certificates(data, what)
    if len(certs) != 1:
        raise CertificateFormatError(f"{what}: expected one certificate, found {len(certs)}")
    return certs[0]


def load_certificates(data: bytes, what: str = "certificates") -> list[x509.Certificate]:
    """All certificates in `data`: a single DER certificate, or PEM with one or more blocks."""
    if not isinstance(data, (bytes, bytearray)):
        raise CertificateFormatError(f"{what}: expected bytes")
    data = bytes(data)
    if len(data) > MAX_BUNDLE_SIZE:
        raise CertificateFormatError(f"{what}: {len(data)} bytes is too large for a certificate bundle")
    if b"-----BEGIN" in data:
        certs: list[x509.Certificate] = []
        for block in _pem_blocks(data, b"CERTIFICATE"):
            if len(certs) >= MAX_CERTS:
                raise CertificateFormatError(f"{what}: more than {MAX_CERTS} certificates")
            certs.append(_memo("pem", block, partial(_load_pem_block, block, what)))
        if not certs:
            raise CertificateFormatError(f"{what}: PEM input holds no CERTIFICATE block")
        return certs
    if len(data) > MAX_CERT_SIZE:
        raise CertificateFormatError(f"{what}: {len(data)} bytes is too large for one DER certificate")
    return [_memo("der", data, lambda: _load_der(data, what))]


def _load_pem_block(block: bytes, what: str) -> x509.Certificate:
    try:
        with _serial_zero_ok():
            return _parsed_now(x509.load_pem_x509_certificate(block), what)
    except (ValueError, x509.InvalidVersion) as exc:
        raise CertificateFormatError(f"{what}: a PEM certificate does not parse: {exc}") from exc


def _load_der(data: bytes, what: str) -> x509.Certificate:
    try:
        with _serial_zero_ok():
            cert = x509.load_der_x509_certificate(data)
    except (ValueError, x509.InvalidVersion) as exc:
        raise CertificateFormatError(f"{what}: not a DER or PEM certificate ({exc})") from exc
    return _parsed_now(cert, what)


def load_crl(data: bytes, what: str = "CRL") -> x509.CertificateRevocationList:
    """A CRL in DER or PEM (memoised like certificates; its dates are judged by the caller)."""
    if len(data) > MAX_BUNDLE_SIZE:
        raise CertificateFormatError(f"{what}: {len(data)} bytes is too large")
    if not isinstance(data, bytes):
        return _load_crl(data, what)   # a buffer may change under us, so it is not a cache key
    return _memo("crl", data, lambda: _load_crl(data, what))


def _load_crl(data: bytes, what: str) -> x509.CertificateRevocationList:
    try:
        if b"-----BEGIN X509 CRL-----" in data:
            crl = x509.load_pem_x509_crl(data)
        else:
            crl = x509.load_der_x509_crl(data)
        _ = crl.issuer, crl.extensions, crl.next_update_utc  # parsed lazily: fail here, not inside verify
        for revoked in crl:
            _ = revoked.serial_number
    except LAZY_PARSE_ERRORS as exc:
        raise CertificateFormatError(f"{what}: does not parse ({exc})") from exc
    return crl


def common_name(cert: x509.Certificate) -> str:
    try:
        names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    except ValueError:
        return ""
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")
