"""Trust anchors: AMD's ARK/ASK/ASVK pinned by the SHA-256 of their DER, plus explicitly trusted simulated roots.

AMD's ARK, ASK and ASVK for Milan, Genoa and Turin ship inside this package
(`verifier/trust/amd/<product>/{ark,ask,asvk}.pem`: public data from
https://kdsintf.amd.com/{vcek,vlek}/v1/<product>/cert_chain), so a report plus
its VCEK verifies offline. Each file is checked against its pin below when it is
first loaded; a file that disagrees with its pin is a broken installation and
stops every verification (BundledRootError), it is never used. Certificates from
elsewhere (the evidence's certificate table, a trust directory, AMD KDS) are
accepted as an AMD root or intermediate only when their DER hash matches a pin
too. Pins are stable facts published with AMD's certificates.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from importlib import resources

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..abi.fields import Product
from ..errors import FirmgateError

ROLES = ("ark", "ask", "asvk")
MAX_BUNDLED_SIZE = 16 * 1024      # one PEM certificate; AMD's are ~2.3 KB


class BundledRootError(FirmgateError):
    """A certificate shipped inside the package does not match its pin: the installation is broken."""

    exit_code = 3   # nothing about the evidence is decided: the verifier itself cannot be trusted


@dataclass(frozen=True)
class ProductPins:
    ark: str     # sha256(DER) hex
    ask: str     # VCEK issuer
    asvk: str    # VLEK issuer


AMD_PINS: dict[Product, ProductPins] = {
    Product.MILAN: ProductPins(
        ark="69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
        ask="67d303bd3905fd38db8b20e0793699870e7fa612eaad5dec358293fd8c0bac1b",
        asvk="c5e081f59b7efab1fe2f8b505e159704e72f29cab7ef7cf628a05a42439082f5"),
    Product.GENOA: ProductPins(
        ark="4c6598d19c18719c5dfd4a7d335f674e5bfe1d8f800cea2cf270c10d103db2f1",
        ask="5464738c1546aed5f2cecf1dc98c5c960a92e8913238a61711bc90ec6e828521",
        asvk="197e610743a917d6b9bb982a5a9226ccc0a15b611be0619e626aca9151457372"),
    Product.TURIN: ProductPins(
        ark="1f084161a44bb6d93778a904877d4819cafa5d05ef4193b2ded9dd9c73dd3f6a",
        ask="5b77ef5fe7a7a004fd9032668fba9d0fda22f88c4442069a479636a6ae3b3185",
        asvk="104e10a8bd060a3c20a434261a57d0588fd65a88915b4f65b08bdecaf8df1a3c"),
}


def der_sha256(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def bundled_path(product: Product, role: str) -> str:
    """The package-relative name of a shipped AMD certificate."""
    return f"amd/{product.value.lower()}/{role}.pem"


def load_bundled(product: Product, role: str, pins: dict[Product, ProductPins] | None = None) -> x509.Certificate:
    """One shipped AMD certificate, refused unless the SHA-256 of its DER is its pin."""
    from ..certs import load_certificate
    name = bundled_path(product, role)
    try:
        data = resources.files(__package__).joinpath(name).read_bytes()[:MAX_BUNDLED_SIZE + 1]
    except OSError as exc:
        raise BundledRootError(f"AMD {role.upper()} for {product} is missing from the package ({name}): "
                               "reinstall firmgate") from exc
    cert = load_certificate(data, f"bundled {name}")
    want = getattr((pins or AMD_PINS)[product], role)
    got = der_sha256(cert)
    if got != want:
        raise BundledRootError(f"bundled {name} has sha256 {got[:16]}..., its pin is {want[:16]}...: "
                               "the package's AMD certificates were altered; reinstall firmgate")
    return cert


@functools.cache
def bundled_amd_certificates() -> tuple[x509.Certificate, ...]:
    """AMD's ARK, ASK and ASVK of every product, each checked against its pin (once per process)."""
    return tuple(load_bundled(p, role) for p in Product for role in ROLES)


@dataclass(frozen=True)
class TrustStore:
    """What firmgate trusts: pinned AMD certificates, and simulated roots only if configured."""

    pins: dict[Product, ProductPins] = field(default_factory=lambda: dict(AMD_PINS))
    # Self-signed roots of simulated platforms (`--trust-root`). Anything chained to one
    # is marked simulated in every result. Never populated by default.
    simulated_roots: tuple[x509.Certificate, ...] = ()
    # Use the AMD certificates shipped in the package. False: only certificates from the
    # evidence, --certs, a trust directory or KDS (they still have to match the pins).
    bundled: bool = True

    def with_simulated_root(self, root: x509.Certificate) -> TrustStore:
        return TrustStore(pins=self.pins, simulated_roots=self.simulated_roots + (root,), bundled=self.bundled)

    def anchors(self) -> tuple[x509.Certificate, ...]:
        """The shipped AMD certificates this store uses (each already checked against AMD's pin)."""
        return bundled_amd_certificates() if self.bundled else ()

    def pin_for(self, product: Product, role: str) -> str:
        """role: "ark", "ask" or "asvk"."""
        return str(getattr(self.pins[product], role))

    def is_pinned(self, cert: x509.Certificate, product: Product, role: str) -> bool:
        return product in self.pins and der_sha256(cert) == self.pin_for(product, role)

    def simulated_root_matching(self, cert: x509.Certificate) -> x509.Certificate | None:
        digest = der_sha256(cert)
        return next((r for r in self.simulated_roots if der_sha256(r) == digest), None)


DEFAULT_TRUST_STORE = TrustStore()
