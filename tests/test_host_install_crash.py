"""SIGKILL host-install at each step of an install, then `recover`: exactly one complete
firmware is in force and the journal says which (issue 6, "Done when", second item).

The installer runs as a real process; FIRMGATE_UNSAFE_TEST_PAUSE_AT makes it stop at a
named checkpoint (after that step's journal record, or between a temporary file and its
rename), and the test kills it there with SIGKILL, so no cleanup code runs.
"""
from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from host_install import qemu
from host_install.errors import VmBusy
from host_install.install import PAUSE_ENV, current_firmware, install, recover, status
from host_install.journal import TERMINAL, Journal
from host_install.store import Store, link_target, sha384
from host_install.vm import VmDir
from verifier.firmware.addon import build_addon
from vms.hostvm import FW_2025, FW_2026, PROBE_BYTES, broken_image, make_vm, needs_qemu, rom_tail, stop_quietly

REPO = Path(__file__).resolve().parent.parent


def _spawn_and_kill(vm: VmDir, addon: Path, step: str, *extra: str, timeout: float = 180.0) -> None:
    env = {**os.environ, PAUSE_ENV: step, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "host_install.cli", "install", "--vm", str(vm.path),
                             "--addon", str(addon), *extra], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + timeout
    try:
        while b"paused at " + step.encode() not in seen:
            left = deadline - time.monotonic()
            assert left > 0 and proc.poll() is None, f"never reached {step}: rc={proc.poll()} {seen!r}"
            ready, _, _ = select.select([proc.stderr], [], [], left)
            if ready:
                seen += os.read(proc.stderr.fileno(), 4096)
    finally:
        proc.kill()  # SIGKILL
        proc.wait(10)
        proc.stderr.close()
    assert proc.returncode == -9


def _assert_one_firmware(vm: VmDir, digest: str, fwid: str) -> None:
    journal = Journal(vm.journal_path)
    assert journal.open_transaction() == []
    last = journal.records()[-1]
    assert last["event"] in TERMINAL and last["in_force"] == digest and last["fwid"] == fwid
    assert link_target(vm.firmware_link) == digest
    assert sha384(vm.firmware_link.read_bytes()) == digest
    assert Store(vm.store_dir).verify(digest)
    assert not [p for p in vm.store_dir.iterdir() if p.name.startswith(".tmp-")]
    assert not list(vm.path.glob(".firmware.tmp-*"))
    cur = current_firmware(vm)
    assert (cur.digest, cur.fwid) == (digest, fwid)
    st = status(vm)
    assert st["consistent"] and st["interrupted"] is None


@pytest.fixture()
def addons(tmp_path: Path, firmware_dir: Path) -> dict[str, Path]:
    out = {}
    # old = 2026.08 (reaches BDS fastest under TCG: most relaunches are of the old one)
    for key, fwid, data in (("old", "edk2-2026.08", (firmware_dir / FW_2026).read_bytes()),
                            ("new", "edk2-2025.02", (firmware_dir / FW_2025).read_bytes()),
                            ("bad", "edk2-2026.08-broken", broken_image(firmware_dir))):
        p = tmp_path / f"{key}.efi"
        p.write_bytes(build_addon([(fwid, data)]))
        out[key] = p
    return out




# -- without QEMU: the store and link steps -------------------------------------------------
@pytest.mark.parametrize("step, finishes", [
    ("begin", False), ("store.tmp-written", False), ("stored", False), ("link.tmp-created", False),
    ("switched", True),  # without a relaunch nothing is left to confirm: recover finishes it
])
def test_kill_at_each_step_then_recover_no_launch(tmp_path: Path, firmware_dir: Path, addons: dict[str, Path],
                                                  step: str, finishes: bool) -> None:
    vm = VmDir.create(tmp_path / "vm", snp=True)
    old = install(vm, addons["old"].read_bytes(), launch=False)
    new_digest = sha384((firmware_dir / FW_2025).read_bytes())
    _spawn_and_kill(vm, addons["new"], step, "--no-launch")
    assert status(vm)["interrupted"] is not None
    res = recover(vm, relaunch=False)
    assert res.status == "recovered"
    if finishes:
        _assert_one_firmware(vm, new_digest, "edk2-2025.02")
    else:
        _assert_one_firmware(vm, old.in_force or "", "edk2-2026.08")
    assert recover(vm, relaunch=False).status == "unchanged"  # idempotent
    # the lock died with the process: the next install runs
    assert install(vm, addons["new"].read_bytes(), launch=False).in_force == new_digest


def test_lock_held_by_a_running_install(tmp_path: Path, addons: dict[str, Path]) -> None:
    vm = VmDir.create(tmp_path / "vm", snp=True)
    env = {**os.environ, PAUSE_ENV: "stored", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "host_install.cli", "install", "--vm", str(vm.path),
                             "--addon", str(addons["old"]), "--no-launch"], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        assert b"paused at stored" in proc.stderr.readline()
        with pytest.raises(VmBusy, match="another host-install") as e:
            install(vm, addons["new"].read_bytes(), launch=False)
        assert e.value.exit_code == 1 and e.value.hint
    finally:
        proc.kill()
        proc.wait(10)
        proc.stderr.close()  # type: ignore[union-attr]


def test_kill_during_first_install(tmp_path: Path, firmware_dir: Path, addons: dict[str, Path]) -> None:
    """No previous firmware: a complete stored image is finished; a half-written one leaves none."""
    vm = VmDir.create(tmp_path / "a", snp=True)
    _spawn_and_kill(vm, addons["new"], "stored", "--no-launch")
    recover(vm, relaunch=False)
    _assert_one_firmware(vm, sha384((firmware_dir / FW_2025).read_bytes()), "edk2-2025.02")
    vm2 = VmDir.create(tmp_path / "b", snp=True)
    _spawn_and_kill(vm2, addons["new"], "store.tmp-written", "--no-launch")
    recover(vm2, relaunch=False)
    last = Journal(vm2.journal_path).records()[-1]
    assert last["event"] == "recovered" and last["in_force"] is None
    assert link_target(vm2.firmware_link) is None and Store(vm2.store_dir).digests() == []


# -- with QEMU: stop, switch, launch, confirm, and a failed boot's rollback -------------------
@pytest.fixture()
def qemu_vm(tmp_path: Path, firmware_dir: Path, addons: dict[str, Path]) -> Iterator[VmDir]:
    """The old firmware in force; the VM itself is started only by the tests that need it running."""
    vm = make_vm(tmp_path / "vm", firmware_dir)
    try:
        install(vm, addons["old"].read_bytes(), launch=False)
        yield vm
    finally:
        stop_quietly(vm)


@pytest.mark.qemu
@needs_qemu
@pytest.mark.parametrize("step, addon, finishes", [
    ("stopped", "new", False), ("launched", "new", False),
    ("confirmed", "new", True), ("boot-failed", "bad", False), ("rollback-switched", "bad", False),
])
def test_kill_at_each_step_then_recover_with_qemu(qemu_vm: VmDir, tmp_path: Path, firmware_dir: Path,
                                                  addons: dict[str, Path], step: str, addon: str,
                                                  finishes: bool) -> None:
    vm = qemu_vm
    if step == "stopped":  # killed right after it stopped a running VM
        qemu.launch(vm)
        assert qemu.confirm_boot(vm).ok
    _spawn_and_kill(vm, addons[addon], step)
    res = recover(vm)
    fw25, fw26 = (firmware_dir / FW_2025).read_bytes(), (firmware_dir / FW_2026).read_bytes()
    if finishes:
        _assert_one_firmware(vm, sha384(fw25), "edk2-2025.02")
        assert not res.launched  # the confirmed VM kept running
        expect = fw25
    else:
        _assert_one_firmware(vm, sha384(fw26), "edk2-2026.08")
        assert res.launched, res.reason  # the old firmware was relaunched and confirmed
        expect = fw26
    assert qemu.query_status(vm) == "running"
    assert rom_tail(vm, tmp_path) == expect[-PROBE_BYTES:]


def test_recover_refuses_a_corrupted_old_image(tmp_path: Path, addons: dict[str, Path]) -> None:
    """Undo needs the old image intact; if its store file was damaged, recovery says so (exit 1)."""
    from host_install.errors import RecoveryNeeded

    vm = VmDir.create(tmp_path / "vm", snp=True)
    old = install(vm, addons["old"].read_bytes(), launch=False)
    _spawn_and_kill(vm, addons["new"], "stored", "--no-launch")
    path = Store(vm.store_dir).path_of(old.in_force or "")
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01")
    with pytest.raises(RecoveryNeeded, match="not intact in the store") as e:
        recover(vm, relaunch=False)
    assert e.value.exit_code == 1 and e.value.hint
    assert status(vm)["interrupted"] is not None  # still open: nothing pretended to be fixed
