"""Bad input exits 2 with one line and a hint, and changes nothing (issue 6, item 5). No QEMU needed."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from host_install import cli
from host_install.install import current_firmware, install, rollback, status
from host_install.errors import AddonRejected, ImageRejected, InstallError, InstallFailed
from host_install.vm import VmDir
from verifier import cli as firmgate_cli
from verifier.firmware.addon import build_addon

FW_2025 = "edk2-2025.02-OVMF.fd"
FW_2026 = "edk2-2026.08-OVMF.amdsev.fd"
FW_NOSEV = "edk2-2022.11-OVMF_CODE_4M-no-sev-metadata.fd"


@pytest.fixture()
def vm(tmp_path: Path) -> VmDir:
    return VmDir.create(tmp_path / "vm", memory_mib=256, accel="tcg", snp=True, launch_mode="plain",
                        rom_max_bytes=8 * 1024 * 1024)


def _addon(tmp_path: Path, firmware_dir: Path, *names: str, fwid: str | None = None) -> Path:
    entries = [(fwid or n, (firmware_dir / n).read_bytes()) for n in names]
    out = tmp_path / "addon.efi"
    out.write_bytes(build_addon(entries))
    return out


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = cli.main(list(argv))
    err = capsys.readouterr().err
    return rc, err


def _unchanged(vm: VmDir) -> None:
    assert not vm.journal_path.exists() or vm.journal_path.read_bytes() == b""
    assert list(vm.store_dir.iterdir()) == []
    assert not vm.firmware_link.is_symlink()


def test_missing_vm_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _run(capsys, "install", "--vm", str(tmp_path / "nope"), "--addon", str(tmp_path / "a.efi"))
    assert rc == 2
    assert err.startswith("error: VM directory") and "does not exist" in err and "(hint:" in err
    assert err.count("\n") == 1


def test_broken_vm_toml_reports_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "vm"
    d.mkdir()
    (d / "vm.toml").write_text('memory_mib = 256\nvcpus = "two"\n')
    rc, err = _run(capsys, "status", "--vm", str(d))
    assert rc == 2
    assert f"{d / 'vm.toml'}:2: vcpus must be an integer" in err


def test_addon_without_efifw(vm: VmDir, tmp_path: Path, firmware_dir: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    data = bytearray(build_addon([("x", (firmware_dir / FW_2026).read_bytes())]))
    i = data.find(b".efifw\0\0")
    assert i > 0
    data[i:i + 8] = b".rdata\0\0"  # same PE, the firmware section renamed away
    p = tmp_path / "noefifw.efi"
    p.write_bytes(bytes(data))
    rc, err = _run(capsys, "install", "--vm", str(vm.path), "--addon", str(p))
    assert rc == 2
    assert "no .efifw section" in err and "hint:" in err
    _unchanged(vm)


def test_addon_that_is_not_pe(vm: VmDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "junk.efi"
    p.write_bytes(b"MZ" + b"\0" * 100)
    rc, err = _run(capsys, "install", "--vm", str(vm.path), "--addon", str(p))
    assert rc == 2 and "add-on rejected" in err
    _unchanged(vm)


def test_missing_addon_file(vm: VmDir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _run(capsys, "install", "--vm", str(vm.path), "--addon", str(tmp_path / "none.efi"))
    assert rc == 2 and "does not exist" in err


def test_unknown_fwid(vm: VmDir, tmp_path: Path, firmware_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _addon(tmp_path, firmware_dir, FW_2026, fwid="edk2-2026.08")
    rc, err = _run(capsys, "install", "--vm", str(vm.path), "--addon", str(p), "--fwid", "edk2-1999")
    assert rc == 2
    assert "no firmware with fwid 'edk2-1999'" in err and "edk2-2026.08" in err
    _unchanged(vm)


def test_several_fwids_need_a_choice(vm: VmDir, tmp_path: Path, firmware_dir: Path) -> None:
    addon = build_addon([("a", (firmware_dir / FW_2025).read_bytes()), ("b", (firmware_dir / FW_2026).read_bytes())])
    with pytest.raises(AddonRejected, match="choose one with --fwid") as e:
        install(vm, addon, launch=False)
    assert "a, b" in e.value.hint
    res = install(vm, addon, "b", launch=False)
    assert res.fwid == "b" and current_firmware(vm).data == (firmware_dir / FW_2026).read_bytes()


def test_oversized_image(tmp_path: Path, firmware_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    small = VmDir.create(tmp_path / "small", rom_max_bytes=2 * 1024 * 1024)
    p = _addon(tmp_path, firmware_dir, FW_2026)
    rc, err = _run(capsys, "install", "--vm", str(small.path), "--addon", str(p), "--no-launch")
    assert rc == 2
    assert "4194304 bytes, above this VM's ROM limit of 2097152" in err
    _unchanged(small)


def test_non_snp_image_for_snp_vm(vm: VmDir, tmp_path: Path, firmware_dir: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    p = _addon(tmp_path, firmware_dir, FW_NOSEV)
    rc, err = _run(capsys, "install", "--vm", str(vm.path), "--addon", str(p), "--no-launch")
    assert rc == 2
    assert "cannot launch an SNP guest" in err and "SEV metadata" in err
    _unchanged(vm)


def test_unaligned_image_for_plain_vm(tmp_path: Path, firmware_dir: Path) -> None:
    plain = VmDir.create(tmp_path / "plain")
    addon = build_addon([("code-only", (firmware_dir / FW_NOSEV).read_bytes())])
    with pytest.raises(ImageRejected, match="not a multiple of 64 KiB") as e:
        install(plain, addon, launch=False)
    assert e.value.exit_code == 2 and e.value.hint


def test_snp_vm_accepts_real_sev_images_without_launch(vm: VmDir, firmware_dir: Path) -> None:
    for name in (FW_2025, FW_2026):
        data = (firmware_dir / name).read_bytes()
        res = install(vm, build_addon([(name, data)]), launch=False)
        assert res.status == "installed" and not res.launched
        cur = current_firmware(vm)
        assert (cur.fwid, cur.data) == (name, data)
        assert vm.firmware_link.read_bytes() == data
    again = install(vm, build_addon([(FW_2026, (firmware_dir / FW_2026).read_bytes())]), launch=False)
    assert again.status == "unchanged"
    back = rollback(vm, launch=False)
    assert back.fwid == FW_2025 and current_firmware(vm).fwid == FW_2025
    st = status(vm)
    assert st["consistent"] and st["in_force"]["fwid"] == FW_2025 and st["previous"]["fwid"] == FW_2026
    assert st["qemu"]["pid"] is None


def test_rollback_without_history_fails(vm: VmDir) -> None:
    with pytest.raises(InstallFailed, match="no previous firmware"):
        rollback(vm, launch=False)
    with pytest.raises(InstallError, match="no firmware installed"):
        current_firmware(vm)


def test_firmgate_entry_point_runs_the_same_command(vm: VmDir, tmp_path: Path, firmware_dir: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    p = _addon(tmp_path, firmware_dir, FW_2026, fwid="edk2-2026.08")
    rc = firmgate_cli.main(["host-install", "install", "--vm", str(vm.path), "--addon", str(p),
                            "--no-launch", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    res = json.loads(out)
    assert res["status"] == "installed" and res["fwid"] == "edk2-2026.08" and res["launched"] is False
    rc = firmgate_cli.main(["host-install", "status", "--vm", str(vm.path), "--json"])
    st = json.loads(capsys.readouterr().out)
    assert rc == 0 and st["in_force"]["digest"] == res["in_force"] and st["in_force"]["intact"] is True
    rc = firmgate_cli.main(["host-install", "install", "--vm", str(tmp_path / "missing"), "--addon", str(p)])
    assert rc == 2


def _igvm() -> bytes:
    # A small valid SEV-SNP IGVM file (tests/igvm_files.py): platform, policy, one page, one VMSA
    from tests.igvm_files import minimal_snp_igvm
    return minimal_snp_igvm()


def test_snp_vm_refuses_an_igvm_that_does_not_parse(tmp_path: Path) -> None:
    igvm_vm = VmDir.create(tmp_path / "igvm", snp=True, firmware_format="igvm")
    fake = b"IGVM" + (1).to_bytes(4, "little") + bytes(64 * 1024 - 8)
    with pytest.raises(ImageRejected, match="cannot launch an SNP guest: IGVM fixed header"):
        install(igvm_vm, build_addon([("igvm-fw", fake)]), launch=False)


def test_igvm_only_for_igvm_vms(tmp_path: Path, firmware_dir: Path) -> None:
    ovmf_vm = VmDir.create(tmp_path / "ovmf", snp=True)
    with pytest.raises(ImageRejected, match="is igvm, but this VM launches ovmf"):
        install(ovmf_vm, build_addon([("igvm-fw", _igvm())]), launch=False)
    igvm_vm = VmDir.create(tmp_path / "igvm", snp=True, firmware_format="igvm")
    with pytest.raises(ImageRejected, match="is ovmf, but this VM launches igvm"):
        install(igvm_vm, build_addon([("ovmf", (firmware_dir / FW_2026).read_bytes())]), launch=False)
    res = install(igvm_vm, build_addon([("igvm-fw", _igvm())]), launch=False)
    assert res.status == "installed" and current_firmware(igvm_vm).data == _igvm()


def test_dry_run_checks_and_changes_nothing(vm: VmDir, tmp_path: Path, firmware_dir: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    p = _addon(tmp_path, firmware_dir, FW_2026, fwid="edk2-2026.08")
    rc = cli.main(["install", "--vm", str(vm.path), "--addon", str(p), "--dry-run", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["fwid"] == "edk2-2026.08" and out["kind"] == "ovmf" and out["size"] == 4 * 1024 * 1024
    assert out["steps"] == ["begin", "stored", "stopped", "switched", "launched", "confirmed", "committed"]
    _unchanged(vm)
    bad = _addon(tmp_path, firmware_dir, FW_NOSEV)
    assert cli.main(["install", "--vm", str(vm.path), "--addon", str(bad), "--dry-run"]) == 2
    _unchanged(vm)


def test_status_and_recover_text_output(vm: VmDir, tmp_path: Path, firmware_dir: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "--vm", str(vm.path)]) == 0
    assert "in force:  none" in capsys.readouterr().out
    p = _addon(tmp_path, firmware_dir, FW_2026, fwid="edk2-2026.08")
    assert cli.main(["install", "--vm", str(vm.path), "--addon", str(p), "--no-launch"]) == 0
    capsys.readouterr()
    # someone re-pointed the link by hand: the journal wins, recover restores it
    vm.firmware_link.unlink()
    assert cli.main(["status", "--vm", str(vm.path)]) == 0
    assert "INCONSISTENT" in capsys.readouterr().out
    assert cli.main(["recover", "--vm", str(vm.path), "--no-launch"]) == 0
    assert "RECOVERED" in capsys.readouterr().out
    assert cli.main(["status", "--vm", str(vm.path)]) == 0
    out = capsys.readouterr().out
    assert "'edk2-2026.08'" in out and "INCONSISTENT" not in out and "qemu:      not running" in out


def test_stale_pid_file_is_not_our_vm(vm: VmDir) -> None:
    from host_install import qemu
    vm.pid_path.write_text(f"{os.getpid()}\n")  # a live process that is not this VM's QEMU
    assert qemu.running_pid(vm) is None
    assert qemu.stop(vm) == "not-running"
