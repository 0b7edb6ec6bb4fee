"""Each verification step and consistency check shown to fail on its own, with the simulated platform."""
from __future__ import annotations

import datetime as dt

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sim.platform import SimFetcher, SimPlatform, Tcb, make_crl
from verifier import verify as verify_mod
from verifier.abi.fields import Product
from verifier.errors import ChainError, ExpiredError, MalformedReport, RevokedError, SignatureError
from verifier.evidence import Evidence, load_evidence
from verifier.options import VerifyOptions
from verifier.pipeline import verify_evidence, verify_to_report
from verifier.trust import DEFAULT_TRUST_STORE
from verifier.verdict import Outcome

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 6, 1, tzinfo=UTC)


def _opts(p: SimPlatform, with_chain: bool = True, **kw) -> VerifyOptions:
    certs = (p.leaf, p.intermediate, p.ark) if with_chain else ()
    kw.setdefault("now", NOW)
    return VerifyOptions(trust_store=DEFAULT_TRUST_STORE.with_simulated_root(p.ark), certs=certs, **kw)


def _outcomes(p: SimPlatform, raw: bytes, **kw) -> dict[str, Outcome]:
    v = verify_to_report(raw, _opts(p, **kw))
    return {c.name: c.outcome for c in v.checks}


def _failed(p: SimPlatform, raw: bytes, **kw) -> list[str]:
    return [n for n, o in _outcomes(p, raw, **kw).items() if o is Outcome.FAIL]


@pytest.fixture(scope="module")
def milan() -> SimPlatform:
    return SimPlatform("Milan", "VCEK", now=NOW)


@pytest.mark.parametrize("product", ["Milan", "Genoa", "Turin"])
@pytest.mark.parametrize("signer", ["VCEK", "VLEK"])
def test_sim_baseline_verifies_and_says_simulated(product: str, signer: str) -> None:
    p = SimPlatform(product, signer, now=NOW)
    v = verify_to_report(p.sign_report(), _opts(p))
    assert v.accepted and v.simulated and v.signer == signer and v.product is Product.parse(product)
    warn = [c for c in v.checks if c.outcome is Outcome.WARN]
    assert [c.name for c in warn] == ["trust.simulated"]
    assert "SIMULATED" in next(c.message for c in v.checks if c.name == "cert.chain")
    if product == "Turin":
        assert v.tcb["reported"].fmc is not None


def test_sim_root_is_not_trusted_by_default(milan: SimPlatform) -> None:
    # AMD's chain ships in the package, so a chain that does not lead to it is rejected by name (exit 1).
    with pytest.raises(ChainError, match="not signed by AMD's ASK/ARK for Milan"):
        verify_to_report(milan.sign_report(), VerifyOptions(certs=(milan.leaf, milan.intermediate, milan.ark), now=NOW))


def test_bad_signature(milan: SimPlatform) -> None:
    with pytest.raises(SignatureError):
        verify_to_report(milan.sign_report(bad_signature=True), _opts(milan))
    other = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(SignatureError):
        verify_to_report(milan.sign_report(sign_with=other), _opts(milan))
    verdict = verify_evidence(milan.sign_report(bad_signature=True), _opts(milan))
    assert [c.name for c in verdict.failures] == ["report.signature"]


def test_chain_from_another_root(milan: SimPlatform) -> None:
    other = SimPlatform("Milan", "VCEK", now=NOW, key_label="other")
    opts = VerifyOptions(trust_store=DEFAULT_TRUST_STORE.with_simulated_root(other.ark),
                         certs=(milan.leaf, milan.intermediate), now=NOW)
    with pytest.raises(ChainError):
        verify_to_report(milan.sign_report(), opts)


def test_chain_salt_other_than_48_fails() -> None:
    p = SimPlatform("Genoa", "VCEK", now=NOW, chain_salt=32)
    with pytest.raises(ChainError, match="salt 48"):
        verify_to_report(p.sign_report(), _opts(p))


def test_leaf_key_must_be_p384() -> None:
    p = SimPlatform("Milan", "VCEK", now=NOW, leaf_curve=ec.SECP256R1())
    with pytest.raises(ChainError, match="P-384"):
        verify_to_report(p.sign_report(), _opts(p))


def test_validity_of_leaf_and_intermediate() -> None:
    old = SimPlatform("Milan", "VCEK", now=NOW, leaf_validity=(NOW - dt.timedelta(days=400), NOW - dt.timedelta(days=1)))
    with pytest.raises(ExpiredError, match="VCEK certificate .* expired"):
        verify_to_report(old.sign_report(), _opts(old))
    assert verify_to_report(old.sign_report(), _opts(old, now=NOW - dt.timedelta(days=2))).accepted
    future = SimPlatform("Milan", "VLEK", now=NOW,
                         intermediate_validity=(NOW + dt.timedelta(days=1), NOW + dt.timedelta(days=900)))
    with pytest.raises(ExpiredError, match="not valid before"):
        verify_to_report(future.sign_report(), _opts(future))


def test_revocation(milan: SimPlatform) -> None:
    from verifier.certs import load_crl
    raw = milan.sign_report()
    ok = load_crl(make_crl(milan, [99]))
    assert _outcomes(milan, raw, crls=(ok,))["cert.revocation"] is Outcome.PASS
    assert _outcomes(milan, raw)["cert.revocation"] is Outcome.SKIP
    revoked_ask = load_crl(make_crl(milan, [milan.intermediate.serial_number]))
    with pytest.raises(RevokedError, match="ASK/ASVK"):
        verify_to_report(raw, _opts(milan, crls=(revoked_ask,)))
    revoked_leaf = load_crl(make_crl(milan, [milan.leaf.serial_number]))
    with pytest.raises(RevokedError, match="VCEK"):
        verify_to_report(raw, _opts(milan, crls=(revoked_leaf,)))
    forged = load_crl(make_crl(milan, [99], signer=milan.int_key))   # right issuer name, wrong key
    with pytest.raises(ChainError, match="CRL"):
        verify_to_report(raw, _opts(milan, crls=(forged,)))
    with pytest.raises(ChainError, match="CRL"):
        verify_to_report(raw, _opts(milan, check_crl=True))
    fetcher = SimFetcher(milan, crl=make_crl(milan, [milan.intermediate.serial_number]))
    with pytest.raises(RevokedError):
        verify_to_report(raw, _opts(milan, check_crl=True, fetcher=fetcher))
    assert fetcher.calls == ["crl"]


def test_signing_key_mismatch(milan: SimPlatform) -> None:
    raw = milan.sign_report(key_info=1 << 2)   # says VLEK, signed by the VCEK
    assert _failed(milan, raw) == ["report.signing_key"]


def test_product_sources_must_agree() -> None:
    genoa = SimPlatform("Genoa", "VCEK", now=NOW)
    raw = genoa.sign_report(cpuid_mod_id=0x01)          # CPUID says Milan; the certificate says Genoa
    assert _failed(genoa, raw) == ["report.product"]
    assert _failed(genoa, genoa.sign_report(), product=Product.MILAN) == ["report.product"]
    assert _failed(genoa, genoa.sign_report(cpuid_fam_id=0x17)) == ["report.product"]   # unknown CPU
    v2 = genoa.sign_report(version=2)                    # no CPUID: the certificate decides
    assert _failed(genoa, v2) == []


def test_leaf_product_name_disagrees() -> None:
    p = SimPlatform("Genoa", "VCEK", now=NOW, leaf_product_name="Milan-B0")
    assert _failed(p, p.sign_report()) == ["report.product"]


def test_version_and_vmpl(milan: SimPlatform) -> None:
    assert _failed(milan, milan.sign_report(version=2), min_report_version=3) == ["report.version"]
    assert _failed(milan, milan.sign_report(version=5, launch_mit_vector=1, current_mit_vector=3)) == []
    assert _failed(milan, milan.sign_report(vmpl=0xFFFFFFFF)) == ["report.vmpl"]
    assert _failed(milan, milan.sign_report(vmpl=2), vmpl=0) == ["report.vmpl"]
    assert _failed(milan, milan.sign_report(vmpl=2)) == []


def test_chip_id(milan: SimPlatform) -> None:
    assert _failed(milan, milan.sign_report(chip_id=b"\x01" * 64)) == ["report.chip_id"]
    masked = milan.sign_report(key_info=0b10, chip_id=b"")
    assert _outcomes(milan, masked)["report.chip_id"] is Outcome.SKIP
    assert _failed(milan, milan.sign_report(key_info=0b10)) == ["report.chip_id"]   # masked but not zero
    turin = SimPlatform("Turin", "VCEK", now=NOW)
    assert _outcomes(turin, turin.sign_report())["report.chip_id"] is Outcome.PASS
    assert _failed(turin, turin.sign_report(chip_id=turin.chip_id[:8] + b"\x01")) == ["report.chip_id"]


def test_hwid_der_wrapped_leaf_verifies() -> None:
    p = SimPlatform("Milan", "VCEK", now=NOW, hwid_der_wrapped=True)
    assert verify_to_report(p.sign_report(), _opts(p)).accepted


def test_tcb_checks() -> None:
    p = SimPlatform("Genoa", "VCEK", now=NOW, tcb=Tcb(snp=23), cert_tcb=Tcb(snp=22))
    assert _failed(p, p.sign_report()) == ["tcb.reported_matches_cert"]
    # reported == cert, but CURRENT below the certificate in one component
    assert _failed(p, p.sign_report(reported_tcb=Tcb(snp=22), current_tcb=Tcb(snp=22, microcode=71))) == [
        "tcb.cert_le_current"]
    assert _failed(p, p.sign_report(reported_tcb=Tcb(snp=22))) == []   # committed == current == snp 23


def test_tcb_turin_fmc_compared() -> None:
    p = SimPlatform("Turin", "VCEK", now=NOW, tcb=Tcb(fmc=2), cert_tcb=Tcb(fmc=3))
    assert _failed(p, p.sign_report()) == ["tcb.reported_matches_cert", "tcb.cert_le_current"]


def test_committed_tcb(milan: SimPlatform) -> None:
    raw = milan.sign_report(committed_tcb=Tcb(microcode=70))
    assert _outcomes(milan, raw)["tcb.committed_eq_current"] is Outcome.WARN
    assert _failed(milan, raw, allow_provisional=False) == ["tcb.committed_eq_current"]


def test_report_data(milan: SimPlatform) -> None:
    raw = milan.sign_report(report_data=b"nonce" * 4)
    assert _outcomes(milan, raw, report_data=b"nonce" * 4)["report.report_data"] is Outcome.PASS
    assert _failed(milan, raw, report_data=b"other") == ["report.report_data"]


@pytest.mark.parametrize("offset", [0x04C, 0x18B, 0x1EB, 0x208, 0x29F])
def test_signed_reserved_bytes_refused(milan: SimPlatform, offset: int) -> None:
    raw = milan.sign_report(raw_patch={offset: 0x80})
    with pytest.raises(MalformedReport):
        verify_to_report(raw, _opts(milan))
    assert [c.name for c in verify_evidence(raw, _opts(milan)).failures] == ["evidence.parse"]


def test_turin_tcb_reserved_bytes_refused() -> None:
    p = SimPlatform("Turin", "VCEK", now=NOW)
    raw = p.sign_report(current_tcb=Tcb().encode(Product.TURIN) | 1 << 40)
    with pytest.raises(MalformedReport, match="reserved bytes 4..6"):
        verify_to_report(raw, _opts(p))


def test_fetcher_supplies_vcek_and_chain(milan: SimPlatform) -> None:
    fetcher = SimFetcher(milan)
    v = verify_to_report(milan.sign_report(), _opts(milan, with_chain=False, fetcher=fetcher))
    assert v.accepted and fetcher.calls == ["vcek", "chain:VCEK"]


def test_vlek_cannot_be_fetched() -> None:
    p = SimPlatform("Milan", "VLEK", now=NOW)
    with pytest.raises(ChainError, match="VLEK"):
        verify_to_report(p.sign_report(), _opts(p, with_chain=False, fetcher=SimFetcher(p)))


def test_chain_validated_once_per_leaf(milan: SimPlatform, monkeypatch: pytest.MonkeyPatch) -> None:
    verify_mod.clear_caches()
    calls: list[str] = []
    real = verify_mod._check_pss_signed
    monkeypatch.setattr(verify_mod, "_check_pss_signed", lambda c, i, w: (calls.append(w), real(c, i, w))[1])
    for i in range(5):
        assert verify_to_report(milan.sign_report(guest_svn=i), _opts(milan)).accepted
    assert len(calls) == 3      # ARK self-signature, ASK, VCEK: once
    # Time still matters on cached chains.
    with pytest.raises(ExpiredError):
        verify_to_report(milan.sign_report(), _opts(milan, now=NOW + dt.timedelta(days=365 * 30)))


def test_evidence_shapes_roundtrip(milan: SimPlatform) -> None:
    import json
    raw = milan.sign_report()
    for shape, obj in (("firmgate-json", milan.firmgate_json(raw)), ("snp-evidence", milan.trustee_json(raw)),
                       ("tsm", milan.tsm_json(raw))):
        ev = load_evidence(json.dumps(obj).encode())
        assert isinstance(ev, Evidence) and ev.shape == shape and ev.report.raw == raw
        opts = VerifyOptions(trust_store=DEFAULT_TRUST_STORE.with_simulated_root(milan.ark), now=NOW,
                             certs=(milan.intermediate, milan.ark))
        assert verify_to_report(ev, opts).accepted


def test_crl_on_disk_is_used_without_being_asked(milan: SimPlatform, tmp_path) -> None:
    from verifier.kds.fetch import DirFetcher
    (tmp_path / "milan").mkdir()
    raw = milan.sign_report()
    assert _outcomes(milan, raw, fetcher=DirFetcher(tmp_path))["cert.revocation"] is Outcome.SKIP
    (tmp_path / "milan" / "crl.der").write_bytes(make_crl(milan, [milan.intermediate.serial_number]))
    with pytest.raises(RevokedError):
        verify_to_report(raw, _opts(milan, fetcher=DirFetcher(tmp_path)))
    (tmp_path / "milan" / "crl.der").write_bytes(make_crl(milan, [12345]))
    assert _outcomes(milan, raw, fetcher=DirFetcher(tmp_path))["cert.revocation"] is Outcome.PASS
