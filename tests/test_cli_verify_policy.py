"""`firmgate verify --policy --tenant`: the real debug report appraised from the command line, EAR written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from verifier.cli import main
from verifier.ear import public_jwk, verify_ear_jwt

from conftest import SNP_VECTORS
from test_appraise_real import POLICY


def _args(case: str) -> list[str]:
    roots = SNP_VECTORS / "roots" / "milan"
    return [str(SNP_VECTORS / case / "report.bin"), "--certs", str(SNP_VECTORS / case / "vcek.der"),
            "--certs", str(roots / "ark.pem"), "--certs", str(roots / "ask.pem"), "--offline"]


def test_debug_report_rejected_by_policy_with_reason_and_ear(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "acme.toml"
    policy.write_text(POLICY.format(digest="ab" * 48, extra=""))
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = tmp_path / "ear.pem"
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    ear = tmp_path / "ear.jwt"
    code = main(["verify", *_args("gosevguest-milan-v2-debug"), "--policy", str(policy), "--tenant", "acme",
                 "--kds-cache", str(tmp_path / "kds"), "--ear-out", str(ear), "--ear-key", str(key_pem),
                 "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and out["accepted"] is False
    failed = {c["name"]: c["message"] for c in out["checks"] if c["outcome"] == "fail"}
    assert "guest.debug" in failed and "forbids debug" in failed["guest.debug"]
    claims = verify_ear_jwt(ear.read_text().strip(), public_jwk(key.public_key()))
    assert claims["submods"]["cpu0"]["ear.status"] == "contraindicated"
    # Without --policy the same report verifies: it is genuine AMD evidence.
    assert main(["verify", *_args("gosevguest-milan-v2-debug"), "--kds-cache", str(tmp_path / "kds")]) == 0


def test_tenant_mismatch_is_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "acme.toml"
    policy.write_text(POLICY.format(digest="ab" * 48, extra=""))
    code = main(["verify", *_args("virtee-milan-v2"), "--policy", str(policy), "--tenant", "other",
                 "--kds-cache", str(tmp_path / "kds")])
    err = capsys.readouterr().err
    assert code == 2 and "not 'other'" in err and "Traceback" not in err
