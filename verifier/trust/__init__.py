"""Trust anchors: AMD's ARK/ASK/ASVK pinned by the SHA-256 of their DER, plus explicitly trusted simulated roots.

Certificates themselves come from elsewhere (the evidence's certificate table, a
trust directory, AMD KDS); a certificate is accepted as an AMD root or
intermediate only when its DER hash matches a pin below. Pins are stable facts
published with AMD's certificates (see the shared vectors' README and
https://kdsintf.amd.com/vcek/v1/<product>/cert_chain).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..abi.fields import Product


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


@dataclass(frozen=True)
class TrustStore:
    """What firmgate trusts: pinned AMD certificates, and simulated roots only if configured."""

    pins: dict[Product, ProductPins] = field(default_factory=lambda: dict(AMD_PINS))
    # Self-signed roots of simulated platforms (`--trust-root`). Anything chained to one
    # is marked simulated in every result. Never populated by default.
    simulated_roots: tuple[x509.Certificate, ...] = ()

    def with_simulated_root(self, root: x509.Certificate) -> TrustStore:
        return TrustStore(pins=self.pins, simulated_roots=self.simulated_roots + (root,))

    def pin_for(self, product: Product, role: str) -> str:
        """role: "ark", "ask" or "asvk"."""
        return str(getattr(self.pins[product], role))

    def is_pinned(self, cert: x509.Certificate, product: Product, role: str) -> bool:
        return product in self.pins and der_sha256(cert) == self.pin_for(product, role)

    def simulated_root_matching(self, cert: x509.Certificate) -> x509.Certificate | None:
        digest = der_sha256(cert)
        return next((r for r in self.simulated_roots if der_sha256(r) == digest), None)


DEFAULT_TRUST_STORE = TrustStore()
