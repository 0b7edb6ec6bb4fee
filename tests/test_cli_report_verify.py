"""`firmgate verify` and `firmgate report show` end to end, through verifier.cli.main (real files, no network)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sim.platform import SimPlatform
from verifier.cli import main

from conftest import KBS_VECTORS, SNP_VECTORS

ROOTS = str(SNP_VECTORS / "roots")
CASES = {
    "virtee-milan-v2": ("report.bin", "vcek.der", []),
    "gosevguest-milan-v2-debug": ("report.bin", "vcek.der", []),
    "trustee-milan-v2": ("report.bin", "vcek.der", []),
    "trustee-aws-vlek-milan-v3": ("report.bin", "vlek.der", ["--at", "2025-06-01T00:00:00Z"]),
    "tav-genoa-v3": ("report.bin", "vcek.pem", []),
    "veraison-tsm-genoa-v3": ("tsm-report.json", None, []),
}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _args(case: str) -> list[str]:
    report, leaf, extra = CASES[case]
    args = [str(SNP_VECTORS / case / report), "--offline", "--kds-cache", "/nonexistent-firmgate-cache"]
    if leaf:
        args += ["--certs", str(SNP_VECTORS / case / leaf), "--certs", ROOTS]
    return args + extra


@pytest.mark.parametrize("case", sorted(CASES))
def test_verify_real_cases_exit_0(capsys: pytest.CaptureFixture[str], case: str) -> None:
    code, out, err = run(capsys, "verify", *_args(case))
    assert code == 0, out + err
    assert out.startswith("OK: ") and "report.signature" in out and "FAILED" not in out


def test_tsm_needs_no_certs_argument(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "verify", str(SNP_VECTORS / "veraison-tsm-genoa-v3" / "tsm-report.json"), "--offline")
    assert code == 0 and "pinned AMD 'ARK-Genoa'" in out


def test_vlek_now_rejected_for_expiry(capsys: pytest.CaptureFixture[str]) -> None:
    args = _args("trustee-aws-vlek-milan-v3")[:-2]   # without --at
    code, out, _ = run(capsys, "verify", *args)
    assert code == 1
    assert "FAIL: " in out and "cert.validity" in out and "expired 2025-12-10" in out


def test_verify_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "verify", *_args("tav-genoa-v3"), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["accepted"] is True and doc["facts"]["product"] == "Genoa"
    assert doc["facts"]["simulated"] is False
    assert {c["name"] for c in doc["checks"]} >= {"report.signature", "cert.chain", "report.chip_id"}


def test_trustee_json_and_cert_table(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "verify", str(KBS_VECTORS / "trustee-e2e-snp-evidence.json"), "--certs", ROOTS,
                       "--offline")
    assert code == 0, out
    # The tsm auxblob as a separate --cert-table file, with the raw outblob.
    import base64
    aux = json.loads((SNP_VECTORS / "veraison-tsm-genoa-v3" / "tsm-report.json").read_text())["auxblob"]
    table = tmp_path / "certs.bin"
    table.write_bytes(base64.urlsafe_b64decode(aux + "=" * (-len(aux) % 4)))
    code, out, _ = run(capsys, "verify", str(SNP_VECTORS / "veraison-tsm-genoa-v3" / "outblob.bin"),
                       "--cert-table", str(table), "--offline")
    assert code == 0, out


def test_report_data_and_product_options(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "verify", *_args("virtee-milan-v2"), "--report-data", "00" * 64)
    assert code == 1 and "report.report_data" in out
    code, out, _ = run(capsys, "verify", *_args("tav-genoa-v3"), "--product", "Milan")
    assert code == 1 and "FAIL" in out


@pytest.mark.parametrize("argv,needle", [
    (["--tenant", "t"], "need --policy"),
    (["--firmware", "f.fd"], "need --policy"),
    (["--policy", "/nonexistent.toml"], "does not exist"),
    (["--at", "yesterday"], "ISO 8601"),
    (["--report-data", "zz"], "not hex"),
    (["--report-data", "00" * 65], "64"),
    (["--product", "Rome"], "Milan, Genoa or Turin"),
    (["--certs", "/nonexistent"], "no such file"),
])
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    code, out, err = run(capsys, "verify", *_args("virtee-milan-v2"), *argv)
    assert code == 2 and needle in err and "Traceback" not in err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_kds_unreachable_offline_exits_3(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # Only the report: its VCEK must come from KDS, which --offline forbids and the cache lacks.
    # (A fresh process, as the CLI is: nothing fetched by an earlier test is remembered.)
    from verifier.verify import clear_caches
    clear_caches()
    code, _, err = run(capsys, "verify", str(SNP_VECTORS / "virtee-milan-v2" / "report.bin"), "--product", "Milan",
                       "--offline", "--kds-cache", str(tmp_path))
    assert code == 3 and "offline" in err and len(err.strip().splitlines()) == 1


def test_report_and_vcek_verify_offline_with_shipped_roots(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # No --certs for AMD's ARK/ASK and an empty KDS cache: the package's roots suffice.
    code, out, _ = run(capsys, "verify", str(SNP_VECTORS / "virtee-milan-v2" / "report.bin"),
                       "--certs", str(SNP_VECTORS / "virtee-milan-v2" / "vcek.der"), "--offline",
                       "--kds-cache", str(tmp_path))
    assert code == 0 and "ARK-Milan" in out and not any(tmp_path.iterdir())


def test_simulated_root(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    p = SimPlatform("Genoa", "VCEK")
    (tmp_path / "report.bin").write_bytes(p.sign_report())
    (tmp_path / "chain.pem").write_bytes(p.chain_pem())
    (tmp_path / "root.pem").write_bytes(p.root_pem())
    base = [str(tmp_path / "report.bin"), "--certs", str(tmp_path / "chain.pem"), "--offline"]
    code, out, _ = run(capsys, "verify", *base, "--certs", ROOTS)
    assert code == 1 and "cert.chain" in out        # an unknown root is not trusted; AMD's ASK did not sign it
    code, out, _ = run(capsys, "verify", *base, "--trust-root", str(tmp_path / "root.pem"))
    assert code == 0 and "SIMULATED" in out and "trust.simulated" in out
    code, out, _ = run(capsys, "verify", *base, "--trust-root", str(tmp_path / "root.pem"), "--json")
    assert json.loads(out)["facts"]["simulated"] is True
    # A leaf is not a root.
    (tmp_path / "leaf.pem").write_bytes(p.chain_pem().split(b"-----END CERTIFICATE-----")[0]
                                        + b"-----END CERTIFICATE-----\n")
    code, _, err = run(capsys, "verify", *base, "--trust-root", str(tmp_path / "leaf.pem"))
    assert code == 2 and "self-signed" in err


def test_report_show(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "report", "show", str(SNP_VECTORS / "gosevguest-milan-v2-debug" / "report.bin"),
                       "--product", "Milan", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["version"] == 2 and doc["policy"]["debug"] is True
    assert doc["reported_tcb"]["snp"] == 5 and doc["cpuid"] is None
    code, out, _ = run(capsys, "report", "show", str(SNP_VECTORS / "veraison-tsm-genoa-v3" / "tsm-report.json"))
    assert code == 0 and "Genoa" in out and "VCEK (Genoa" in out
    # v2 without --product: TCBs are shown raw, never guessed.
    code, out, _ = run(capsys, "report", "show", str(SNP_VECTORS / "virtee-milan-v2" / "report.bin"), "--json")
    assert json.loads(out)["current_tcb"] == {"raw": "0x7308000000000003"}


def test_report_show_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "short.bin"
    bad.write_bytes(b"\x02" * 100)
    code, _, err = run(capsys, "report", "show", str(bad))
    assert code == 2 and "1184" in err


def test_report_from_stdin(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import sys
    data = (SNP_VECTORS / "veraison-tsm-genoa-v3" / "tsm-report.json").read_bytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    code, out, _ = run(capsys, "verify", "-", "--offline")
    assert code == 0 and out.startswith("OK: -")
