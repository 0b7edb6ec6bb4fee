"""`firmgate demo` end to end: each step's outcome and reason, not just the exit code."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import sim.demo
from sim.demo import run_demo
from verifier.errors import UsageError

FW = "edk2-2022.11-OVMF.fd"   # the image Debian bookworm installs as /usr/share/ovmf/OVMF.fd
EXPECTED = ["installed", "released", "denied", "denied", "committed", "released", "denied", "denied",
            "denied", "released", "denied"]


def _check_story(result: dict[str, Any]) -> None:
    steps = result["steps"]
    assert [s["outcome"] for s in steps] == EXPECTED, [(s["outcome"], s["detail"]) for s in steps]
    assert all(s["ok"] for s in steps) and result["ok"] is True
    assert result["simulated_platform"] is True
    # 1, 3, 6, 8 installed a firmware; the simulated host measured what was in force each time.
    m1 = steps[0]["facts"]["measurement"]
    assert steps[7]["facts"]["measurement"] == m1                 # v1 again: same bytes, same MEASUREMENT
    assert len({m1, steps[2]["facts"]["measurement"], steps[5]["facts"]["measurement"]}) == 3
    assert [steps[i]["facts"]["by"] for i in (0, 2, 5, 7)] == ["guest", "host", "guest", "guest"]
    assert steps[1]["facts"]["token_status"] in ("affirming", "warning")
    assert steps[2]["facts"]["variant"] == "PolicyDeny"
    assert "firmware.measurement" in steps[2]["facts"]["reason"]     # the failed check, by name
    same, new = steps[3]["facts"]["reasons"]
    assert "already used" in same and "nonce" in new
    assert steps[3]["facts"]["old_nonce"] != steps[3]["facts"]["new_nonce"]
    assert steps[4]["facts"]["commit"]
    assert steps[5]["facts"]["sent_addon"] is True and steps[1]["facts"]["sent_addon"] is False
    # 7: the neighbour's look-alike VM is denied by name; the owner's own signed launch is released
    assert steps[6]["facts"]["variant"] == "PolicyDeny" and "id_block.trusted_key" in steps[6]["facts"]["reason"]
    assert "firmware.measurement" not in steps[6]["facts"]["reason"]     # same firmware, same shape
    assert steps[6]["facts"]["owner_outcome"] == "released"
    assert steps[7]["facts"]["variant"] == "PolicyDeny" and "firmware.min_svn" in steps[7]["facts"]["reason"]
    # 9-11: a publisher's fix. The same build signed by an untrusted key is denied, the endorsed one released
    # with no commit to the owner's policy, a revoked build denied by name.
    assert "no trusted publisher" in steps[8]["facts"]["reason"]
    assert steps[9]["facts"]["policy_unchanged"] is True and steps[9]["facts"]["sent_addon"] is True
    assert "demo-revoked" in steps[10]["facts"]["reason"] and "revoked" in steps[10]["facts"]["reason"]


def test_demo_without_qemu(firmware_dir: Path, tmp_path: Path) -> None:
    result = run_demo(str(firmware_dir / FW), str(tmp_path / "ws"), quiet=True, use_qemu=False)
    _check_story(result)
    assert result["qemu"] is False and any("boots were skipped" in n for n in result["notes"])
    assert all(s["facts"]["launched"] is False for s in result["steps"] if "launched" in s["facts"])
    assert (tmp_path / "ws" / "policy-repo" / ".git").is_dir()   # --workdir keeps the workspace


def test_demo_reports_a_step_that_did_not_do_what_it_should(firmware_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """If the "unlisted" image were the listed one, step 3 would be released: the demo must say so and fail."""
    real = sim.demo.derive
    monkeypatch.setattr(sim.demo, "derive", lambda image, marker: image if marker == b"tampered-by-host"
                        else real(image, marker))
    result = run_demo(str(firmware_dir / FW), str(tmp_path / "ws"), quiet=True, use_qemu=False)
    assert result["ok"] is False
    step3 = result["steps"][2]
    assert step3["outcome"] != "denied" and step3["ok"] is False


def test_demo_refuses_firmware_without_sev_metadata(firmware_dir: Path) -> None:
    with pytest.raises(UsageError, match="SEV metadata"):
        run_demo(str(firmware_dir / "edk2-2022.11-OVMF_CODE_4M-no-sev-metadata.fd"), quiet=True, use_qemu=False)


def test_demo_cli_json(firmware_dir: Path, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("firmgate")
    r = subprocess.run([str(exe), "demo", "--json", "--no-qemu", "--firmware", str(firmware_dir / FW)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    _check_story(json.loads(r.stdout))
    assert "Traceback" not in r.stderr


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed")
def test_demo_boots_each_firmware_under_qemu(firmware_dir: Path, tmp_path: Path) -> None:
    # firmware-only boots (seconds each); the real guest's loop (minutes under TCG) is test_guest_real_vm.py
    result = run_demo(str(firmware_dir / FW), str(tmp_path / "ws"), quiet=True, real_guest=False)
    assert result["real_guest"] is False
    _check_story(result)
    installs = [s for s in result["steps"] if "launched" in s["facts"]]
    # Step 10 installs the same firmware bytes step 9 installed (only the .corim section differs):
    # host-install finds them in force and does not relaunch.
    booted = [s for s in installs if s["n"] != 10]
    assert len(installs) == 7 and all(s["facts"]["launched"] is True for s in booted)
    assert all(s["facts"]["boot_seconds"] > 0 for s in booted)
