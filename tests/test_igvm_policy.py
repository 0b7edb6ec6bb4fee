"""A policy lists IGVM firmware like OVMF: checked at load, measured into the
reference table for the shape the file fixes, identified in the verdict; and an
add-on carrying IGVM is accepted by the table only when the policy allows it."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import FIRMWARE_DIR

from sim.platform import SimPlatform
from verifier.appraise.appraise import appraise
from verifier.appraise.store import PolicyStore
from verifier.errors import PolicyErrors
from verifier.evidence import load_evidence
from verifier.firmware.addon import build_addon
from verifier.measure.igvm import measure_igvm
from verifier.measure.launch import Shape
from verifier.measure.ovmf_igvm import igvm_from_ovmf
from verifier.options import default_options
from verifier.verify import verify_report

OVMF = FIRMWARE_DIR / "edk2-2026.08-OVMF.amdsev.fd"


def _policy(fid: str, digest: str, location: str) -> str:
    return ("version = 1\n[firmware]\n"
            f'[[firmware.allowed]]\nid = "{fid}"\nsha384 = "{digest}"\nsvn = 3\nbytes = "{location}"\n'
            '[[shapes]]\nvcpus = [1, 2, 4]\nvcpu_types = ["EPYC-v4", "EPYC-Milan"]\n'
            "[platform]\nallow_simulated_platform = true\n")


@pytest.fixture(scope="module")
def sim() -> SimPlatform:
    return SimPlatform("Milan")   # one simulated chain per module: its RSA keys take seconds


@pytest.fixture(scope="module")
def igvm_bytes() -> bytes:
    return igvm_from_ovmf(OVMF.read_bytes(), Shape(2, "EPYC-Milan"))


def test_policy_lists_igvm_and_the_verdict_names_it(tmp_path: Path, igvm_bytes: bytes, sim: SimPlatform) -> None:
    d = tmp_path / "p"
    (d / "fw").mkdir(parents=True)
    (d / "fw" / "svsm.igvm").write_bytes(igvm_bytes)
    (d / "acme.toml").write_text(_policy("coconut-1", hashlib.sha384(igvm_bytes).hexdigest(), "fw/svsm.igvm"))
    lp = PolicyStore(d, min_interval=0).get("acme")
    entries = lp.table.entries()
    assert [(m.firmware.id, m.shape.key()) for _, m in entries] == [
        ("coconut-1", "vcpus=2,vcpu_type=EPYC-Milan,vmm=qemu,guest_features=0x1")]
    digest = measure_igvm(igvm_bytes).digest   # the qemu rule: what a QEMU IGVM launch reports
    assert entries[0][0] == digest
    report = sim.sign_report(measurement=digest)
    verified = verify_report(load_evidence(report),
                             default_options(trust_root=sim.ark, certs=(sim.leaf, sim.intermediate)))
    verdict = appraise(verified, lp)
    assert verdict.accepted and verdict.facts["firmware"]["id"] == "coconut-1"


def test_policy_refuses_an_igvm_without_snp(tmp_path: Path) -> None:
    from verifier.firmware.igvm import PLATFORM_TDX
    from verifier.firmware.igvm_build import IgvmWriter
    tdx = IgvmWriter().platform(mask=0x1, platform_type=PLATFORM_TDX).guest_policy(0, 0x1).page(0x1000).to_bytes()
    d = tmp_path / "p"
    d.mkdir()
    (d / "fw.igvm").write_bytes(tdx)
    (d / "acme.toml").write_text(_policy("tdx", hashlib.sha384(tdx).hexdigest(), "fw.igvm"))
    with pytest.raises(PolicyErrors, match="cannot be an SEV-SNP firmware: IGVM platform headers: no SEV_SNP"):
        PolicyStore(d, min_interval=0).get("acme")


def test_uploaded_igvm_addon_enters_the_table(tmp_path: Path, igvm_bytes: bytes) -> None:
    d = tmp_path / "p"
    d.mkdir()
    (d / "acme.toml").write_text(_policy("coconut-1", hashlib.sha384(igvm_bytes).hexdigest(), "uploaded"))
    lp = PolicyStore(d, min_interval=0).get("acme")
    assert len(lp.table) == 0
    fw = lp.table.add_firmware_bytes(bytes(build_addon([("coconut-1", igvm_bytes)])), "coconut-1")
    assert fw.id == "coconut-1" and lp.table.lookup(measure_igvm(igvm_bytes).digest) is not None


def test_policy_whose_shapes_the_igvm_cannot_take_is_refused(tmp_path: Path, igvm_bytes: bytes) -> None:
    d = tmp_path / "p"
    d.mkdir()
    (d / "fw.igvm").write_bytes(igvm_bytes)
    text = _policy("coconut-1", hashlib.sha384(igvm_bytes).hexdigest(), "fw.igvm").replace("[1, 2, 4]", "[1, 4]")
    (d / "acme.toml").write_text(text)
    with pytest.raises(PolicyErrors, match="IGVM firmware launches only as vcpus=2, vmm=qemu.*none of the 4 shapes"):
        PolicyStore(d, min_interval=0).get("acme")


def test_verify_cli_with_the_vms_igvm_addon(tmp_path: Path, igvm_bytes: bytes, sim: SimPlatform,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`firmgate verify --policy --firmware ADDON`: the VM's IGVM add-on (uploaded in the policy) is measured
    and the sim report of a QEMU IGVM launch is accepted; the native-zero digest of the same file is not."""
    import json

    from verifier.cli import main
    (tmp_path / "acme.toml").write_text(_policy("coconut-1", hashlib.sha384(igvm_bytes).hexdigest(), "uploaded"))
    addon = tmp_path / "fw.efi"
    addon.write_bytes(bytes(build_addon([("coconut-1", igvm_bytes)])))
    (tmp_path / "chain.pem").write_bytes(sim.chain_pem())
    (tmp_path / "root.pem").write_bytes(sim.root_pem())
    for rule, accepted in (("qemu", True), ("native-zero", False)):
        (tmp_path / "report.bin").write_bytes(sim.sign_report(measurement=measure_igvm(igvm_bytes, rule).digest))
        code = main(["verify", str(tmp_path / "report.bin"), "--certs", str(tmp_path / "chain.pem"), "--offline",
                     "--trust-root", str(tmp_path / "root.pem"), "--policy", str(tmp_path / "acme.toml"),
                     "--tenant", "acme", "--firmware", str(addon), "--json"])
        out = json.loads(capsys.readouterr().out)
        assert (code == 0) is accepted and out["accepted"] is accepted, rule
        if accepted:
            assert out["facts"]["firmware"]["id"] == "coconut-1"
