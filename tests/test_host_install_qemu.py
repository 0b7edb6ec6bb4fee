"""host-install against a real qemu-system-x86_64 (KVM when it works here, TCG otherwise).

The VMs run OVMF as a plain x86 guest (no SNP hardware here); vm.toml still says
snp = true, so every image must carry SEV metadata. A boot is confirmed by QMP
"running" plus the firmware's own output; which ROM runs is read back over QMP.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from host_install import cli, qemu
from host_install.errors import RecoveryNeeded
from host_install.install import current_firmware, install, status
from host_install.journal import Journal
from host_install.vm import VmDir
from verifier.firmware.addon import build_addon
from vms.hostvm import FW_2025, FW_2026, PROBE_BYTES, broken_image, make_vm, needs_qemu, rom_tail, stop_quietly

pytestmark = [pytest.mark.qemu, needs_qemu]


@pytest.fixture()
def vm(tmp_path: Path, firmware_dir: Path) -> Iterator[VmDir]:
    v = make_vm(tmp_path / "vm", firmware_dir)
    yield v
    stop_quietly(v)


def _running_rom_is(vm: VmDir, image: bytes, tmp: Path) -> None:
    pid = qemu.running_pid(vm)
    assert pid is not None
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert str(vm.firmware_link).encode() in cmdline
    assert qemu.query_status(vm) == "running"
    assert rom_tail(vm, tmp) == image[-PROBE_BYTES:]


def test_install_relaunch_and_automatic_rollback(vm: VmDir, tmp_path: Path, firmware_dir: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    fw25, fw26 = (firmware_dir / FW_2025).read_bytes(), (firmware_dir / FW_2026).read_bytes()
    assert fw25[-PROBE_BYTES:] != fw26[-PROBE_BYTES:]  # the read-back can tell them apart

    # 1. first install: QEMU runs the 2025.02 ROM and the firmware printed its output
    r1 = install(vm, build_addon([("edk2-2025.02", fw25)]))
    assert r1.status == "installed" and r1.launched and r1.previous is None
    _running_rom_is(vm, fw25, tmp_path)
    assert b"BdsDxe" in vm.serial_log.read_bytes()
    pid1 = qemu.running_pid(vm)

    # 2. the 2026.08 image: a relaunch (new QEMU process) on the new ROM
    addon26 = tmp_path / "fw26.efi"
    addon26.write_bytes(build_addon([("edk2-2026.08", fw26)]))
    assert cli.main(["install", "--vm", str(vm.path), "--addon", str(addon26)]) == 0
    assert "INSTALLED" in capsys.readouterr().out
    pid2 = qemu.running_pid(vm)
    assert pid2 is not None and pid2 != pid1
    _running_rom_is(vm, fw26, tmp_path)
    assert current_firmware(vm).fwid == "edk2-2026.08"

    # 3. an image that passes every static check but cannot boot: rolled back, VM running 2026.08
    bad = tmp_path / "bad.efi"
    bad.write_bytes(build_addon([("edk2-2026.08-broken", broken_image(firmware_dir))]))
    rc = cli.main(["install", "--vm", str(vm.path), "--addon", str(bad)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "did not boot" in err and "rolled back to 'edk2-2026.08'" in err and "hint:" in err
    _running_rom_is(vm, fw26, tmp_path)
    cur = current_firmware(vm)
    assert cur.fwid == "edk2-2026.08" and cur.data == fw26
    events = [r["event"] for r in Journal(vm.journal_path).records()]
    assert events[-5:] == ["launched", "boot-failed", "switched", "launched", "rolled-back"]
    st = status(vm)
    assert st["consistent"] and st["qemu"]["status"] == "running"
    assert st["in_force"]["fwid"] == "edk2-2026.08"


def test_boot_timeout_rolls_back(tmp_path: Path, firmware_dir: Path) -> None:
    """No crash dump, no marker: the timeout alone triggers the rollback (and its relaunch
    fails too here, because the marker is never printed: RecoveryNeeded, old firmware in force)."""
    fw26 = (firmware_dir / FW_2026).read_bytes()
    vm = make_vm(tmp_path / "vm", firmware_dir, boot_marker="NEVER-PRINTED", boot_timeout=2.0)
    try:
        install(vm, build_addon([("edk2-2026.08", fw26)]), launch=False)
        with pytest.raises(RecoveryNeeded) as e:
            install(vm, build_addon([("edk2-2025.02", (firmware_dir / FW_2025).read_bytes())]))
        assert "not booted after 2s" in str(e.value)
        assert "did not come back either" in str(e.value)
        assert e.value.exit_code == 1
        assert current_firmware(vm).data == fw26
        assert status(vm)["consistent"]
    finally:
        stop_quietly(vm)


def test_guest_request_over_channel_relaunches(tmp_path: Path, firmware_dir: Path) -> None:
    """The guest side's request_update -> listener -> install with relaunch -> framed answer;
    the relaunched VM's virtio-serial update port connects back to the listener."""
    import socket
    import struct
    import threading

    from host_install.channel import Listener, request_update

    vm = make_vm(tmp_path / "vm", firmware_dir, update_port=True)
    fw26 = (firmware_dir / FW_2026).read_bytes()
    listener = Listener(vm)
    t = threading.Thread(target=listener.serve_one, daemon=True)
    t.start()
    try:
        answer = request_update(vm.channel_path, build_addon([("edk2-2026.08", fw26)]))
        t.join(60)
        assert answer["ok"] and answer["exit_code"] == 0 and answer["status"] == "installed"
        assert answer["result"]["launched"] is True and answer["result"]["boot_seconds"] > 0
        _running_rom_is(vm, fw26, tmp_path)
        # QEMU's chardev (org.firmgate.update) is a client of the listener socket
        listener.sock.settimeout(20)
        conn, _ = listener.sock.accept()
        with conn:
            pid, _uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        assert pid == qemu.running_pid(vm)
    finally:
        listener.close()
        stop_quietly(vm)


def test_first_install_that_cannot_boot_leaves_no_firmware(tmp_path: Path, firmware_dir: Path) -> None:
    from host_install.errors import BootFailed

    vm = make_vm(tmp_path / "vm", firmware_dir)
    try:
        with pytest.raises(BootFailed, match="there was no previous firmware") as e:
            install(vm, build_addon([("broken", broken_image(firmware_dir))]))
        assert e.value.exit_code == 1 and e.value.result is not None and e.value.result.in_force is None
        assert "crashed" in e.value.result.reason  # the edk2 exception dump, not the timeout
        assert qemu.running_pid(vm) is None and not vm.firmware_link.is_symlink()
        last = Journal(vm.journal_path).records()[-1]
        assert last["event"] == "aborted" and last["in_force"] is None
        assert status(vm)["consistent"]
    finally:
        stop_quietly(vm)


def test_operator_request_answered_while_qemus_chardev_is_connected(tmp_path: Path, firmware_dir: Path) -> None:
    """REVIEW-8 (docs/security.md) with the real QEMU: once the relaunched VM's virtio-serial
    chardev holds its connection to `host-install listen`, an operator's request on the same
    socket is still answered (before the fix the listener sat on QEMU's silent connection)."""
    import threading
    import time

    from host_install.channel import Listener, request_update

    vm = make_vm(tmp_path / "vm", firmware_dir, update_port=True)
    addon = build_addon([("edk2-2026.08", (firmware_dir / FW_2026).read_bytes())])
    listener = Listener(vm)
    t = threading.Thread(target=listener.serve, daemon=True)
    t.start()
    try:
        first = request_update(vm.channel_path, addon, timeout=120)
        assert first["ok"] and first["result"]["launched"] is True, first
        pid = qemu.running_pid(vm)
        deadline = time.monotonic() + 30  # QEMU's chardev (reconnect=1) connects within a second or two
        while time.monotonic() < deadline and not _has_peer(listener, pid):
            time.sleep(0.2)
        assert _has_peer(listener, pid), "QEMU's chardev never connected to the listener"
        again = request_update(vm.channel_path, addon, timeout=30)
        assert again["ok"] and again["status"] == "unchanged", again
        assert _has_peer(listener, pid)  # and QEMU's connection is still being served
    finally:
        listener.close()
        stop_quietly(vm)


def _has_peer(listener: object, pid: int | None) -> bool:
    import socket
    import struct
    for conn in list(getattr(listener, "_conns", ())):
        try:
            peer = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        except OSError:
            continue
        if peer == pid:
            return True
    return False
