"""The simulated platform makes AMD-shaped certificates and reports (and nothing it signs is trusted by default)."""
from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import SignatureAlgorithmOID

from sim.platform import CPUID, SimPlatform, Tcb
from verifier.abi.certtable import parse_cert_table
from verifier.abi.fields import Product, SigningKey
from verifier.abi.report import AttestationReport
from verifier.certs import load_certificates
from verifier.kds import parse_leaf

PSS48 = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)


@pytest.mark.parametrize("product", ["Milan", "Genoa", "Turin"])
@pytest.mark.parametrize("signer", ["VCEK", "VLEK"])
def test_chain_has_amds_algorithms_and_extensions(product: str, signer: str) -> None:
    p = SimPlatform(product, signer)
    for cert, issuer in ((p.ark, p.ark), (p.intermediate, p.ark), (p.leaf, p.intermediate)):
        assert cert.signature_algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS
        assert isinstance(cert.signature_hash_algorithm, hashes.SHA384)
        key = issuer.public_key()
        assert isinstance(key, rsa.RSAPublicKey) and key.key_size == 4096
        key.verify(cert.signature, cert.tbs_certificate_bytes, PSS48, hashes.SHA384())   # raises if not salt 48
    leaf_key = p.leaf.public_key()
    assert isinstance(leaf_key, ec.EllipticCurvePublicKey) and leaf_key.curve.name == "secp384r1"
    info = parse_leaf(p.leaf)
    assert info.kind == signer and info.product is Product.parse(product)
    if signer == "VCEK":
        assert info.hwid == p.chip_id[: 8 if product == "Turin" else 64]
        assert info.product_name == {"Milan": "Milan-B0"}.get(product, product)
    else:
        assert info.hwid is None and info.csp_id
    assert (info.fmc_spl is not None) == (product == "Turin")
    assert "SIMULATED" in p.ark.subject.rfc4514_string()


def test_reports_are_signed_over_the_raw_bytes() -> None:
    p = SimPlatform("Genoa", "VLEK")
    raw = p.sign_report(guest_svn=7, report_data=b"\x01" * 64, vmpl=2)
    r = AttestationReport.from_bytes(raw)
    assert (r.guest_svn, r.vmpl, r.report_data) == (7, 2, b"\x01" * 64)
    assert r.key_info.signing_key is SigningKey.VLEK and r.cpuid_product is Product.GENOA
    assert (r.cpuid_fam_id, r.cpuid_mod_id, r.cpuid_step) == CPUID[Product.GENOA]
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    p.leaf.public_key().verify(encode_dss_signature(r.signature_r, r.signature_s), raw[:0x2A0],
                               ec.ECDSA(hashes.SHA384()))


def test_any_field_can_be_wrong() -> None:
    p = SimPlatform("Milan")
    r = AttestationReport.from_bytes(p.sign_report(version=2, committed_tcb=Tcb(snp=1)))
    assert r.version == 2 and r.cpuid_fam_id is None and r.tcb("committed", "Milan").snp == 1
    patched = p.sign_report(raw_patch={0x04C: 1})
    assert patched[0x04C] == 1
    a, b = p.sign_report(), p.sign_report(bad_signature=True)
    assert a[:0x2A0] == b[:0x2A0] and a[0x2A0:0x2E8] != b[0x2A0:0x2E8]


def test_cert_table_and_bundle() -> None:
    p = SimPlatform("Turin")
    for pem in (False, True):
        entries = parse_cert_table(p.cert_table(pem=pem))
        assert [e.kind for e in entries] == ["ARK", "ASK", "VCEK"]
        assert load_certificates(entries[2].data)[0] == p.leaf
    assert load_certificates(p.chain_pem()) == [p.leaf, p.intermediate, p.ark]
    assert load_certificates(p.root_pem()) == [p.ark]
    assert parse_cert_table(p.cert_table(include=("LEAF",)))[0].kind == "VCEK"


def test_keys_are_cached_per_process() -> None:
    a, b = SimPlatform("Milan"), SimPlatform("Milan")
    assert a.ark_key is b.ark_key and a.leaf_key is b.leaf_key
    c = SimPlatform("Milan", key_label="another")
    assert c.ark_key is not a.ark_key
