"""host-install with IGVM firmware: the QEMU command line (QEMU >= 10.0), the
igvm-cfg probe, and what happens on a QEMU without it (Debian 12's 7.2 here):
the install is refused before the running VM is touched."""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from host_install.errors import InstallFailed
from host_install.install import current_firmware, install, status
from host_install.qemu import build_command, supports_igvm
from host_install.vm import VmDir
from tests.igvm_files import minimal_snp_igvm
from verifier.firmware.addon import build_addon

QEMU = shutil.which("qemu-system-x86_64")


def _fake_qemu(tmp_path: Path, objects: str) -> str:
    script = tmp_path / "qemu-fake"
    script.write_text(f'#!/bin/sh\n[ "$1 $2" = "-object help" ] && printf "List of user creatable objects:\\n'
                      f'{objects}" && exit 0\nexit 1\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_snp_igvm_command_line(tmp_path: Path) -> None:
    vm = VmDir.create(tmp_path / "vm", accel="kvm", snp=True, firmware_format="igvm", vcpus=2)
    cmd = build_command(vm)
    machine = cmd[cmd.index("-machine") + 1].split(",")
    assert {"confidential-guest-support=sev0", "igvm-cfg=igvm0", "memory-backend=ram0"} <= set(machine)
    objects = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-object"]
    assert objects[-1] == f"igvm-cfg,id=igvm0,file={vm.firmware_link}"
    assert any(o.startswith("sev-snp-guest,id=sev0,") for o in objects)
    assert "-bios" not in cmd and cmd[cmd.index("-smp") + 1] == "2"


def test_igvm_probe(tmp_path: Path) -> None:
    assert supports_igvm(_fake_qemu(tmp_path, "  authz-list\\n  igvm-cfg\\n  sev-snp-guest\\n")) is True
    assert supports_igvm(_fake_qemu(tmp_path, "  authz-list\\n  sev-guest\\n")) is False
    assert supports_igvm(str(tmp_path / "no-such-qemu")) is False


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")
def test_this_hosts_qemu_and_an_igvm_install(tmp_path: Path) -> None:
    """Debian 12's QEMU 7.2 has no igvm-cfg: an IGVM install that would relaunch is refused at once,
    nothing is stored or switched; --no-launch still installs (for a host whose QEMU is upgraded later)."""
    vm = VmDir.create(tmp_path / "vm", snp=True, firmware_format="igvm", qemu=QEMU)
    addon = bytes(build_addon([("coconut-1", minimal_snp_igvm())]))
    if supports_igvm(QEMU):
        pytest.skip("this QEMU has igvm-cfg; the refusal path needs one without")
    with pytest.raises(InstallFailed, match="has no igvm-cfg object") as exc:
        install(vm, addon, launch=True)
    assert exc.value.exit_code == 1 and "--no-launch" in exc.value.diagnostics()
    assert status(vm)["in_force"]["digest"] is None and not os.path.lexists(vm.firmware_link)
    res = install(vm, addon, launch=False)
    assert res.status == "installed" and current_firmware(vm).data == minimal_snp_igvm()
