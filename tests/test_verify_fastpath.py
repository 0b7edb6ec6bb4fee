"""The broker's per-handshake path (Trustee SnpEvidence JSON -> evidence_from_json -> verify_report)
with its caches: parsed certificates/CRLs memoised by the SHA-256 of their bytes, the chain
selection memo, the C-speed byte-array checks. A cached path must give exactly what a fresh
parse gives, refuse exactly what it refused, and still judge time (validity, revocation) on
every call."""
from __future__ import annotations

import copy
import datetime as dt
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.platform import SimPlatform, make_crl
from verifier import certs as certs_mod
from verifier import verify as verify_mod
from verifier.abi.report import LAYOUT, encode_fields
from verifier.certs import Lru, load_certificates, load_crl, serial_number
from verifier.errors import (CertificateFormatError, ChainError, EvidenceError, ExpiredError, FirmgateError,
                             RevokedError)
from verifier.evidence import evidence_from_json, rebuild_report, snp_evidence_json
from verifier.options import VerifyOptions
from verifier.trust import DEFAULT_TRUST_STORE
from verifier.verify import verify_report

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 6, 1, tzinfo=UTC)


# -- helpers -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def milan() -> SimPlatform:
    return SimPlatform("Milan", "VCEK", now=NOW)


def _sim_opts(p: SimPlatform, **kw: Any) -> VerifyOptions:
    kw.setdefault("now", NOW)   # no certificates in the options: the chain comes in the evidence
    return VerifyOptions(trust_store=DEFAULT_TRUST_STORE.with_simulated_root(p.ark), **kw)


def _verdict(ev_json: dict[str, Any], opts: VerifyOptions) -> dict[str, Any]:
    """Everything a caller sees of a verification, as plain data (or the error it raised)."""
    try:
        v = verify_report(evidence_from_json(copy.deepcopy(ev_json)), opts)
    except FirmgateError as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"checks": [(c.name, c.outcome.value, c.message, c.expected, c.actual) for c in v.checks],
            "facts": v.facts(), "leaf": v.leaf.public_bytes(Encoding.DER), "accepted": v.accepted}


def _count_pss(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = verify_mod._check_pss_signed
    monkeypatch.setattr(verify_mod, "_check_pss_signed", lambda c, i, w: (calls.append(w), real(c, i, w))[1])
    return calls


def _count_der_parses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = x509.load_der_x509_certificate
    monkeypatch.setattr(certs_mod.x509, "load_der_x509_certificate", lambda d: (calls.append(len(d)), real(d))[1])
    return calls


def _real_genoa(snp_vectors: Path) -> tuple[bytes, list[tuple[str, bytes]]]:
    case = snp_vectors / "tav-genoa-v3"
    chain = []
    for kind, path in (("ARK", snp_vectors / "roots/genoa/ark.pem"), ("ASK", snp_vectors / "roots/genoa/ask.pem"),
                       ("VCEK", case / "vcek.pem")):
        chain.append((kind, load_certificates(path.read_bytes())[0].public_bytes(Encoding.DER)))
    return (case / "report.bin").read_bytes(), chain


# -- the cache gives what a fresh parse gives ---------------------------------------------------
def test_real_trustee_json_cached_equals_fresh(snp_vectors: Path) -> None:
    raw, chain = _real_genoa(snp_vectors)
    ev_json = snp_evidence_json(raw, chain)
    opts = VerifyOptions()
    verify_mod.clear_caches()
    fresh = _verdict(ev_json, opts)
    assert fresh.get("accepted") is True, fresh
    cached = [_verdict(ev_json, opts) for _ in range(3)]
    assert all(c == fresh for c in cached)
    # The same DER gives the same (immutable) object: that is what lets the selection memo hit.
    a, b = evidence_from_json(copy.deepcopy(ev_json)), evidence_from_json(copy.deepcopy(ev_json))
    assert all(x is y for x, y in zip(a.certs, b.certs)) and len(a.certs) == 3


def test_second_handshake_repeats_no_chain_work(milan: SimPlatform, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh report with the same chain bytes: no certificate parse, no chain signature."""
    verify_mod.clear_caches()
    opts = _sim_opts(milan)
    first = milan.trustee_json(milan.sign_report(report_data=b"\1" * 64), include=("ARK", "ASK", "LEAF"))
    assert verify_report(evidence_from_json(first), opts).accepted
    pss, parses = _count_pss(monkeypatch), _count_der_parses(monkeypatch)
    for i in range(4):
        ev_json = milan.trustee_json(milan.sign_report(report_data=bytes([i + 2]) * 64), include=("ARK", "ASK", "LEAF"))
        v = verify_report(evidence_from_json(ev_json), opts)
        assert v.accepted and v.report.report_data == bytes([i + 2]) * 64
    assert pss == [] and parses == []
    # ...while a cleared cache does all of it again, with the same verdict.
    verify_mod.clear_caches()
    assert verify_report(evidence_from_json(ev_json), opts).accepted
    assert len(pss) == 3 and len(parses) == 3


def test_report_is_never_cached(milan: SimPlatform) -> None:
    """Only the chain is memoised: a bad signature on a fresh report fails though its chain is cached."""
    verify_mod.clear_caches()
    opts = _sim_opts(milan)
    good = milan.trustee_json(milan.sign_report(), include=("ARK", "ASK", "LEAF"))
    bad = milan.trustee_json(milan.sign_report(bad_signature=True), include=("ARK", "ASK", "LEAF"))
    assert _verdict(good, opts)["accepted"] is True
    assert _verdict(bad, opts)["error"] == "SignatureError"
    assert _verdict(good, opts)["accepted"] is True


# -- refusals: same classes and messages, cold or warm -----------------------------------------
BAD_ELEMENTS = [True, False, 1.0, 0.0, -1, 256, 10 ** 30, None, "1", [1], {"v": 1}]


def _chain_json(p: SimPlatform) -> dict[str, Any]:
    return p.trustee_json(p.sign_report(), include=("ARK", "ASK", "LEAF"))


def _positions(data: list[int]) -> dict[str, int]:
    """An index holding 0, one holding 1, one holding a byte >= 2 (a bool can only pass bytearray() as 0/1)."""
    return {"zero": data.index(0), "one": data.index(1), "other": next(i for i, v in enumerate(data) if v >= 2)}


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("where", ["zero", "one", "other"])
@pytest.mark.parametrize("bad", BAD_ELEMENTS, ids=repr)
@pytest.mark.parametrize("entry", [0, 2], ids=["ARK", "VCEK"])
def test_cert_array_bad_element_refused(milan: SimPlatform, warm: bool, where: str, bad: Any, entry: int) -> None:
    ev_json = _chain_json(milan)
    if warm:
        assert verify_report(evidence_from_json(copy.deepcopy(ev_json)), _sim_opts(milan)).accepted
    else:
        verify_mod.clear_caches()
    data = ev_json["cert_chain"][entry]["data"]
    data[_positions(data)[where]] = bad
    with pytest.raises(EvidenceError) as info:
        evidence_from_json(ev_json)
    assert str(info.value) == f"cert_chain[{entry}].data must hold integers 0..255"


def test_bool_in_json_text_refused_after_cache_warm(milan: SimPlatform) -> None:
    """What a hostile guest sends is JSON text: `true` where the DER has 0x01 (same bytes otherwise)."""
    ev_json = _chain_json(milan)
    assert verify_report(evidence_from_json(copy.deepcopy(ev_json)), _sim_opts(milan)).accepted
    data = ev_json["cert_chain"][2]["data"]
    for value, json_word in ((1, "true"), (0, "false")):
        hostile = copy.deepcopy(ev_json)
        hostile["cert_chain"][2]["data"][data.index(value)] = "PLACEHOLDER"
        text = json.dumps(hostile).replace('"PLACEHOLDER"', json_word)
        with pytest.raises(EvidenceError, match=r"cert_chain\[2\]\.data must hold integers 0\.\.255"):
            evidence_from_json(json.loads(text))


def test_cert_array_shape_refused(milan: SimPlatform) -> None:
    ev_json = _chain_json(milan)
    ev_json["cert_chain"][1]["data"] = tuple(ev_json["cert_chain"][1]["data"])
    with pytest.raises(EvidenceError, match=r"cert_chain\[1\]\.data must be an array of at most 16384 bytes"):
        evidence_from_json(ev_json)
    ev_json["cert_chain"][1]["data"] = [0] * (16 * 1024 + 1)
    with pytest.raises(EvidenceError, match=r"cert_chain\[1\]\.data must be an array of at most 16384 bytes"):
        evidence_from_json(ev_json)


@pytest.mark.parametrize("bad", BAD_ELEMENTS, ids=repr)
@pytest.mark.parametrize("field", ["family_id", "measurement", "report_data", "chip_id", "signature.r", "signature.s"])
def test_report_array_bad_element_refused(milan: SimPlatform, field: str, bad: Any) -> None:
    ev_json = milan.trustee_json(milan.sign_report(), include=())
    ar = ev_json["attestation_report"]
    arr = ar["signature"][field.split(".")[1]] if field.startswith("signature.") else ar[field]
    arr[5] = bad
    with pytest.raises(EvidenceError) as info:
        evidence_from_json(ev_json)
    assert str(info.value) == f"attestation_report.{field} must hold integers 0..255"


def test_report_array_errors_name_the_first_bad_field(milan: SimPlatform) -> None:
    """Several bad arrays: the message names the first in field order, as the field-by-field check did."""
    ev_json = milan.trustee_json(milan.sign_report(), include=())
    ar = ev_json["attestation_report"]
    ar["chip_id"] = ar["chip_id"][:10]           # wrong length, later field
    ar["image_id"][0] = True                      # bad element, earlier field
    with pytest.raises(EvidenceError, match=r"^attestation_report\.image_id must hold integers 0\.\.255$"):
        evidence_from_json(copy.deepcopy(ev_json))
    ar["image_id"][0] = 0
    with pytest.raises(EvidenceError, match=r"^attestation_report\.chip_id must be an array of 64 integers$"):
        evidence_from_json(ev_json)


# -- time and revocation are judged on every call ------------------------------------------------
def test_cached_leaf_that_has_since_expired_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    p = SimPlatform("Milan", "VCEK", now=NOW, key_label="fastpath-expiry",
                    leaf_validity=(NOW - dt.timedelta(days=1), NOW + dt.timedelta(hours=1)))
    ev_json = p.trustee_json(p.sign_report(), include=("ARK", "ASK", "LEAF"))
    verify_mod.clear_caches()
    assert _verdict(ev_json, _sim_opts(p))["accepted"] is True
    pss, parses = _count_pss(monkeypatch), _count_der_parses(monkeypatch)
    later = _sim_opts(p, now=NOW + dt.timedelta(hours=2))
    with pytest.raises(ExpiredError, match="VCEK certificate .* expired") as warm:
        verify_report(evidence_from_json(copy.deepcopy(ev_json)), later)
    assert pss == [] and parses == []             # refused from the cache, not by a re-parse
    verify_mod.clear_caches()                     # and a fresh parse says the same
    assert _verdict(ev_json, later) == {"error": "ExpiredError", "message": str(warm.value)}
    with pytest.raises(ExpiredError, match="not valid before"):
        verify_report(evidence_from_json(copy.deepcopy(ev_json)), _sim_opts(p, now=NOW - dt.timedelta(days=2)))


def test_cached_crl_still_revokes_every_time(milan: SimPlatform) -> None:
    verify_mod.clear_caches()
    crl = make_crl(milan, [serial_number(milan.leaf)])
    ev_json = _chain_json(milan)
    ev_json["cert_chain"].append({"cert_type": "CRL", "data": list(crl)})
    first, second = evidence_from_json(copy.deepcopy(ev_json)), evidence_from_json(copy.deepcopy(ev_json))
    assert first.crls[0] is second.crls[0]        # memoised by its bytes
    for ev in (first, second):
        with pytest.raises(RevokedError, match="is revoked"):
            verify_report(ev, _sim_opts(milan))
    clean = _chain_json(milan)
    clean["cert_chain"].append({"cert_type": "CRL", "data": list(make_crl(milan, []))})
    assert verify_report(evidence_from_json(clean), _sim_opts(milan)).accepted


# -- a changed byte is a different certificate ---------------------------------------------------
@pytest.mark.parametrize("offset", [-1, -80, 200], ids=["signature-last", "signature-inside", "tbs"])
def test_tampered_cert_is_a_miss_and_fails_as_before(milan: SimPlatform, offset: int) -> None:
    ev_json = _chain_json(milan)
    verify_mod.clear_caches()
    assert _verdict(ev_json, _sim_opts(milan))["accepted"] is True   # the genuine chain is now cached
    tampered = copy.deepcopy(ev_json)
    data = tampered["cert_chain"][2]["data"]
    data[offset] ^= 0x01
    warm = _verdict(tampered, _sim_opts(milan))
    verify_mod.clear_caches()
    cold = _verdict(tampered, _sim_opts(milan))
    assert warm == cold and warm["error"] == "ChainError" and "does not verify" in warm["message"]
    # the genuine bytes still verify afterwards (the tampered copy did not replace them)
    assert _verdict(ev_json, _sim_opts(milan))["accepted"] is True


def test_tampered_leaf_never_returns_the_cached_object(milan: SimPlatform) -> None:
    der = milan.leaf.public_bytes(Encoding.DER)
    genuine = load_certificates(der)[0]
    changed = bytearray(der)
    changed[-1] ^= 0x01
    other = load_certificates(bytes(changed))[0]
    assert other is not genuine and other.public_bytes(Encoding.DER) == bytes(changed)
    with pytest.raises(ChainError, match="does not verify"):
        verify_mod._check_pss_signed(other, milan.intermediate, "VCEK")


def test_parse_failures_are_not_cached() -> None:
    verify_mod.clear_caches()
    before = len(certs_mod.PARSED_CACHE)
    for _ in range(2):
        with pytest.raises(CertificateFormatError, match="not a DER or PEM certificate"):
            load_certificates(b"\x30\x03\x02\x01\x00", "VCEK")
        with pytest.raises(CertificateFormatError, match="does not parse"):
            load_crl(b"\x30\x03\x02\x01\x00", "CRL")
    assert len(certs_mod.PARSED_CACHE) == before


def test_pem_and_der_of_one_cert_parse_alike(milan: SimPlatform) -> None:
    der, pem = milan.ark.public_bytes(Encoding.DER), milan.ark.public_bytes(Encoding.PEM)
    a, b = load_certificates(der)[0], load_certificates(pem)[0]
    assert a == b and load_certificates(pem)[0] is b and load_certificates(der)[0] is a


# -- the LRU itself --------------------------------------------------------------------------------
def test_lru_is_bounded_and_least_recent_goes_first() -> None:
    lru = Lru(3)
    for k in "abc":
        lru.put(k, k.upper())
    assert lru.get("a") == "A"          # a is now the most recent
    lru.put("d", "D")
    assert lru.get("b") is None and [lru.get(k) for k in "acd"] == ["A", "C", "D"] and len(lru) == 3
    lru.clear()
    assert len(lru) == 0


def test_parsed_cache_is_bounded(milan: SimPlatform) -> None:
    assert certs_mod.PARSED_CACHE.size == 256
    verify_mod.clear_caches()
    der = bytearray(milan.ark.public_bytes(Encoding.DER))
    for i in range(300):                # distinct byte strings (a changed signature byte each), all parse
        der[-1], der[-2] = i & 0xFF, i >> 8
        load_certificates(bytes(der))
    assert len(certs_mod.PARSED_CACHE) == 256


def test_concurrent_handshakes_agree(milan: SimPlatform) -> None:
    verify_mod.clear_caches()
    opts = _sim_opts(milan)
    jsons = [milan.trustee_json(milan.sign_report(guest_svn=i), include=("ARK", "ASK", "LEAF")) for i in range(4)]
    results: list[Any] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        for j in range(10):
            v = verify_report(evidence_from_json(copy.deepcopy(jsons[(n + j) % 4])), opts)
            with lock:
                results.append((v.accepted, v.report.guest_svn, common_leaf(v)))

    def common_leaf(v: Any) -> bytes:
        return bytes(v.leaf.public_bytes(Encoding.DER))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 40 and all(ok for ok, _, _ in results)
    assert {svn for _, svn, _ in results} == {0, 1, 2, 3}
    assert {leaf for _, _, leaf in results} == {milan.leaf.public_bytes(Encoding.DER)}


# -- the rebuilt report is the report ----------------------------------------------------------
def test_rebuild_matches_every_real_report(snp_vectors: Path) -> None:
    raws = sorted(snp_vectors.glob("*/report.bin"))
    assert len(raws) >= 5
    for path in raws:
        raw = path.read_bytes()
        product = "Milan" if "milan" in path.parent.name else "Genoa"
        assert rebuild_report(snp_evidence_json(raw, product=product)["attestation_report"]) == raw, path


@pytest.mark.parametrize("product,version", [("Turin", 2), ("Turin", 3), ("Genoa", 5), ("Milan", 2)])
def test_rebuild_matches_sim_reports(product: str, version: int) -> None:
    p = SimPlatform(product, "VCEK", now=NOW)
    raw = p.sign_report(version=version)
    ar = snp_evidence_json(raw, product=product)["attestation_report"]
    assert rebuild_report(ar) == raw
    assert rebuild_report(json.loads(json.dumps(ar))) == raw


_BYTE_FIELDS = [k for k, (_, _, kind) in LAYOUT.items() if kind == "b" and not k.startswith("signature")]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.fixed_dictionaries({k: st.binary(min_size=LAYOUT[k][1], max_size=LAYOUT[k][1])
                                     for k in _BYTE_FIELDS}),
       guest_svn=st.integers(0, 2 ** 32 - 1), vmpl=st.integers(0, 3))
def test_rebuild_equals_encode_fields(milan: SimPlatform, fields: dict[str, bytes], guest_svn: int, vmpl: int) -> None:
    """The one-struct pack writes every field where abi's encode_fields writes it."""
    raw = milan.sign_report(guest_svn=guest_svn, vmpl=vmpl, **fields)
    ar = snp_evidence_json(raw)["attestation_report"]
    rebuilt = rebuild_report(ar)
    assert rebuilt == raw
    assert rebuilt == bytes(encode_fields({**{k: bytes(ar[k]) for k in _BYTE_FIELDS}, "guest_svn": guest_svn,
                                           "vmpl": vmpl}, base=raw))
