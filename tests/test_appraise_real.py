"""Appraisal of real SEV-SNP reports (../shared/vectors/snp) verified against AMD's pinned roots."""
from __future__ import annotations

from pathlib import Path

import pytest

from verifier.appraise.appraise import appraise
from verifier.appraise.policy import load_policy
from verifier.appraise.reference import ReferenceTable
from verifier.appraise.store import LoadedPolicy
from verifier.certs import load_certificates
from verifier.evidence import load_evidence
from verifier.options import VerifyOptions
from verifier.verdict import Outcome
from verifier.verify import verify_report

from conftest import REPO, SNP_VECTORS


def real_verified(case: str):  # type: ignore[no-untyped-def]
    roots = SNP_VECTORS / "roots" / "milan"
    certs: list = []
    for p in (SNP_VECTORS / case / "vcek.der", roots / "ark.pem", roots / "ask.pem"):
        certs += load_certificates(p.read_bytes())
    return verify_report(load_evidence((SNP_VECTORS / case / "report.bin").read_bytes()),
                         VerifyOptions(certs=tuple(certs)))


def loaded(path: Path) -> LoadedPolicy:
    pol = load_policy(path)
    table = ReferenceTable(pol)
    table.load_files()
    return LoadedPolicy(pol, None, False, table)


POLICY = """version = 1
[[firmware.allowed]]
id = "unknown-ovmf"
sha384 = "{digest}"
svn = 1
bytes = "uploaded"
[[shapes]]
vcpus = [1]
vcpu_types = ["EPYC-v4"]
[platform]
products = ["Milan"]
signers = ["VCEK"]
{extra}
"""


def test_real_debug_report_is_rejected_by_a_policy_forbidding_debug(tmp_path: Path) -> None:
    v = real_verified("gosevguest-milan-v2-debug")
    assert v.report.policy.debug and not v.simulated
    p = tmp_path / "acme.toml"
    p.write_text(POLICY.format(digest="ab" * 48, extra=""))
    verdict = appraise(v, loaded(p))
    debug = next(c for c in verdict.checks if c.name == "guest.debug")
    assert debug.outcome is Outcome.FAIL
    assert debug.message == ("guest policy allows DEBUG (the host can read and change guest memory); "
                             "the policy forbids debug")
    assert debug.expected == "debug off" and debug.actual == "debug on"
    assert verdict.facts["status"] == "contraindicated" and debug.message in verdict.facts["reasons"]
    assert verdict.facts["trust_vector"]["runtime-opaque"] == 96
    # The rest of the platform is genuine AMD: those rules pass.
    by = {c.name: c.outcome for c in verdict.checks}
    assert by["platform.simulated"] is Outcome.PASS and by["platform.product"] is Outcome.PASS
    assert by["platform.signer"] is Outcome.PASS and verdict.facts["simulated"] is False


def test_real_report_without_debug_passes_the_debug_rule(tmp_path: Path) -> None:
    v = real_verified("virtee-milan-v2")
    assert not v.report.policy.debug
    p = tmp_path / "acme.toml"
    p.write_text(POLICY.format(digest="ab" * 48, extra=""))
    verdict = appraise(v, loaded(p))
    by = {c.name: c.outcome for c in verdict.checks}
    assert by["guest.debug"] is Outcome.PASS
    # Its firmware is not one we hold bytes for: the measurement cannot match, and the verdict says why.
    assert [c.name for c in verdict.failures] == ["firmware.measurement"]
    assert "firmware without bytes yet: unknown-ovmf" in verdict.failures[0].message


def test_example_acme_policy_rejects_the_real_debug_report(tmp_path: Path) -> None:
    v = real_verified("gosevguest-milan-v2-debug")
    verdict = appraise(v, loaded(REPO / "policies" / "acme.toml"))
    names = {c.name for c in verdict.failures}
    assert {"guest.debug", "firmware.measurement"} <= names
