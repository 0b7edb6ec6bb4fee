"""The operator's commands: init, progress lines, a stop that does not wait for a firmware-only guest,
rollback's report."""
from __future__ import annotations

import io
import time
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from host_install import cli, progress, qemu
from host_install.init_vm import COMMENTS
from host_install.journal import Journal
from host_install.vm import VmConfig, VmDir, parse_config
from verifier.firmware.addon import build_addon
from vms.hostvm import FW_2025, FW_2026, make_vm, needs_qemu, stop_quietly


def test_init_writes_a_commented_vm_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "vms" / "a"
    rc = cli.main(["init", "--vm", str(d), "--snp", "--vcpus", "4", "--memory", "4096", "--cpu", "EPYC",
                   "--update-port", "--extra-arg=-drive", "--extra-arg=file=disk.qcow2,if=virtio"])
    assert rc == 0 and "CREATED" in capsys.readouterr().out
    text = (d / "vm.toml").read_text()
    assert tomllib.loads(text) == {"snp": True, "vcpus": 4, "memory_mib": 4096, "cpu": "EPYC", "update_port": True,
                                   "extra_args": ["-drive", "file=disk.qcow2,if=virtio"]}
    cfg = VmDir.open(d).config
    assert (cfg.vcpus, cfg.memory_mib, cfg.snp, cfg.stop_timeout) == (4, 4096, True, 30.0)
    # every key is there, documented; uncommenting a default line keeps the file valid
    for f in fields(VmConfig):
        assert f"# {COMMENTS[f.name]}\n" in text
    uncommented = "\n".join(line[2:] if line.startswith("# stop_timeout =") else line for line in text.splitlines())
    assert parse_config(uncommented).stop_timeout == 30.0


def test_init_never_overwrites_and_checks_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "a"
    assert cli.main(["init", "--vm", str(d)]) == 0
    before = (d / "vm.toml").read_bytes()
    assert cli.main(["init", "--vm", str(d), "--vcpus", "2"]) == 2
    assert "already holds a vm.toml" in capsys.readouterr().err
    assert (d / "vm.toml").read_bytes() == before
    assert cli.main(["init", "--vm", str(tmp_path / "b"), "--vcpus", "0"]) == 2
    assert "vcpus 0 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_open_hint_names_the_init_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "--vm", str(tmp_path / "nope")]) == 2
    assert "host-install init --vm DIR" in capsys.readouterr().err


@pytest.mark.parametrize(("mode", "extra", "expected"), [
    ("auto", [], False),                                              # firmware alone: quit at once
    ("auto", ["-drive", "file=d.qcow2,if=virtio"], True),
    ("auto", ["-device", "virtio-blk-pci,drive=d0", "-blockdev", "x"], True),
    ("auto", ["-device", "virtio-rng-pci"], False),
    ("auto", ["-kernel", "vmlinuz"], True),
    ("never", ["-drive", "file=d.qcow2"], False),
    ("always", [], True),
])
def test_power_down_only_when_an_os_can_answer(tmp_path: Path, mode: str, extra: list[str], expected: bool) -> None:
    vm = VmDir.create(tmp_path / "vm", acpi_shutdown=mode, extra_args=extra)
    assert qemu.can_power_down(vm) is expected


def test_a_direct_kernel_boot_can_power_down(tmp_path: Path) -> None:
    assert qemu.can_power_down(VmDir.create(tmp_path / "vm", kernel="vmlinuz", append="console=ttyS0"))


def test_acpi_shutdown_is_checked(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="acpi_shutdown must be one of"):
        parse_config('acpi_shutdown = "sometimes"\n')


def test_progress_says_nothing_for_fast_steps_and_times_slow_ones() -> None:
    out = io.StringIO()
    progress.enable(out)
    try:
        with progress.step("quick"):
            pass
        with progress.step("slow", after=0.05) as s:
            time.sleep(0.3)
            s.outcome = "quit"
        with pytest.raises(RuntimeError), progress.step("broken", after=0.05):
            time.sleep(0.3)
            raise RuntimeError("x")
    finally:
        progress.disable()
    lines = out.getvalue().splitlines()
    assert lines[0] == "host-install: slow ..."
    assert lines[1].startswith("host-install: slow: quit (0.")
    assert lines[2:4] == ["host-install: broken ...", lines[3]] and "broken: failed" in lines[3]
    assert len(lines) == 4
    with progress.step("silent when disabled", after=0.0):
        time.sleep(0.05)
    assert len(out.getvalue().splitlines()) == 4


def test_rollback_reports_a_rollback(tmp_path: Path, firmware_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vm = VmDir.create(tmp_path / "vm", snp=True, launch_mode="plain")
    for name in (FW_2025, FW_2026):
        addon = tmp_path / f"{name}.efi"
        addon.write_bytes(build_addon([(name, (firmware_dir / name).read_bytes())]))
        assert cli.main(["install", "--vm", str(vm.path), "--addon", str(addon), "--no-launch"]) == 0
    capsys.readouterr()
    assert cli.main(["rollback", "--vm", str(vm.path), "--no-launch"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ROLLED BACK: {vm.path} firmware '{FW_2025}'") and "INSTALLED" not in out


@pytest.mark.qemu
@pytest.mark.slow
@needs_qemu
def test_a_firmware_only_vm_is_not_given_the_acpi_timeout(tmp_path: Path, firmware_dir: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    vm = make_vm(tmp_path / "vm", firmware_dir, stop_timeout=60.0)  # no disk: OVMF alone ignores power-down
    try:
        for name in (FW_2025, FW_2026):
            addon = tmp_path / f"{name}.efi"
            addon.write_bytes(build_addon([(name, (firmware_dir / name).read_bytes())]))
            assert cli.main(["install", "--vm", str(vm.path), "--addon", str(addon)]) == 0
        assert "ACPI power-down" not in capsys.readouterr().err
        stops = [r["how"] for r in Journal(vm.journal_path).records() if r["event"] == "stopped"]
        assert stops == ["not-running", "quit"]  # the second install quit the first firmware at once
        start = time.monotonic()
        assert qemu.stop(vm) == "quit" and time.monotonic() - start < 10
    finally:
        progress.disable()
        stop_quietly(vm)
