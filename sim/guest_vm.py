"""The demo's real guest: Debian's kernel in the VM asks for its add-on's firmware over virtio-serial.

Used by `firmgate demo` when QEMU and the guest image (`make guest-image`,
guest.image) are available. The VM directory boots the kernel directly; its
initrd carries the guest's add-on on its ESP (what the guest's disk image would
hold). The guest client (guest.boot) runs at every boot and asks
`host-install listen` (running in the demo) for the add-on's firmware unless it
is in force. So "the guest asks for vN" is: put the vN add-on on the guest's
disk, reboot the VM, and wait for the request the guest makes by itself to end
in the journal.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from guest.boot import UP_MARKER
from guest.image import GuestImage
from host_install import qemu
from host_install.guest_status import write_guest_status
from host_install.install import vm_lock
from host_install.journal import TERMINAL, Journal
from host_install.vm import VmDir

INITRD = "initrd"
DONE_MARKER = b"firmgate-guest: done"  # the test image's /init prints it when the client returned


def vm_config(img: GuestImage, accel: str) -> dict[str, Any]:
    """vm.toml keys for a VM that runs the guest image (boot_timeout: launch to the client's first line)."""
    return {"kernel": str(img.kernel), "initrd": INITRD, "append": img.append, "update_port": True,
            "memory_mib": 256, "boot_marker": UP_MARKER, "boot_timeout": 60.0 if accel == "kvm" else 420.0,
            "stop_timeout": 30.0}


@dataclass
class RequestOutcome:
    status: str                      # "installed" | "unchanged" | "rolled-back" | "no request"
    result: dict[str, Any]           # like an InstallResult's dict
    reboot_seconds: float | None     # the reboot onto the new disk, when there was one


class RealGuestVm:
    def __init__(self, vm: VmDir, img: GuestImage) -> None:
        self.vm, self.img = vm, img
        self.addon: bytes | None = None

    def put_addon(self, addon: bytes) -> bool:
        """The guest's disk now carries `addon`; True when that changed it."""
        if addon == self.addon:
            return False
        self.img.initrd_with_addon(addon, self.vm.path / INITRD)
        self.addon = addon
        return True

    def _seq(self) -> int:
        recs = Journal(self.vm.journal_path).records()
        return int(recs[-1]["seq"]) if recs else 0

    def _guest_done(self) -> bool:
        """The client of the current boot has finished (it asked and was answered, or had nothing to ask)."""
        if qemu.running_pid(self.vm) is None:
            return True
        try:
            return DONE_MARKER in self.vm.serial_log.read_bytes()[-65536:]
        except FileNotFoundError:
            return False

    def settle(self, timeout: float) -> None:
        """Wait until the guest's own request after its last boot, if any, has ended: its client is
        done and no transaction is open (rebooting earlier would kill a guest about to ask)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not Journal(self.vm.journal_path).open_transaction() and self._guest_done():
                break
            time.sleep(0.5)
        with vm_lock(self.vm, wait=max(1.0, end - time.monotonic())):
            pass

    def reboot(self) -> qemu.BootCheck:
        """Restart the VM (on the firmware in force) so that the guest boots with its new disk."""
        with vm_lock(self.vm, wait=self.vm.config.boot_timeout * 2):
            qemu.stop(self.vm)
            write_guest_status(self.vm, Journal(self.vm.journal_path))
            qemu.launch(self.vm)
            return qemu.confirm_boot(self.vm)

    def wait_request(self, digest: str, since_seq: int, timeout: float) -> RequestOutcome:
        """The outcome of the guest's own request for `digest`, journalled after `since_seq`."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            recs = [r for r in Journal(self.vm.journal_path).records() if int(r.get("seq", 0)) > since_seq]
            begins = [r for r in recs if r.get("event") == "begin" and r.get("new") == digest]
            if begins:
                tx = begins[-1]["tx"]
                mine = {r["event"]: r for r in recs if r.get("tx") == tx}
                done = next((mine[e] for e in ("committed", "rolled-back", "aborted", "recovered") if e in mine), None)
                if done is not None and done["event"] in TERMINAL:
                    conf = mine.get("confirmed", {})
                    status = "installed" if done["event"] == "committed" else done["event"]
                    return RequestOutcome(status, {"fwid": begins[-1].get("fwid"), "in_force": done.get("in_force"),
                                                   "launched": True, "accel": mine.get("launched", {}).get("accel"),
                                                   "boot_seconds": conf.get("seconds")}, None)
                time.sleep(0.5)
                continue  # asked: only the journal's terminal record says how it ended
            try:
                serial = self.vm.serial_log.read_bytes()[-65536:].decode("utf-8", "replace")
            except FileNotFoundError:
                serial = ""
            if "in force; not asking" in serial:
                return RequestOutcome("unchanged", {"in_force": digest, "launched": False}, None)
            if "not asking again" in serial:
                return RequestOutcome("no request", {}, None)
            time.sleep(0.5)
        return RequestOutcome("no request", {}, None)

    def ask(self, addon: bytes, digest: str, host_firmware: bytes) -> RequestOutcome:
        """Give the guest this add-on, (re)boot it if its disk changed, and wait for its own request.

        A VM without firmware is first started by the host on `host_firmware` (an add-on): the
        provider's own image, which the guest then asks to replace.
        """
        timeout = self.vm.config.boot_timeout * 2 + 120
        self.settle(timeout)
        since = self._seq()
        reboot_s = None
        changed = self.put_addon(addon)
        if Journal(self.vm.journal_path).in_force() is None:
            from host_install.install import install
            reboot_s = install(self.vm, host_firmware).boot_seconds
        elif changed and qemu.running_pid(self.vm) is not None:
            check = self.reboot()
            if not check.ok:
                return RequestOutcome(f"reboot failed: {check.reason}", {}, check.seconds)
            reboot_s = check.seconds
        out = self.wait_request(digest, since, timeout)
        out.reboot_seconds = reboot_s
        return out
