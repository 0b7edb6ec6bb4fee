"""Evidence shapes: every JSON form round-trips to the same raw bytes, and malformed ones are refused by name."""
from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest

from sim.platform import SimPlatform, Tcb
from verifier.abi.fields import Product
from verifier.errors import CertificateFormatError, EvidenceError, MalformedReport
from verifier.evidence import evidence_from_json, load_evidence, rebuild_report, snp_evidence_json

from conftest import KBS_VECTORS, SNP_VECTORS


@pytest.fixture(scope="module")
def trustee() -> dict[str, Any]:
    return json.loads((KBS_VECTORS / "trustee-e2e-snp-evidence.json").read_text())


@pytest.mark.parametrize("case", ["virtee-milan-v2", "tav-genoa-v3", "trustee-aws-vlek-milan-v3"])
def test_snp_evidence_json_is_the_inverse_of_rebuild(case: str) -> None:
    raw = (SNP_VECTORS / case / "report.bin").read_bytes()
    doc = snp_evidence_json(raw)
    assert rebuild_report(doc["attestation_report"]) == raw
    assert load_evidence(json.dumps(doc).encode()).report.raw == raw


def test_trustee_fixture_rebuilds(trustee: dict[str, Any]) -> None:
    ev = evidence_from_json(trustee)
    assert ev.report.version == 3 and ev.report.cpuid_product is Product.GENOA
    assert snp_evidence_json(ev.report)["attestation_report"]["current_tcb"] == trustee["attestation_report"]["current_tcb"]
    assert evidence_from_json({"primary_evidence": trustee, "additional_evidence": ""}).report.raw == ev.report.raw


def test_turin_tcb_objects_use_turins_layout() -> None:
    p = SimPlatform("Turin")
    raw = p.sign_report(version=2, current_tcb=Tcb(fmc=4))   # v2: no CPUID; fmc marks Turin
    doc = snp_evidence_json(raw, product="Turin")
    assert doc["attestation_report"]["current_tcb"]["fmc"] == 4
    assert rebuild_report(doc["attestation_report"]) == raw


@pytest.mark.parametrize("mutate,match", [
    (lambda ar: ar.pop("measurement"), "lacks: measurement"),
    (lambda ar: ar.update(extra=1), "unknown keys: extra"),
    (lambda ar: ar.update(report_data=[0] * 63), "array of 64"),
    (lambda ar: ar.update(report_data=[256] + [0] * 63), "0..255"),
    (lambda ar: ar.update(report_data=[True] + [0] * 63), "0..255"),
    (lambda ar: ar.update(vmpl=-1), "unsigned 32-bit"),
    (lambda ar: ar.update(policy=2**64), "unsigned 64-bit"),
    (lambda ar: ar.update(version="3"), "unsigned 32-bit"),
    (lambda ar: ar["current_tcb"].update(fmc=1), "not from a Turin"),
    (lambda ar: ar["current_tcb"].update(tee=300), "unsigned 8-bit"),
    (lambda ar: ar.update(current={"major": 1, "minor": 2}), "major/minor/build"),
    (lambda ar: ar.update(signature={"r": [0] * 72}), r"\{r, s\}"),
])
def test_trustee_json_malformed(trustee: dict[str, Any], mutate: Any, match: str) -> None:
    doc = copy.deepcopy(trustee)
    mutate(doc["attestation_report"])
    with pytest.raises(EvidenceError, match=match):
        evidence_from_json(doc)


def test_trustee_json_layout_rules_still_apply(trustee: dict[str, Any]) -> None:
    doc = copy.deepcopy(trustee)
    doc["attestation_report"]["key_info"] = 7 << 2
    with pytest.raises(MalformedReport, match="unsigned"):
        evidence_from_json(doc)
    doc = copy.deepcopy(trustee)
    doc["attestation_report"]["version"] = 9
    with pytest.raises(EvidenceError, match="VERSION"):
        evidence_from_json(doc)


@pytest.mark.parametrize("chain,exc", [
    ("nope", EvidenceError),
    ([{"cert_type": "VCEK"}], EvidenceError),
    ([{"cert_type": "VCEK", "data": [48, 1000]}], EvidenceError),
    ([{"cert_type": "VCEK", "data": [48, 130, 0, 1]}], CertificateFormatError),
    ([{"cert_type": "SOMETHING", "data": [1]}], CertificateFormatError),
    ([{"cert_type": "VCEK", "data": [0] * 20000}], EvidenceError),
    ([{"cert_type": "ARK", "data": []}] * 17, EvidenceError),
])
def test_trustee_cert_chain_malformed(trustee: dict[str, Any], chain: Any, exc: type) -> None:
    doc = dict(trustee, cert_chain=chain)
    with pytest.raises(exc):
        evidence_from_json(doc)


def test_trustee_cert_chain_other_entries_ignored(trustee: dict[str, Any]) -> None:
    doc = dict(trustee, cert_chain=[{"cert_type": {"OTHER": "0000"}, "data": [1]}, {"cert_type": "Empty", "data": []}]
               + trustee["cert_chain"])
    assert len(evidence_from_json(doc).certs) == 1
    assert evidence_from_json(dict(trustee, cert_chain=None)).certs == ()


def test_firmgate_and_tsm_shapes() -> None:
    p = SimPlatform("Genoa")
    raw = p.sign_report()
    doc = p.firmgate_json(raw)
    doc["certs"] = [base64.b64encode(p.root_pem()).decode()]
    ev = evidence_from_json(doc)
    assert ev.shape == "firmgate-json" and ev.cert_source == "cert_table" and len(ev.certs) == 4
    assert evidence_from_json({"report": base64.b64encode(raw).decode()}).certs == ()
    urlsafe = {"report": base64.urlsafe_b64encode(raw).decode().rstrip("=")}
    assert evidence_from_json(urlsafe).report.raw == raw
    tsm = p.tsm_json(raw)
    assert evidence_from_json(tsm).shape == "tsm"
    assert evidence_from_json({"outblob": tsm["outblob"]}).certs == ()


@pytest.mark.parametrize("doc,match", [
    ({"report": 5}, "base64 string"),
    ({"report": "!!!!"}, "not valid base64"),
    ({"report": base64.b64encode(b"x" * 10).decode()}, "1184"),
    ({"report": "", "extra": 1}, "unknown keys"),
    ({"report": "A" * 10000}, "too large"),
    ({"outblob": "AA", "provider": "tdx_guest"}, "sev_guest"),
    ({"primary_evidence": {"primary_evidence": {}}}, "nested"),
    ({"something": 1}, "none of"),
    ([], "must be an object"),
])
def test_json_shapes_refused(doc: Any, match: str) -> None:
    with pytest.raises(EvidenceError, match=match):
        evidence_from_json(doc)


def test_load_evidence_bounds() -> None:
    with pytest.raises(EvidenceError, match="at most"):
        load_evidence(b"{" + b" " * 600_000 + b"}")
    with pytest.raises(EvidenceError, match="does not parse"):
        load_evidence(b"{" * 100_000)
    with pytest.raises(EvidenceError, match="neither"):
        load_evidence(b"\x03" * 1000)
