"""Certificates, AMD's VCEK/VLEK extensions and the extended-report certificate table."""
from __future__ import annotations

import uuid
import warnings

import pytest

from verifier.abi.certtable import GUID_ARK, GUID_VCEK, build_cert_table, parse_cert_table
from verifier.abi.fields import Product
from verifier.certs import load_certificate, load_certificates, serial_number
from verifier.errors import CertificateFormatError
from verifier.kds import parse_leaf, vcek_url
from verifier.abi.fields import TcbVersion

from conftest import SNP_VECTORS

LEAVES = sorted(p for p in SNP_VECTORS.glob("*/*") if p.suffix in (".der", ".pem") and "roots" not in p.parts)


@pytest.mark.parametrize("path", LEAVES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_serial_zero_loads_without_warnings(path) -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cert = load_certificate(path.read_bytes(), str(path))
        assert serial_number(cert) == 0
    assert [str(w.message) for w in seen] == []


def test_serial_zero_warning_does_not_reach_cli_users(tmp_path) -> None:
    import subprocess
    import sys
    case = SNP_VECTORS / "virtee-milan-v2"
    proc = subprocess.run([sys.executable, "-W", "default", "-m", "verifier.cli", "verify", str(case / "report.bin"),
                           "--certs", str(case / "vcek.der"), "--certs", str(SNP_VECTORS / "roots"), "--offline"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "serial number" not in proc.stderr and "Warning" not in proc.stderr


def test_leaf_extensions_of_every_variant() -> None:
    v = SNP_VECTORS / "vcek-variants"
    raw = parse_leaf(load_certificate((v / "hwid-raw.der").read_bytes()))
    wrapped = parse_leaf(load_certificate((v / "hwid-der-octet-string.der").read_bytes()))
    turin = parse_leaf(load_certificate((v / "turin-vcek.der").read_bytes()))
    assert raw.kind == wrapped.kind == "VCEK" and len(raw.hwid or b"") == 64 and len(wrapped.hwid or b"") == 64
    assert wrapped.hwid == bytes(range(64))        # the DER wrapper (04 40) is removed
    assert raw.product is Product.MILAN and raw.product_name == "Milan-B0"
    assert turin.product is Product.TURIN and len(turin.hwid or b"") == 8 and turin.fmc_spl == 0
    assert turin.tcb().fmc == 0 and turin.ucode_spl == 9
    vlek = parse_leaf(load_certificate((SNP_VECTORS / "trustee-aws-vlek-milan-v3" / "vlek.der").read_bytes()))
    assert vlek.kind == "VLEK" and vlek.hwid is None and vlek.csp_id and vlek.product_name == "Milan"
    assert (vlek.bl_spl, vlek.snp_spl, vlek.ucode_spl) == (4, 24, 217)


def test_ca_certificates_are_not_leaves() -> None:
    ark = load_certificate((SNP_VECTORS / "roots" / "milan" / "ark.pem").read_bytes())
    with pytest.raises(CertificateFormatError, match="productName"):
        parse_leaf(ark)


def test_pem_bundle_and_garbage() -> None:
    roots = SNP_VECTORS / "roots" / "genoa"
    bundle = b"".join((roots / n).read_bytes() for n in ("ark.pem", "ask.pem", "asvk.pem"))
    assert len(load_certificates(bundle)) == 3
    with pytest.raises(CertificateFormatError):
        load_certificate(bundle)                    # one expected, three given
    with pytest.raises(CertificateFormatError):
        load_certificates(b"\x30\x82\x01\x00garbage")
    with pytest.raises(CertificateFormatError):
        load_certificates(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(CertificateFormatError, match="too large"):
        load_certificates(b"\x30" * 600_000)


def test_cert_table_roundtrip_and_bounds() -> None:
    ark = (SNP_VECTORS / "roots" / "milan" / "ark.pem").read_bytes()
    vcek = (SNP_VECTORS / "virtee-milan-v2" / "vcek.der").read_bytes()
    table = build_cert_table([("ARK", ark), ("VCEK", vcek)])
    entries = parse_cert_table(table)
    assert [e.kind for e in entries] == ["ARK", "VCEK"] and entries[1].data == vcek
    assert entries[0].guid == GUID_ARK and entries[1].guid == GUID_VCEK
    with pytest.raises(CertificateFormatError, match="terminating"):
        parse_cert_table(bytes(10))                 # shorter than one entry
    bad = bytearray(table)
    bad[20:24] = (10**6).to_bytes(4, "little")      # length past the end
    with pytest.raises(CertificateFormatError, match="outside"):
        parse_cert_table(bytes(bad))
    overlap = bytearray(table)
    overlap[16:20] = (0).to_bytes(4, "little")      # points into the header
    with pytest.raises(CertificateFormatError, match="header"):
        parse_cert_table(bytes(overlap))
    other = build_cert_table([(uuid.UUID(int=5), b"x")])
    assert parse_cert_table(other)[0].kind == "OTHER"


def test_kds_urls() -> None:
    chip = bytes(range(64))
    milan = TcbVersion.from_u64(TcbVersion.encode("Milan", bootloader=3, tee=0, snp=8, microcode=115), "Milan")
    assert vcek_url(Product.MILAN, chip, milan) == (
        "https://kdsintf.amd.com/vcek/v1/Milan/" + chip.hex() + "?blSPL=03&teeSPL=00&snpSPL=08&ucodeSPL=115")
    turin = TcbVersion.from_u64(TcbVersion.encode("Turin", bootloader=1, tee=0, snp=3, microcode=9, fmc=2), "Turin")
    url = vcek_url(Product.TURIN, chip, turin)
    assert f"/Turin/{chip[:8].hex()}?" in url and "fmcSPL=02" in url


def test_duplicate_extension_is_bad_input_not_a_crash() -> None:
    # fuzz/regressions/cert/duplicate-extension.der: a VCEK with snpSPL twice (found by the fuzz harness).
    from conftest import REPO
    from verifier.kds import parse_leaf as _parse
    data = (REPO / "fuzz" / "regressions" / "cert" / "duplicate-extension.der").read_bytes()
    with pytest.raises(CertificateFormatError, match="Duplicate"):
        load_certificates(data)
    from cryptography import x509 as _x509
    raw_cert = _x509.load_der_x509_certificate(data)    # loaded elsewhere, unchecked
    with pytest.raises(CertificateFormatError):
        _parse(raw_cert)


@pytest.mark.parametrize("data,match", [
    (b"-----BEGIN A-----\n" * 20000, "no CERTIFICATE block"),                 # was quadratic in a regex
    (b"-----BEGIN CERTIFICATE-----\n" * 18000, "without its END"),
    (b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n" * 20, "does not parse"),
])
def test_hostile_pem_is_refused(data: bytes, match: str) -> None:
    with pytest.raises(CertificateFormatError, match=match):
        load_certificates(data)


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_VCEK = (SNP_VECTORS / "vcek-variants" / "turin-vcek.der").read_bytes() if SNP_VECTORS.is_dir() else b"0"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.integers(0, len(_VCEK) - 1), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_vcek_parses_or_is_refused(edits: list[tuple[int, int]]) -> None:
    data = bytearray(_VCEK)
    for pos, value in edits:
        data[pos] = value
    try:
        certs = load_certificates(bytes(data))
    except CertificateFormatError:
        return
    for c in certs:
        try:
            info = parse_leaf(c)
        except CertificateFormatError:
            continue
        info.tcb()
        assert info.kind in ("VCEK", "VLEK")
