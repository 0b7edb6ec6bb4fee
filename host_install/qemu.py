"""Run one VM's QEMU: build its command line, launch it daemonized, talk QMP, stop it.

QEMU runs with -daemonize and a pid file, so the VM outlives host-install (a
crashed or killed installer never takes the VM down with it). QMP is only
reached through its unix socket in the VM directory.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from .errors import InstallError, InstallFailed
from .vm import VmDir

UPDATE_PORT_NAME = "org.firmgate.update"  # the guest sees /dev/virtio-ports/org.firmgate.update
STATUS_FWCFG_NAME = "opt/org.firmgate/status"  # the guest reads /sys/firmware/qemu_fw_cfg/by_name/<name>/raw
QMP_TIMEOUT = 5.0
LAUNCH_TIMEOUT = 30.0
# QMP run states after which the guest will not come back by itself (qapi/run-state.json).
DEAD_STATES = frozenset({"internal-error", "guest-panicked", "shutdown", "io-error"})
_MARKER_SCAN_MAX = 8 * 1024 * 1024  # read at most this much of a log when looking for the marker


def kvm_usable() -> bool:
    """True when /dev/kvm opens read-write (necessary, not sufficient: see docs/host.md)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def supports_igvm(qemu_bin: str) -> bool:
    """Whether this QEMU can launch IGVM firmware: its `-object help` lists `igvm-cfg` (QEMU >= 10.0
    built with libigvm, docs/system/igvm.rst). Debian 12's QEMU 7.2 does not."""
    try:
        proc = subprocess.run([qemu_bin, "-object", "help"], stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=QMP_TIMEOUT * 2, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and any(line.strip() == b"igvm-cfg" for line in proc.stdout.splitlines())


def require_igvm(vm: VmDir) -> None:
    """Refuse, before the running VM is touched, to relaunch IGVM firmware on a QEMU without igvm-cfg."""
    if vm.config.firmware_format == "igvm" and not supports_igvm(vm.config.qemu):
        raise InstallFailed(f"QEMU {vm.config.qemu!r} has no igvm-cfg object: it cannot launch IGVM firmware",
                            "use QEMU >= 10.0 built with IGVM support, or install with --no-launch")


def resolve_accel(accel: str) -> str:
    if accel == "auto":
        return "kvm" if kvm_usable() else "tcg"
    return accel


def _id_block_properties(vm: VmDir) -> str:
    """id-block/id-auth/author-key-enabled/policy for the firmware in force (host_install/idblocks.py)."""
    if not vm.config.id_blocks or not vm.firmware_link.exists():
        return ""
    from .idblocks import qemu_properties, select
    with vm.firmware_link.open("rb") as fh:
        rom = fh.read(vm.config.rom_max_bytes + 1)
    try:
        return qemu_properties(select(vm, rom))
    except InstallError as exc:  # the owner's set changed since install: a failed launch, rolled back
        raise InstallFailed(str(exc), exc.hint) from exc


def build_command(vm: VmDir, accel: str | None = None) -> list[str]:
    """The QEMU argument list for this VM with the firmware link as its ROM.

    launch_mode "snp" adds the sev-snp-guest object with a memfd memory backend
    (QEMU >= 9.1, docs/system/i386/amd-memory-encryption.rst); "plain" runs the
    same ROM as an ordinary VM (test hosts without SNP hardware).
    """
    cfg = vm.config
    acc = resolve_accel(accel or cfg.accel)
    machine = [cfg.machine, f"accel={acc}"]
    objects: list[str] = []
    if cfg.effective_launch_mode == "snp":
        machine += ["confidential-guest-support=sev0", "memory-backend=ram0"]
        objects += ["-object", f"memory-backend-memfd,id=ram0,size={cfg.memory_mib}M,share=true",
                    "-object", f"sev-snp-guest,id=sev0,cbitpos={cfg.cbitpos},"
                               f"reduced-phys-bits={cfg.reduced_phys_bits}" + _id_block_properties(vm)]
    if cfg.firmware_format == "igvm":
        # IGVM replaces -bios (QEMU >= 10.0, docs/system/igvm.rst)
        objects += ["-object", f"igvm-cfg,id=igvm0,file={vm.firmware_link}"]
        machine.append("igvm-cfg=igvm0")
        rom: list[str] = []
    else:
        rom = ["-bios", str(vm.firmware_link)]
    cmd = [cfg.qemu, "-nodefaults", "-display", "none", "-no-user-config",
           "-machine", ",".join(machine), "-m", f"{cfg.memory_mib}M", "-smp", str(cfg.vcpus)]
    if cfg.cpu:
        cmd += ["-cpu", cfg.cpu]
    cmd += objects + rom
    if cfg.kernel is not None:  # direct kernel boot; paths are relative to the VM directory
        cmd += ["-kernel", str(vm.path / cfg.kernel)]
        if cfg.initrd is not None:
            cmd += ["-initrd", str(vm.path / cfg.initrd)]
        if cfg.append is not None:
            cmd += ["-append", cfg.append]
    cmd += ["-qmp", f"unix:{vm.qmp_path},server=on,wait=off",
            "-serial", f"file:{vm.serial_log}",
            "-debugcon", f"file:{vm.debug_log}", "-global", "isa-debugcon.iobase=0x402",
            "-daemonize", "-pidfile", str(vm.pid_path)]
    if cfg.update_port:
        # the chardev is a client of `host-install listen`; reconnect=1 keeps retrying while
        # no listener runs, so the VM starts either way
        cmd += ["-device", "virtio-serial-pci,id=fgser",
                "-chardev", f"socket,id=fgupd,path={vm.channel_path},reconnect=1",
                "-device", f"virtserialport,bus=fgser.0,chardev=fgupd,name={UPDATE_PORT_NAME}"]
        if vm.guest_status_path.exists():  # what is in force, for the guest (host_install.guest_status)
            path = str(vm.guest_status_path).replace(",", ",,")  # QEMU option syntax escapes ','
            cmd += ["-fw_cfg", f"name={STATUS_FWCFG_NAME},file={path}"]
    cmd += list(cfg.extra_args)
    return cmd


def running_pid(vm: VmDir) -> int | None:
    """The pid of this VM's QEMU if it runs (checked against /proc, not just the pid file)."""
    try:
        pid = int(vm.pid_path.read_text().strip() or "0")
    except (FileNotFoundError, ValueError):
        return None
    if pid <= 1:
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    # a recycled pid is not our VM: its command line must name our QMP socket
    if state in ("Z", "X") or not any(os.fsencode(str(vm.qmp_path)) in arg for arg in cmdline):
        return None
    return pid


async def _qmp_async(sock: Path, cmd: str, args: dict[str, Any] | None) -> Any:
    client = QMPClient("host-install")
    try:
        await asyncio.wait_for(client.connect(str(sock)), QMP_TIMEOUT)
        return await asyncio.wait_for(client.execute(cmd, args), QMP_TIMEOUT)
    finally:
        try:
            await asyncio.wait_for(client.disconnect(), QMP_TIMEOUT)
        except Exception:  # the VM may have gone away after `quit`
            pass


def qmp(vm: VmDir, cmd: str, args: dict[str, Any] | None = None) -> Any:
    return asyncio.run(_qmp_async(vm.qmp_path, cmd, args))


def query_status(vm: VmDir) -> str | None:
    """QMP run state ("running", "paused", "internal-error"...) or None when QMP is unreachable."""
    if running_pid(vm) is None:
        return None
    try:
        res = qmp(vm, "query-status")
    except Exception:
        return None
    return str(res.get("status")) if isinstance(res, dict) else None


def _rotate_logs(vm: VmDir) -> None:
    for log in (vm.serial_log, vm.debug_log):
        if log.exists():
            os.replace(log, log.with_name(log.name + ".prev"))


def launch(vm: VmDir, accel: str | None = None) -> int:
    """Start QEMU daemonized on the firmware in force; return its pid."""
    if running_pid(vm) is not None:
        raise InstallFailed("QEMU is already running for this VM", "stop it first (host-install stops it itself)")
    _rotate_logs(vm)
    vm.pid_path.unlink(missing_ok=True)
    cmd = build_command(vm, accel)
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=LAUNCH_TIMEOUT, cwd=vm.path)
    except FileNotFoundError:
        raise InstallFailed(f"QEMU binary {vm.config.qemu!r} not found",
                            "install qemu-system-x86 or set `qemu` in vm.toml") from None
    except subprocess.TimeoutExpired:
        raise InstallFailed(f"QEMU did not daemonize within {LAUNCH_TIMEOUT:.0f}s", "check the QEMU arguments") from None
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise InstallFailed(f"QEMU refused to start: {err[-1] if err else f'exit {proc.returncode}'}",
                            "check vm.toml (machine, accel, extra_args) and the image")
    pid = running_pid(vm)
    if pid is None:
        raise InstallFailed("QEMU exited right after it started", "run the QEMU command by hand to see why")
    return pid


@dataclass(frozen=True)
class BootCheck:
    ok: bool
    reason: str
    seconds: float
    status: str | None


def _marker_seen(vm: VmDir, text: str) -> bool:
    if not text:
        return False
    marker = text.encode()
    for log in (vm.debug_log, vm.serial_log):
        try:
            with open(log, "rb") as f:
                if marker in f.read(_MARKER_SCAN_MAX):
                    return True
        except FileNotFoundError:
            continue
    return False


def confirm_boot(vm: VmDir, timeout: float | None = None) -> BootCheck:
    """Wait until QMP says "running" and the firmware printed its boot marker."""
    limit = vm.config.boot_timeout if timeout is None else timeout
    start = time.monotonic()
    status: str | None = None
    while True:
        elapsed = time.monotonic() - start
        if running_pid(vm) is None:
            return BootCheck(False, "QEMU exited during boot", elapsed, None)
        status = query_status(vm) or status
        if status in DEAD_STATES:
            hint = " (KVM cannot run this guest here: set accel = \"tcg\")" if status == "internal-error" else ""
            return BootCheck(False, f"VM entered state {status!r}{hint}", elapsed, status)
        if _marker_seen(vm, vm.config.boot_fail_marker):
            return BootCheck(False, f"the firmware crashed ({vm.config.boot_fail_marker!r} in its log)",
                             elapsed, status)
        if status == "running" and _marker_seen(vm, vm.config.boot_marker):
            return BootCheck(True, "running and the firmware printed its boot marker", elapsed, status)
        if elapsed > limit:
            why = ("the firmware printed no boot marker" if status == "running"
                   else f"QMP status is {status!r}")
            return BootCheck(False, f"not booted after {limit:g}s: {why}", elapsed, status)
        time.sleep(0.2)


def _wait_gone(vm: VmDir, pid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if running_pid(vm) != pid:
            return True
        time.sleep(0.1)
    return running_pid(vm) != pid


# QEMU options that give a guest something to boot an OS from (a disk, a CD, a kernel, a network).
_BOOT_MEDIA_OPTIONS = frozenset({"-drive", "-blockdev", "-hda", "-hdb", "-hdc", "-hdd", "-cdrom", "-kernel",
                                 "-nic", "-netdev", "-net"})
_BOOT_MEDIA_DEVICES = ("virtio-blk", "scsi-hd", "scsi-cd", "ide-hd", "ide-cd", "nvme", "usb-storage",
                       "virtio-net", "e1000")


def can_power_down(vm: VmDir) -> bool:
    """Whether an ACPI power-down can work: only an OS answers the power button, never the firmware alone.

    "auto" looks for a boot medium in extra_args: without one the guest runs nothing but its firmware
    (OVMF ignores the power button), and waiting stop_timeout for it would only delay every install.
    """
    mode = vm.config.acpi_shutdown
    if mode != "auto":
        return mode == "always"
    if vm.config.kernel:  # direct kernel boot (vm.toml `kernel`): an OS runs
        return True
    args = vm.config.extra_args
    for i, arg in enumerate(args):
        if arg in _BOOT_MEDIA_OPTIONS:
            return True
        if arg == "-device" and i + 1 < len(args) and args[i + 1].split(",")[0].startswith(_BOOT_MEDIA_DEVICES):
            return True
    return False


def stop(vm: VmDir, timeout: float | None = None, *, graceful: bool = True) -> str:
    """Stop this VM's QEMU: ACPI power-down (when graceful and the guest can honour it), then QMP quit,
    then SIGKILL.

    Returns how it stopped. A guest whose firmware did not boot cannot honour a
    power-down, so rollback and recovery pass graceful=False; neither can a VM
    without a boot medium (can_power_down).
    """
    pid = running_pid(vm)
    if pid is None:
        return "not-running"
    grace = vm.config.stop_timeout if timeout is None else timeout
    if graceful and can_power_down(vm):
        try:
            qmp(vm, "system_powerdown")
            if _wait_gone(vm, pid, grace):
                return "powerdown"
        except Exception:
            pass
    try:
        qmp(vm, "quit")
    except Exception:
        pass
    if _wait_gone(vm, pid, 5.0):
        return "quit"
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return "quit"
    if _wait_gone(vm, pid, 5.0):
        return "killed"
    raise InstallFailed(f"QEMU pid {pid} does not stop", "kill it by hand, then run `host-install recover`")


def probe_kvm(firmware: Path, workdir: Path, qemu_binary: str = "qemu-system-x86_64", timeout: float = 8.0) -> bool:
    """Boot `firmware` once under KVM in `workdir`: True if it reaches its boot marker.

    /dev/kvm opening is not enough (nested or restricted hosts stop the guest
    with a KVM internal error), so hosts and tests that want "auto" to be
    truthful probe once and write the answer into vm.toml's `accel`.
    """
    if not kvm_usable():
        return False
    workdir.mkdir(parents=True, exist_ok=True)
    vm = VmDir.create(workdir, qemu=qemu_binary, accel="kvm", memory_mib=256, stop_timeout=1.0)
    link = vm.firmware_link
    link.unlink(missing_ok=True)
    os.symlink(os.path.abspath(firmware), link)
    try:
        launch(vm, "kvm")
    except InstallFailed:
        return False
    try:
        return confirm_boot(vm, timeout).ok
    finally:
        stop(vm, timeout=0.5)
