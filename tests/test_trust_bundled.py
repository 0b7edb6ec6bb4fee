"""AMD's ARK/ASK/ASVK shipped inside the package: pinned, loaded offline, and what a foreign chain gets."""
from __future__ import annotations

from dataclasses import replace

import pytest
from conftest import SNP_VECTORS
from cryptography.hazmat.primitives.serialization import Encoding

from verifier.abi.fields import Product
from verifier.certs import load_certificate, load_certificates
from verifier.errors import ChainError
from verifier.kds import parse_leaf
from verifier.options import VerifyOptions
from verifier.pipeline import verify_to_report
from verifier.trust import (
    AMD_PINS,
    ROLES,
    BundledRootError,
    TrustStore,
    bundled_amd_certificates,
    der_sha256,
    load_bundled,
)
from verifier.verify import _validate_chain


@pytest.mark.parametrize("product", list(Product))
@pytest.mark.parametrize("role", ROLES)
def test_each_shipped_certificate_matches_its_pin(product: Product, role: str) -> None:
    # Fails if a shipped file and its pin disagree (a changed file, or a changed pin).
    cert = load_bundled(product, role)
    assert der_sha256(cert) == getattr(AMD_PINS[product], role)
    # ... and it is the very certificate AMD publishes (the shared copy of KDS's cert_chain).
    shared = load_certificate((SNP_VECTORS / "roots" / product.value.lower() / f"{role}.pem").read_bytes())
    assert cert.public_bytes(Encoding.DER) == shared.public_bytes(Encoding.DER)


def test_all_nine_load_once() -> None:
    certs = bundled_amd_certificates()
    assert len(certs) == 9 and len({der_sha256(c) for c in certs}) == 9
    assert bundled_amd_certificates() is certs


def test_a_file_that_disagrees_with_its_pin_is_refused() -> None:
    pins = dict(AMD_PINS)
    pins[Product.TURIN] = replace(pins[Product.TURIN], ask="ab" * 32)
    with pytest.raises(BundledRootError, match="altered"):
        load_bundled(Product.TURIN, "ask", pins)
    assert BundledRootError("x").exit_code == 3


@pytest.mark.parametrize("case,leaf", [("virtee-milan-v2", "vcek.der"), ("trustee-milan-v2", "vcek.der"),
                                       ("gosevguest-milan-v2-debug", "vcek.der"), ("tav-genoa-v3", "vcek.pem")])
def test_report_plus_vcek_verifies_with_nothing_else(case: str, leaf: str) -> None:
    # No ARK/ASK given, no fetcher: the package's roots make the chain.
    leaf_cert = tuple(load_certificates((SNP_VECTORS / case / leaf).read_bytes()))
    v = verify_to_report((SNP_VECTORS / case / "report.bin").read_bytes(), VerifyOptions(certs=leaf_cert))
    assert v.accepted and not v.simulated
    assert der_sha256(v.root) == AMD_PINS[v.product].ark


def test_vlek_report_verifies_with_the_shipped_asvk() -> None:
    import datetime as dt
    case = SNP_VECTORS / "trustee-aws-vlek-milan-v3"
    vlek = tuple(load_certificates((case / "vlek.der").read_bytes()))
    v = verify_to_report((case / "report.bin").read_bytes(),
                         VerifyOptions(certs=vlek, now=dt.datetime(2025, 6, 1, tzinfo=dt.UTC)))
    assert v.accepted and v.signer == "VLEK" and der_sha256(v.intermediate) == AMD_PINS[Product.MILAN].asvk


def test_genuine_turin_vcek_chains_to_the_shipped_turin_roots() -> None:
    # No genuine Turin report is published with its VCEK; the VCEK itself is, and its chain must hold.
    vcek = load_certificate((SNP_VECTORS / "vcek-variants" / "turin-vcek.der").read_bytes())
    info = parse_leaf(vcek)
    assert info.product is Product.TURIN and info.hwid is not None and len(info.hwid) == 8
    facts = _validate_chain(vcek, load_bundled(Product.TURIN, "ask"), load_bundled(Product.TURIN, "ark"), "VCEK")
    assert facts.leaf_key is not None
    with pytest.raises(ChainError):   # and not to another product's
        _validate_chain(vcek, load_bundled(Product.GENOA, "ask"), load_bundled(Product.GENOA, "ark"), "VCEK")


def test_a_foreign_chain_is_rejected_not_fetched() -> None:
    # A self-made ARK/ASK/VCEK with AMD's algorithms: exit 1 ("not signed by AMD's ASK/ARK"), and no
    # KDS call (the fetcher below would say "unreachable", which is exit 3).
    from sim.platform import SimPlatform
    from verifier.errors import FetchError

    class Unreachable:
        def vcek(self, *a: object) -> bytes:
            raise FetchError("AMD KDS unreachable")
        chain = crl = vcek

    p = SimPlatform("Genoa", key_label="foreign")
    opts = VerifyOptions(certs=(p.leaf, p.intermediate, p.ark), fetcher=Unreachable())  # type: ignore[arg-type]
    with pytest.raises(ChainError, match="not signed by AMD's ASK/ARK for Genoa"):
        verify_to_report(p.sign_report(), opts)
    # Without the shipped roots, firmgate would have needed KDS for AMD's chain: could not decide.
    with pytest.raises(FetchError):
        verify_to_report(p.sign_report(), replace(opts, trust_store=TrustStore(bundled=False)))


def test_cli_foreign_chain_offline_is_exit_1(capsys: pytest.CaptureFixture[str], tmp_path: object) -> None:
    from pathlib import Path

    from sim.platform import SimPlatform
    from verifier.cli import main
    d = Path(str(tmp_path))
    p = SimPlatform("Milan", key_label="foreign")
    (d / "report.bin").write_bytes(p.sign_report())
    (d / "chain.pem").write_bytes(p.chain_pem())
    code = main(["verify", str(d / "report.bin"), "--certs", str(d / "chain.pem"), "--offline",
                 "--kds-cache", str(d / "kds")])
    out = capsys.readouterr().out
    assert code == 1 and "not signed by AMD's ASK/ARK for Milan" in out
