"""A real guest asks for its firmware: Debian's kernel in QEMU (TCG here), its add-on on the ESP of its
initramfs, the request over the org.firmgate.update virtio-serial port, host-install listen through
QEMU's chardev, a relaunch, and the guest telling on its serial console which firmware it runs.

Needs the guest image (`make guest-image`: Debian kernel + firmgate's initramfs, see docs/host.md);
skips with that reason when it is not built. Firmware: the two plain OVMF builds of ../shared, whose
SMBIOS type 0 differs (v1 2022.11, v2 2025.02); the unbootable image is tests/vms' broken 2026.08.
"""
from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from vms.hostvm import FW_2025, QEMU, accel, broken_image, needs_qemu, stop_quietly

from guest import image as guest_image
from host_install import qemu
from host_install.channel import Listener
from host_install.guest_status import write_guest_status
from host_install.install import current_firmware, install, status
from host_install.journal import Journal
from host_install.vm import VmDir
from verifier.firmware.addon import build_addon

pytestmark = [pytest.mark.qemu, pytest.mark.slow, needs_qemu]
FW_2022 = "edk2-2022.11-OVMF.fd"
GUEST_BOOT = 420.0   # OVMF + xz-decompressing Debian's kernel under TCG on a loaded 2-core runner


@pytest.fixture(scope="module")
def image() -> guest_image.GuestImage:
    img = guest_image.load()
    if img is None:
        pytest.skip(f"guest image not built in {guest_image.default_cache_dir()}: run `make guest-image` "
                    "(Debian's kernel and an initramfs built from this machine's packages)")
    return img


def _wait(what: str, cond: Callable[[], Any], timeout: float) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _serial(vm: VmDir, prev: bool = False) -> str:
    path = vm.serial_log.with_name(vm.serial_log.name + ".prev") if prev else vm.serial_log
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _serial_with(vm: VmDir, needle: str) -> str:
    text = _serial(vm)
    return text if needle in text else ""


def _smbios(text: str) -> str:
    m = re.search(r"firmgate-guest: firmware \(SMBIOS\): (.*)", text)
    assert m, "the guest printed no SMBIOS line"
    return m.group(1).strip()


def _tx_records(vm: VmDir, fwid: str) -> dict[str, dict[str, Any]]:
    recs = Journal(vm.journal_path).records()
    txs = [r["tx"] for r in recs if r.get("event") == "begin" and r.get("fwid") == fwid]
    return {r["event"]: r for r in recs if txs and r.get("tx") == txs[-1]}


def test_real_guest_asks_boots_again_and_is_rolled_back(tmp_path: Path, firmware_dir: Path,
                                                       image: guest_image.GuestImage,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    fw1, fw2 = (firmware_dir / FW_2022).read_bytes(), (firmware_dir / FW_2025).read_bytes()
    vm = VmDir.create(tmp_path / "vm", qemu=QEMU, accel=accel(str(firmware_dir / FW_2025)), memory_mib=256,
                      snp=True, launch_mode="plain", update_port=True, kernel=str(image.kernel),
                      initrd="initrd", append=image.append, boot_marker="firmgate-guest: up",
                      boot_timeout=GUEST_BOOT, stop_timeout=30.0)
    initrd = vm.path / "initrd"
    image.initrd_with_addon(build_addon([("edk2-2025.02", fw2)]), initrd)  # the guest's ESP holds v2
    answers: list[dict[str, Any]] = []
    listener = Listener(vm)

    def serve() -> None:
        while True:
            try:
                answer = listener.serve_one()
            except OSError:
                return  # closed
            if answer is not None:
                answers.append(answer)
    threading.Thread(target=serve, daemon=True).start()
    boots: list[tuple[str, float]] = []
    try:
        # 1. the operator installs v1; the guest boots on it and asks for its add-on's v2
        r1 = install(vm, build_addon([("edk2-2022.11", fw1)]))
        assert r1.status == "installed" and r1.boot_seconds is not None
        boots.append(("v1 (operator's install)", r1.boot_seconds))
        _wait("the guest's request", lambda: "asking the host to install edk2-2025.02" in _serial(vm), 120)

        # 2. host-install listen installs v2 and relaunches; the guest runs on v2 and does not ask again
        committed = _wait("v2 committed", lambda: _tx_records(vm, "edk2-2025.02").get("committed"), GUEST_BOOT + 120)
        assert committed["confirmed"] is True
        boots.append(("v2 (the guest's request)", _tx_records(vm, "edk2-2025.02")["confirmed"]["seconds"]))
        text = _wait("the guest's decision on v2", lambda: _serial_with(vm, "not asking"), 120)
        assert "the add-on's firmware is in force; not asking" in text
        assert "host says in force: edk2-2025.02" in text
        on_v1, on_v2 = _smbios(_serial(vm, prev=True)), _smbios(text)
        assert on_v1 != on_v2, "v1 and v2 report the same SMBIOS type 0"
        assert current_firmware(vm).data == fw2
        assert len(answers) == 1 and answers[0]["status"] == "installed"

        # 3. a guest whose add-on holds an image that cannot boot: the operator relaunches the VM with it
        qemu.stop(vm)
        image.initrd_with_addon(build_addon([("broken", broken_image(firmware_dir))]), initrd)
        write_guest_status(vm, Journal(vm.journal_path))
        qemu.launch(vm)
        check = qemu.confirm_boot(vm)
        assert check.ok, check.reason
        boots.append(("v2 (guest with the unbootable add-on)", check.seconds))
        rolled = _wait("the rollback", lambda: _tx_records(vm, "broken").get("rolled-back"), GUEST_BOOT * 2 + 120)
        assert rolled["relaunch_ok"] is True and "crashed" in rolled["reason"]
        failed = _tx_records(vm, "broken")["boot-failed"]
        boots.append(("unbootable image (until the crash was seen)", failed["seconds"]))
        boots.append(("v2 again (rollback relaunch)", rolled["relaunch_seconds"]))
        text = _wait("the guest's decision after the rollback", lambda: _serial_with(vm, "not asking again"), 120)
        assert "the host tried the add-on's firmware and could not boot it" in text
        assert _smbios(text) == on_v2
        cur = current_firmware(vm)
        assert cur.fwid == "edk2-2025.02" and cur.data == fw2
        st = status(vm)
        assert st["consistent"] and st["qemu"]["status"] == "running"
        time.sleep(3)  # the guest asks nothing more: two requests in all
        assert [a["status"] for a in answers] == ["installed", "rolled-back"]
    finally:
        with capsys.disabled():
            print(f"\n[real guest, accel {vm.config.accel}] boot wall times (launch -> 'firmgate-guest: up'):")
            for what, secs in boots:
                print(f"    {what:48s} {secs:6.1f}s")
        listener.close()
        stop_quietly(vm)
