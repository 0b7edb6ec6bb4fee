"""Real-QEMU helpers for the host-install tests: accel choice, VM dirs, ROM read-back."""
from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from host_install import qemu
from host_install.vm import VmDir

QEMU = "qemu-system-x86_64"
FW_2025 = "edk2-2025.02-OVMF.fd"
FW_2026 = "edk2-2026.08-OVMF.amdsev.fd"
FW_NOSEV = "edk2-2022.11-OVMF_CODE_4M-no-sev-metadata.fd"
ROM_TOP = 0x1_0000_0000  # a -bios ROM ends at 4 GiB (hw/i386/x86.c)
PROBE_BYTES = 64 * 1024

needs_qemu = pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed")


@functools.cache
def accel(firmware: str) -> str:
    """"kvm" if a real boot under KVM works here, else "tcg" (probed once per process)."""
    with tempfile.TemporaryDirectory(prefix="fg-kvm-") as d:
        return "kvm" if qemu.probe_kvm(Path(firmware), Path(d) / "probe") else "tcg"


def boot_timeout(acc: str) -> float:
    # OVMF reaches BDS in well under a second under KVM and in 1.5-8 s under TCG (2025.02 is
    # the slowest; a loaded 2-core CI runner doubles it). Only a failing boot waits this long.
    return 10.0 if acc == "kvm" else 40.0


def make_vm(path: Path, firmware_dir: Path, **over: Any) -> VmDir:
    acc = accel(str(firmware_dir / FW_2025))
    cfg: dict[str, Any] = dict(qemu=QEMU, accel=acc, memory_mib=256, snp=True, launch_mode="plain",
                               boot_timeout=boot_timeout(acc), stop_timeout=0.5)
    cfg.update(over)
    return VmDir.create(path, **cfg)


def broken_image(firmware_dir: Path) -> bytes:
    """2026.08 with its firmware volume overwritten: footer and SEV metadata intact, so every
    static check passes, but it cannot boot (SEC/PEI fault before BDS)."""
    data = bytearray((firmware_dir / FW_2026).read_bytes())
    data[0x100000:0x300000] = b"\xff" * 0x200000
    return bytes(data)


def rom_tail(vm: VmDir, tmp: Path) -> bytes:
    """The last 64 KiB of the ROM the running VM has mapped (QMP pmemsave), to compare with an image."""
    out = tmp / "rom-tail.bin"
    out.unlink(missing_ok=True)
    qemu.qmp(vm, "pmemsave", {"val": ROM_TOP - PROBE_BYTES, "size": PROBE_BYTES, "filename": str(out)})
    return out.read_bytes()


def stop_quietly(vm: VmDir) -> None:
    try:
        qemu.stop(vm, timeout=0.5)
    except Exception:
        pass
