"""Install, roll back and recover: the transactions of host-install.

One transaction switches the VM from the firmware in force (`old`) to another
(`new`). Its steps, each written to the journal (fsync'd) after it happened:

    begin     old and new digests, fwid, whether QEMU is relaunched
    stored    new image is in store/<sha384>.rom (tmp + fsync + rename + dir fsync)
    stopped   QEMU stopped (ACPI power-down, QMP quit, SIGKILL), launch mode only
    switched  `firmware` link now names new (symlink + rename + dir fsync)
    launched  QEMU started on the new ROM
    confirmed QMP "running" and the firmware printed its boot marker
    committed terminal: in_force = new
On a failed boot: boot-failed, switched (back to old), launched, rolled-back
(terminal: in_force = old). `recover` closes a transaction that a crash cut
short: a confirmed one is finished, anything else is undone (old is restored),
and a `recovered` record says which firmware is in force.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import progress, qemu
from .errors import BootFailed, InstallError, InstallFailed, RecoveryNeeded, VmBusy
from .guest_status import write_guest_status
from .image import CandidateImage, candidate_from_addon
from .journal import TERMINAL, Journal
from .store import Store, link_target, remove_link_temporaries, sha384, switch_link
from .vm import VmDir

# Test-only: stop the process (sleep forever) when it reaches this checkpoint,
# so a test can SIGKILL it there. Never set in production.
PAUSE_ENV = "FIRMGATE_UNSAFE_TEST_PAUSE_AT"
CHECKPOINTS = ("begin", "store.tmp-written", "stored", "stopped", "link.tmp-created", "switched",
               "launched", "confirmed", "boot-failed", "rollback-switched")


def _checkpoint(name: str) -> None:
    if os.environ.get(PAUSE_ENV) == name:
        sys.stderr.write(f"host-install: paused at {name}\n")
        sys.stderr.flush()
        while True:
            signal.pause()


@dataclass(frozen=True)
class InstalledFirmware:
    """The firmware in force: what a (simulated) SNP host measures at launch."""

    digest: str
    fwid: str | None
    data: bytes
    path: Path


@dataclass(frozen=True)
class InstallResult:
    status: str                   # "installed" | "unchanged" | "rolled-back" (rollback, or a failed install's) | "recovered"
    tx: str | None
    fwid: str | None
    digest: str | None            # the firmware that was asked for
    in_force: str | None          # the firmware in force now
    previous: str | None          # the firmware in force before
    launched: bool
    accel: str | None = None
    boot_seconds: float | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_vm(vm_dir: VmDir | str | os.PathLike[str]) -> VmDir:
    return vm_dir if isinstance(vm_dir, VmDir) else VmDir.open(vm_dir)


@contextlib.contextmanager
def vm_lock(vm: VmDir, wait: float = 0.0) -> Iterator[None]:
    """flock() on <vm>/lock: one transaction per VM; the kernel drops it if we die.

    `wait` > 0: a guest's request waits that long for a running install to finish (a guest
    asks right after the boot that install is still confirming) instead of failing at once.
    """
    fd = os.open(vm.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise VmBusy(f"another host-install is working on {vm.path}",
                                 "wait for it to finish, then check `host-install status`") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def _in_force(journal: Journal) -> tuple[str | None, str | None]:
    rec = journal.in_force()
    return (rec["in_force"], rec.get("fwid")) if rec else (None, None)


def _launch_and_confirm(vm: VmDir, journal: Journal, tx: str, checkpoint: str | None = None) -> qemu.BootCheck:
    accel = qemu.resolve_accel(vm.config.accel)
    try:
        write_guest_status(vm, journal)  # the answer a relaunch loses, told to the guest through fw_cfg
        with progress.step(f"launching QEMU ({accel})") as s:
            pid = qemu.launch(vm, accel)
            s.outcome = f"pid {pid}"
    except InstallFailed as exc:
        return qemu.BootCheck(False, exc.diagnostics(), 0.0, None)
    journal.append("launched", tx, pid=pid, accel=accel)
    if checkpoint:
        _checkpoint(checkpoint)
    with progress.step(f"waiting for the firmware to boot (up to {vm.config.boot_timeout:g} s)") as s:
        check = qemu.confirm_boot(vm)
        s.outcome = "booted" if check.ok else f"not booted: {check.reason}"
    return check


def _stop(vm: VmDir, *, graceful: bool = True) -> str:
    if graceful and qemu.can_power_down(vm):
        what = f"stopping QEMU (ACPI power-down, up to {vm.config.stop_timeout:g} s)"
    else:
        what = "stopping QEMU"
    with progress.step(what) as s:
        how = qemu.stop(vm, graceful=graceful)
        s.outcome = how
    return how


def _transition(vm: VmDir, new: CandidateImage | None, target: str, fwid: str | None, *,
                launch: bool, kind: str) -> InstallResult:
    """Switch the VM to `target` (already in the store unless `new` is given); caller holds the lock."""
    journal, store = Journal(vm.journal_path), Store(vm.store_dir)
    old, old_fwid = _in_force(journal)
    tx = secrets.token_hex(8)
    journal.append("begin", tx, kind=kind, new=target, fwid=fwid, old=old, old_fwid=old_fwid, launch=launch,
                   addon_sha384=new.addon_sha384 if new else None, size=len(new.payload) if new else None)
    _checkpoint("begin")
    if new is not None:
        stored = store.put(new.payload, _checkpoint)
        if stored != target:  # cannot happen unless memory is corrupted; fail closed
            raise InstallFailed("stored digest differs from the checked image", "retry the install")
    elif not store.verify(target):
        raise InstallFailed(f"firmware {target[:16]}… is not intact in the store", "reinstall it from an add-on")
    journal.append("stored", tx, digest=target)
    _checkpoint("stored")
    if launch:
        how = _stop(vm)
        journal.append("stopped", tx, how=how)
        _checkpoint("stopped")
    switch_link(vm.firmware_link, target, _checkpoint)
    journal.append("switched", tx, to=target, frm=old)
    _checkpoint("switched")
    # An operator's rollback that lands says so; a failed install's automatic one is raised below.
    done = "rolled-back" if kind == "rollback" else "installed"
    if not launch:
        journal.append("committed", tx, in_force=target, fwid=fwid, confirmed=False)
        return InstallResult(done, tx, fwid, target, target, old, launched=False)
    check = _launch_and_confirm(vm, journal, tx, "launched")
    accel = qemu.resolve_accel(vm.config.accel)
    if check.ok:
        journal.append("confirmed", tx, seconds=round(check.seconds, 3), status=check.status)
        _checkpoint("confirmed")
        journal.append("committed", tx, in_force=target, fwid=fwid, confirmed=True)
        return InstallResult(done, tx, fwid, target, target, old, True, accel, round(check.seconds, 3),
                             check.reason)
    # The new firmware did not come back: put the old one back and relaunch it.
    journal.append("boot-failed", tx, reason=check.reason, status=check.status, seconds=round(check.seconds, 3))
    _checkpoint("boot-failed")
    _stop(vm, graceful=False)  # a firmware that did not boot will not honour ACPI power-down
    if old is None:
        os.unlink(vm.firmware_link)
        journal.append("aborted", tx, in_force=None, reason=check.reason)
        raise BootFailed(f"firmware {fwid!r} did not boot ({check.reason}); there was no previous firmware",
                         "the VM has no firmware now; install a known-good one",
                         InstallResult("rolled-back", tx, fwid, target, None, None, True, accel, None, check.reason))
    switch_link(vm.firmware_link, old)
    journal.append("switched", tx, to=old, frm=target, rollback=True)
    _checkpoint("rollback-switched")
    back = _launch_and_confirm(vm, journal, tx)
    journal.append("rolled-back", tx, in_force=old, fwid=old_fwid, reason=check.reason, relaunch_ok=back.ok,
                   relaunch_reason=back.reason, relaunch_seconds=round(back.seconds, 3))
    result = InstallResult("rolled-back", tx, fwid, target, old, old, True, accel, None, check.reason)
    if not back.ok:
        raise RecoveryNeeded(f"firmware {fwid!r} did not boot ({check.reason}); the previous firmware is in force "
                             f"again but did not come back either ({back.reason})",
                             "check the host (QEMU, accel) and run `host-install recover`")
    raise BootFailed(f"firmware {fwid!r} did not boot ({check.reason}); rolled back to {old_fwid!r}",
                     "the VM runs its previous firmware; fix the image and try again", result)


def install(vm_dir: VmDir | str | os.PathLike[str], addon_bytes: bytes, fwid: str | None = None, *,
            launch: bool = True, lock_wait: float = 0.0) -> InstallResult:
    """Install the firmware from a guest's UKI add-on into the VM and (with launch) relaunch it.

    Raises an exit-2 InstallError for bad input before anything changes, and
    BootFailed (exit 1, `.result` set) after an automatic rollback.
    """
    vm = _as_vm(vm_dir)
    candidate = candidate_from_addon(vm, addon_bytes, fwid)
    return install_image(vm, candidate, launch=launch, lock_wait=lock_wait)


def plan(vm_dir: VmDir | str | os.PathLike[str], addon_bytes: bytes, fwid: str | None = None, *,
         launch: bool = True) -> dict[str, Any]:
    """What `install` would do, after the same checks, without touching anything (`--dry-run`)."""
    vm = _as_vm(vm_dir)
    candidate = candidate_from_addon(vm, addon_bytes, fwid)
    journal = Journal(vm.journal_path)
    old, old_fwid = _in_force(journal)
    steps = ["recover" if journal.open_transaction() else None, "begin", "stored",
             "stopped" if launch else None, "switched", "launched" if launch else None,
             "confirmed" if launch else None, "committed"]
    return {"vm": str(vm.path), "fwid": candidate.fwid, "digest": candidate.digest, "kind": candidate.kind,
            "size": len(candidate.payload), "addon_sha384": candidate.addon_sha384,
            "old": {"digest": old, "fwid": old_fwid}, "already_in_force": old == candidate.digest,
            "launch": launch, "accel": qemu.resolve_accel(vm.config.accel) if launch else None,
            "steps": [st for st in steps if st]}


def install_image(vm: VmDir, candidate: CandidateImage, *, launch: bool = True,
                  lock_wait: float = 0.0) -> InstallResult:
    if launch:
        qemu.require_igvm(vm)  # before anything changes: the running VM keeps running
    with vm_lock(vm, lock_wait):
        _recover_locked(vm, relaunch=launch)
        journal = Journal(vm.journal_path)
        old, _ = _in_force(journal)
        if (old == candidate.digest and link_target(vm.firmware_link) == old
                and (not launch or qemu.running_pid(vm) is not None)):
            return InstallResult("unchanged", None, candidate.fwid, old, old, old, launched=False,
                                 reason="this firmware is already in force")
        return _transition(vm, candidate, candidate.digest, candidate.fwid, launch=launch, kind="install")


def _previous(journal: Journal) -> tuple[str | None, str | None]:
    """The firmware in force before the current one (what `rollback` returns to)."""
    current, _ = _in_force(journal)
    for rec in reversed(journal.records()):
        if rec.get("event") in TERMINAL and rec.get("in_force") and rec["in_force"] != current:
            return rec["in_force"], rec.get("fwid")
    return None, None


def rollback(vm_dir: VmDir | str | os.PathLike[str], *, launch: bool = True) -> InstallResult:
    """Return to the firmware that was in force before the current one."""
    vm = _as_vm(vm_dir)
    with vm_lock(vm):
        _recover_locked(vm, relaunch=launch)
        journal = Journal(vm.journal_path)
        prev, prev_fwid = _previous(journal)
        if prev is None:
            raise InstallFailed("there is no previous firmware to roll back to", "see `host-install status`")
        return _transition(vm, None, prev, prev_fwid, launch=launch, kind="rollback")


def recover(vm_dir: VmDir | str | os.PathLike[str], *, relaunch: bool = True) -> InstallResult:
    """Finish or undo a transaction that a crash interrupted; a no-op when none is open."""
    vm = _as_vm(vm_dir)
    with vm_lock(vm):
        return _recover_locked(vm, relaunch=relaunch)


def _recover_locked(vm: VmDir, *, relaunch: bool) -> InstallResult:
    journal, store = Journal(vm.journal_path), Store(vm.store_dir)
    store.remove_temporaries()
    remove_link_temporaries(vm.firmware_link)
    open_tx = journal.open_transaction()
    current, current_fwid = _in_force(journal)
    if not open_tx:
        linked = link_target(vm.firmware_link)
        if linked != current:  # the link disagrees with the journal: the journal wins
            if current is None:
                os.unlink(vm.firmware_link)
            else:
                if not store.verify(current):
                    raise RecoveryNeeded(f"firmware in force {current[:16]}… is missing or corrupted in the store",
                                         "reinstall it from the guest's add-on")
                switch_link(vm.firmware_link, current)
            journal.append("recovered", None, in_force=current, fwid=current_fwid, action="relink", frm=linked)
            return InstallResult("recovered", None, current_fwid, current, current, linked, False,
                                 reason="firmware link disagreed with the journal; restored")
        return InstallResult("unchanged", None, current_fwid, current, current, None, False,
                             reason="no interrupted transaction")
    begin = open_tx[0]
    tx = begin["tx"]
    events = [r["event"] for r in open_tx]
    new, new_fwid, old, old_fwid = begin.get("new"), begin.get("fwid"), begin.get("old"), begin.get("old_fwid")
    launched_tx = bool(begin.get("launch"))
    if "confirmed" in events and "boot-failed" not in events:
        target, fwid, action = new, new_fwid, "finish"
    elif not launched_tx and "switched" in events:
        target, fwid, action = new, new_fwid, "finish"  # nothing left to confirm without a launch
    elif old is None and isinstance(new, str) and store.verify(new) and "boot-failed" not in events:
        target, fwid, action = new, new_fwid, "finish-first"  # no previous firmware to return to
    else:
        target, fwid, action = old, old_fwid, "undo"
    if target is None:
        if link_target(vm.firmware_link) is not None:
            os.unlink(vm.firmware_link)
        journal.append("recovered", tx, in_force=None, fwid=None, action=action, interrupted_after=events[-1])
        return InstallResult("recovered", tx, None, new, None, old, False, reason=f"{action}: no firmware in force")
    if not store.verify(target):
        raise RecoveryNeeded(f"firmware {target[:16]}… needed for recovery is not intact in the store",
                             "reinstall a known-good firmware from its add-on")
    if link_target(vm.firmware_link) != target:
        switch_link(vm.firmware_link, target)
    relaunched, reason = False, ""
    vm_touched = "stopped" in events or "launched" in events
    if relaunch and launched_tx and vm_touched and not (action == "finish" and qemu.running_pid(vm)):
        _stop(vm, graceful=False)  # it runs an unconfirmed firmware, or nothing
        check = _launch_and_confirm(vm, journal, tx)
        relaunched, reason = check.ok, check.reason
    journal.append("recovered", tx, in_force=target, fwid=fwid, action=action, interrupted_after=events[-1],
                   relaunched=relaunched)
    return InstallResult("recovered", tx, fwid, new, target, old, relaunched, reason=f"{action}; {reason}".strip("; "))


def status(vm_dir: VmDir | str | os.PathLike[str], *, history: int = 10) -> dict[str, Any]:
    """What is in force, what the link says, whether QEMU runs, and any interrupted transaction."""
    vm = _as_vm(vm_dir)
    journal, store = Journal(vm.journal_path), Store(vm.store_dir)
    current, fwid = _in_force(journal)
    prev, prev_fwid = _previous(journal)
    pid = qemu.running_pid(vm)
    linked = link_target(vm.firmware_link)
    open_tx = journal.open_transaction()
    return {
        "vm": str(vm.path),
        "in_force": {"digest": current, "fwid": fwid, "intact": store.verify(current) if current else None},
        "link": linked,
        "consistent": linked == current and not open_tx,
        "previous": {"digest": prev, "fwid": prev_fwid},
        "interrupted": [r["event"] for r in open_tx] or None,
        "qemu": {"pid": pid, "status": qemu.query_status(vm) if pid else None},
        "store": store.digests(),
        "journal": journal.records()[-history:],
    }


def current_firmware(vm_dir: VmDir | str | os.PathLike[str]) -> InstalledFirmware:
    """The firmware in force (bytes verified against their digest), for a host that measures it."""
    vm = _as_vm(vm_dir)
    journal = Journal(vm.journal_path)
    current, fwid = _in_force(journal)
    if current is None:
        raise InstallError(f"{vm.path} has no firmware installed", "run `host-install install` first")
    store = Store(vm.store_dir)
    data = store.read(current)
    if sha384(data) != current:  # store.read checks too; keep the check beside the use
        raise InstallFailed("firmware in force does not match its digest", "run `host-install recover`")
    return InstalledFirmware(current, fwid, data, store.path_of(current))
