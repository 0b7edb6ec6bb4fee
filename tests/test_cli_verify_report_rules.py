"""`firmgate verify --policy` on a genuine report: the [report] rules run from the CLI, and the output names
the report version and the root (it printed `report vNone, root None` before)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SNP_VECTORS
from test_appraise_real import POLICY

from verifier.cli import main

CASE = SNP_VECTORS / "tav-genoa-v3"
CHIP = (CASE / "report.bin").read_bytes()[0x1A0:0x1E0].hex()
FAMILY = "01" + "00" * 15          # this report's FAMILY_ID
# Every [report] rule, each set to what this genuine Genoa report holds.
RULES = f"""[report]
family_ids = ["{FAMILY}"]
image_ids = ["02{"00" * 15}"]
migration_agent = "none"
chip_ids = ["{CHIP}"]
min_current_firmware = "1.55.40"
min_committed_firmware = "1.55.40"
[report.platform_info]
alias_check_complete = "required"
tio_en = "forbidden"
unknown_bits = "forbidden"
[report.guest_policy]
cxl_allow = "forbidden"
unknown_bits = "forbidden"
[report.key_info]
mask_chip_key = "forbidden"
unknown_bits = "forbidden"
"""
NAMES = ("guest.family_id", "guest.image_id", "guest.migration_agent", "platform.chip_id",
         "platform.firmware_current", "platform.firmware_committed", "platform.platform_info",
         "guest.policy_bits", "guest.key_info")


def _policy(tmp_path: Path, rules: str) -> Path:
    p = tmp_path / "acme.toml"
    p.write_text(POLICY.format(digest="ab" * 48, extra="").replace('"Milan"', '"Genoa"') + rules)
    return p


def _verify(tmp_path: Path, policy: Path, *extra: str) -> int:
    return main(["verify", str(CASE / "report.bin"), "--certs", str(CASE / "vcek.pem"), "--offline",
                 "--kds-cache", str(tmp_path / "kds"), "--policy", str(policy), *extra])


def test_genuine_report_passes_every_report_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = _verify(tmp_path, _policy(tmp_path, RULES), "--json")
    out = json.loads(capsys.readouterr().out)
    outcomes = {c["name"]: c["outcome"] for c in out["checks"]}
    assert all(outcomes[n] == "pass" for n in NAMES), {n: outcomes[n] for n in NAMES}
    assert outcomes["platform.mitigations"] == "skip"
    # The only failure: the policy lists no firmware whose measurement this is.
    assert code == 1 and [c["name"] for c in out["checks"] if c["outcome"] == "fail"] == ["firmware.measurement"]
    assert out["facts"]["report_version"] == 3 and out["facts"]["root"] == "ARK-Genoa"


def test_failing_rule_is_named_and_the_header_is_complete(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = RULES.replace(FAMILY, "ee" * 16).replace('"1.55.40"\n[report.platform', '"1.57.0"\n[report.platform')
    code = _verify(tmp_path, _policy(tmp_path, rules))
    out = capsys.readouterr().out
    assert code == 1
    assert "Genoa VCEK, report v3, root 'ARK-Genoa'" in out and "None" not in out
    failed = [line.split()[1] for line in out.splitlines() if line.strip().startswith("FAILED")]
    assert failed == ["firmware.measurement", "guest.family_id", "platform.firmware_committed"], out


def test_mitigation_rule_on_a_v3_report_fails_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = _verify(tmp_path, _policy(tmp_path, RULES.replace("[report.platform_info]",
                                                              "[report.mitigations]\ncurrent = [0]\n[report.platform_info]")))
    out = capsys.readouterr().out
    assert code == 1 and "platform.mitigations" in out and "version 3 report has no mitigation vectors" in out


def test_bad_rule_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = _verify(tmp_path, _policy(tmp_path, '[report]\nmin_current_firmware = "one"\n'))
    err = capsys.readouterr().err
    assert code == 2 and "report.min_current_firmware" in err and "Traceback" not in err


def test_broker_appraiser_applies_the_same_rules_to_real_trustee_evidence(tmp_path: Path) -> None:
    # The broker's seam over the verifier: the real Trustee SnpEvidence (VCEK only in cert_chain) verifies with
    # the package's AMD roots, and a [report] rule fails by the same name as from the CLI.
    from conftest import KBS_VECTORS

    from broker.appraisal import VerifierAppraiser
    evidence = json.loads((KBS_VECTORS / "trustee-e2e-snp-evidence.json").read_bytes())
    d = tmp_path / "policies"
    d.mkdir()
    _policy(d, '[report]\nfamily_ids = ["' + "ee" * 16 + '"]\nmigration_agent = "none"\n')
    appraiser = VerifierAppraiser(str(d))
    attested = appraiser.verify(appraiser.parse(evidence))
    verdict = appraiser.appraise(attested, "acme", expected_report_data=attested.report_data)
    outcomes = {c.name: c.outcome.value for c in verdict.checks}
    assert outcomes["guest.family_id"] == "fail" and outcomes["guest.migration_agent"] == "pass"
    assert outcomes["report.signature"] == "pass" and outcomes["platform.simulated"] == "pass"
    assert verdict.facts["report_version"] == 3 and verdict.facts["root"] == "ARK-Genoa"
