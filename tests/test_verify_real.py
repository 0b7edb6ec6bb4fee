"""Verification of the real SEV-SNP evidence in ../shared/vectors/snp against AMD's pinned roots."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from verifier.abi.fields import Product
from verifier.certs import load_certificates
from verifier.errors import ChainError, ExpiredError, SignatureError
from verifier.evidence import load_evidence
from verifier.kds.fetch import DirFetcher
from verifier.options import VerifyOptions
from verifier.pipeline import verify_evidence, verify_to_report
from verifier.verdict import Outcome

from conftest import KBS_VECTORS, SNP_VECTORS

from verifier.trust import TrustStore

UTC = dt.timezone.utc
NO_BUNDLED = TrustStore(bundled=False)   # only the certificates a test passes (no roots from the package)
INSIDE_VLEK = dt.datetime(2025, 6, 1, tzinfo=UTC)     # the AWS VLEK is valid 2024-12 .. 2025-12-10

CASES = {
    # case: (evidence file, leaf cert file or None, product, signer, time or None)
    "virtee-milan-v2": ("report.bin", "vcek.der", Product.MILAN, "VCEK", None),
    "gosevguest-milan-v2-debug": ("report.bin", "vcek.der", Product.MILAN, "VCEK", None),
    "trustee-milan-v2": ("report.bin", "vcek.der", Product.MILAN, "VCEK", None),
    "trustee-aws-vlek-milan-v3": ("report.bin", "vlek.der", Product.MILAN, "VLEK", INSIDE_VLEK),
    "tav-genoa-v3": ("report.bin", "vcek.pem", Product.GENOA, "VCEK", None),
    "veraison-tsm-genoa-v3": ("tsm-report.json", None, Product.GENOA, "VCEK", None),
}


def _certs(*paths: Path) -> tuple:
    out: list = []
    for p in paths:
        out += load_certificates(p.read_bytes())
    return tuple(out)


def _roots(product: Product) -> tuple:
    d = SNP_VECTORS / "roots" / product.value.lower()
    return _certs(d / "ark.pem", d / "ask.pem", d / "asvk.pem")


def _options(case: str, **kw) -> VerifyOptions:
    _, leaf, product, _, when = CASES[case]
    certs = (_certs(SNP_VECTORS / case / leaf) if leaf else ()) + _roots(product)
    kw.setdefault("now", when)
    return VerifyOptions(certs=certs, **kw)


def _raw(case: str) -> bytes:
    return (SNP_VECTORS / case / CASES[case][0]).read_bytes()


@pytest.mark.parametrize("case", sorted(CASES))
def test_real_case_verifies(case: str) -> None:
    _, _, product, signer, _ = CASES[case]
    v = verify_to_report(_raw(case), _options(case))
    assert v.accepted, [c for c in v.checks if c.outcome is Outcome.FAIL]
    assert v.product is product and v.signer == signer and not v.simulated
    names = {c.name: c.outcome for c in v.checks}
    for must in ("report.signature", "cert.chain", "cert.validity", "report.signing_key", "report.product",
                 "tcb.reported_matches_cert", "tcb.cert_le_current", "report.chip_id"):
        assert must in names
    assert names["report.signature"] is Outcome.PASS and names["cert.chain"] is Outcome.PASS
    expect_chip = Outcome.SKIP if signer == "VLEK" else Outcome.PASS
    assert names["report.chip_id"] is expect_chip


def test_tsm_case_verifies_from_outblob_and_auxblob_alone() -> None:
    # No --certs at all: ARK, ASK and VCEK all come from the auxblob, and the ARK/ASK match the pins.
    ev = load_evidence((SNP_VECTORS / "veraison-tsm-genoa-v3" / "tsm-report.json").read_bytes())
    assert ev.shape == "tsm" and len(ev.certs) == 3
    v = verify_to_report(ev, VerifyOptions())
    assert v.accepted and v.product is Product.GENOA
    assert ev.report.raw == (SNP_VECTORS / "veraison-tsm-genoa-v3" / "outblob.bin").read_bytes()


def test_vlek_expired_now_is_rejected_by_name() -> None:
    case = "trustee-aws-vlek-milan-v3"
    with pytest.raises(ExpiredError, match="VLEK certificate .* expired 2025-12-10"):
        verify_to_report(_raw(case), _options(case, now=dt.datetime(2026, 1, 1, tzinfo=UTC)))
    verdict = verify_evidence(_raw(case), _options(case, now=dt.datetime(2026, 1, 1, tzinfo=UTC)))
    assert not verdict.accepted
    assert [c.name for c in verdict.failures] == ["cert.validity"]
    assert "expired" in verdict.failures[0].message


def test_vlek_is_vmpl1_and_provisional() -> None:
    v = verify_to_report(_raw("trustee-aws-vlek-milan-v3"), _options("trustee-aws-vlek-milan-v3"))
    names = {c.name: c for c in v.checks}
    assert v.report.vmpl == 1 and names["report.vmpl"].outcome is Outcome.PASS
    assert names["tcb.committed_eq_current"].outcome is Outcome.WARN
    strict = verify_to_report(_raw("trustee-aws-vlek-milan-v3"),
                              _options("trustee-aws-vlek-milan-v3", allow_provisional=False))
    assert not strict.accepted
    assert [c.name for c in strict.checks if c.outcome is Outcome.FAIL] == ["tcb.committed_eq_current"]


def test_debug_vector_has_debug_policy() -> None:
    v = verify_to_report(_raw("gosevguest-milan-v2-debug"), _options("gosevguest-milan-v2-debug"))
    assert v.accepted and v.report.policy.debug and v.facts()["debug"] is True


def test_trustee_snp_evidence_json_verifies() -> None:
    data = (KBS_VECTORS / "trustee-e2e-snp-evidence.json").read_bytes()
    ev = load_evidence(data)
    assert ev.shape == "snp-evidence" and len(ev.certs) == 1
    v = verify_to_report(ev, VerifyOptions(certs=_roots(Product.GENOA)))
    assert v.accepted and v.product is Product.GENOA and v.report.version == 3
    # The broker receives it already parsed: the dict path gives the same raw bytes.
    from verifier.evidence import evidence_from_json
    assert evidence_from_json(json.loads(data)).report.raw == ev.report.raw


def test_roots_from_a_trust_directory_fetcher() -> None:
    case = "tav-genoa-v3"
    opts = VerifyOptions(certs=_certs(SNP_VECTORS / case / "vcek.pem"), fetcher=DirFetcher(SNP_VECTORS / "roots"))
    assert verify_to_report(_raw(case), opts).accepted


@pytest.mark.parametrize("case,other", [("virtee-milan-v2", Product.GENOA), ("tav-genoa-v3", Product.MILAN),
                                        ("tav-genoa-v3", Product.TURIN)])
def test_other_products_roots_fail(case: str, other: Product) -> None:
    leaf = _certs(SNP_VECTORS / case / CASES[case][1])
    # Without the shipped roots and only another product's ARK/ASK: no pinned chain for the leaf's product.
    with pytest.raises(ChainError):
        verify_to_report(_raw(case), VerifyOptions(certs=leaf + _roots(other), trust_store=NO_BUNDLED))
    # With them, the leaf's own product's chain is found in the package.
    assert verify_to_report(_raw(case), VerifyOptions(certs=leaf + _roots(other))).accepted
    # Forcing the other product: its pinned ASK did not issue this VCEK.
    with pytest.raises(ChainError, match="not signed by AMD's ASK/ARK"):
        verify_to_report(_raw(case), VerifyOptions(certs=leaf + _roots(other) + _roots(CASES[case][2]),
                                                   product=other))


def test_wrong_vcek_fails_signature() -> None:
    # trustee-milan-v2 and virtee-milan-v2 are different chips at the same TCB.
    other_leaf = _certs(SNP_VECTORS / "virtee-milan-v2" / "vcek.der")
    with pytest.raises(SignatureError):
        verify_to_report(_raw("trustee-milan-v2"), VerifyOptions(certs=other_leaf + _roots(Product.MILAN)))


@pytest.mark.parametrize("case", ["virtee-milan-v2", "tav-genoa-v3", "trustee-aws-vlek-milan-v3"])
def test_every_single_bit_flip_of_the_signed_part_fails(case: str) -> None:
    # All 0x2A0 * 8 = 5376 bits, each flipped alone: parse or verify must refuse every one.
    raw = _raw(case)
    opts = _options(case)
    assert verify_evidence(raw, opts).accepted
    accepted = []
    for bit in range(0x2A0 * 8):
        b = bytearray(raw)
        b[bit // 8] ^= 1 << (bit % 8)
        if verify_evidence(bytes(b), opts).accepted:
            accepted.append(bit)
    assert accepted == []


def test_signature_area_flips_fail() -> None:
    # R and S (0x2A0..0x32F): a flipped bit in the used 48 bytes breaks the signature, above them the layout.
    raw = _raw("virtee-milan-v2")
    opts = _options("virtee-milan-v2")
    for off in list(range(0x2A0, 0x330, 7)) + [0x2CF, 0x2D0, 0x317, 0x318]:
        b = bytearray(raw)
        b[off] ^= 0x01
        assert not verify_evidence(bytes(b), opts).accepted, hex(off)


def test_intermediate_must_match_its_pin() -> None:
    from dataclasses import replace

    from verifier.trust import AMD_PINS, TrustStore
    case = "virtee-milan-v2"
    leaf = _certs(SNP_VECTORS / case / "vcek.der")
    roots = SNP_VECTORS / "roots" / "milan"
    # ARK and ASVK but no ASK (and no shipped roots): a VCEK needs the ASK.
    with pytest.raises(ChainError, match="ASK"):
        verify_to_report(_raw(case), VerifyOptions(certs=leaf + _certs(roots / "ark.pem", roots / "asvk.pem"),
                                                   trust_store=NO_BUNDLED))
    # The real ASK, but a store whose ASK pin differs: refused even though the ARK matches
    # (the shipped ASK matches AMD's pin, not this store's, so it does not help either).
    pins = dict(AMD_PINS)
    pins[Product.MILAN] = replace(pins[Product.MILAN], ask="00" * 32)
    with pytest.raises(ChainError, match="pins"):
        verify_to_report(_raw(case), VerifyOptions(certs=leaf + _roots(Product.MILAN), trust_store=TrustStore(pins=pins)))
    # And an ARK pin that differs.
    pins[Product.MILAN] = replace(AMD_PINS[Product.MILAN], ark="11" * 32)
    with pytest.raises(ChainError, match="pins"):
        verify_to_report(_raw(case), VerifyOptions(certs=leaf + _roots(Product.MILAN), trust_store=TrustStore(pins=pins)))


def test_pins_match_the_shared_roots() -> None:
    from verifier.trust import AMD_PINS, der_sha256
    for product, pins in AMD_PINS.items():
        d = SNP_VECTORS / "roots" / product.value.lower()
        for role in ("ark", "ask", "asvk"):
            (cert,) = _certs(d / f"{role}.pem")
            assert der_sha256(cert) == getattr(pins, role), (product, role)


def test_the_vcek_for_this_chip_is_chosen_among_several() -> None:
    # A trust directory may hold many VCEKs: the one whose hwID is CHIP_ID signs.
    many = (_certs(SNP_VECTORS / "virtee-milan-v2" / "vcek.der") + _certs(SNP_VECTORS / "gosevguest-milan-v2-debug" / "vcek.der")
            + _certs(SNP_VECTORS / "trustee-milan-v2" / "vcek.der") + _roots(Product.MILAN))
    for case in ("trustee-milan-v2", "virtee-milan-v2", "gosevguest-milan-v2-debug"):
        v = verify_to_report(_raw(case), VerifyOptions(certs=many))
        assert v.accepted and v.leaf_info.hwid == v.report.chip_id


def test_an_unpinned_ark_in_the_evidence_does_not_matter() -> None:
    # A rogue self-signed "ARK" next to the real chain changes nothing; alone it is refused.
    from sim.platform import SimPlatform
    rogue = SimPlatform("Genoa", key_label="rogue-ark").ark
    case = "tav-genoa-v3"
    leaf = _certs(SNP_VECTORS / case / "vcek.pem")
    assert verify_to_report(_raw(case), VerifyOptions(certs=(rogue,) + leaf + _roots(Product.GENOA))).accepted
    assert verify_to_report(_raw(case), VerifyOptions(certs=(rogue,) + leaf)).accepted   # shipped roots
    with pytest.raises(ChainError):
        verify_to_report(_raw(case), VerifyOptions(certs=(rogue,) + leaf, trust_store=NO_BUNDLED))
