"""A simulated SEV-SNP host for a VM directory managed by host-install.

What a real SNP host does at launch, done honestly in software:
- the MEASUREMENT is recomputed from the ROM bytes actually in force in the VM
  directory (`host_install.install.current_firmware`, digest-checked) and the
  VM's shape (vCPUs from vm.toml, vCPU type, VMM, guest features), with
  sev-snp-measure through `verifier.measure.launch` -- never a stored value;
- reports are signed by a `sim.platform.SimPlatform` chain (a root that is
  trusted only when configured explicitly);
- the guest reaches them through configfs-tsm: `SimTsmBackend` plays the
  kernel's side of `/sys/kernel/config/tsm/report` behind the same calls the
  guest client makes on the real tree (mkdir, write inblob, read outblob /
  auxblob / generation / provider, rmdir), so the client's code path is the
  one that runs in a real guest. Like the kernel, the report is generated
  when outblob is read, for the inblob written last, by the firmware in force
  at that moment (the measurement is cached per firmware digest and shape).
- when vm.toml names the owner's ID-block set (`id_blocks`), the host passes the
  block host-install selects for the firmware in force (host_install.idblocks, the
  same choice that goes to QEMU) to the simulated PSP (sim.psp), which checks it
  and fills ID_KEY_DIGEST, AUTHOR_KEY_DIGEST, AUTHOR_KEY_EN, FAMILY_ID, IMAGE_ID
  and GUEST_SVN, or refuses the launch (sim.psp.LaunchRefused).

Not simulated: the hardware itself. Nothing here is evidence of a real chip.
"""
from __future__ import annotations

import errno
import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from host_install.install import current_firmware
from host_install.vm import VmDir
from verifier.measure.launch import Shape, expected_measurement

from .platform import SimPlatform

INBLOB_SIZE = 64
DEFAULT_VCPU_TYPE = "EPYC-v4"   # QEMU's usual -cpu for SNP guests; used when vm.toml names no cpu


@dataclass(frozen=True)
class Launch:
    """What the simulated host measured for the current launch."""

    firmware_digest: str        # sha384 of the ROM in force
    fwid: str | None
    shape: Shape
    measurement: bytes
    # report fields the PSP set from the owner's ID block (empty: launched without one)
    id_fields: dict[str, Any] = field(default_factory=dict, compare=False)


class SimSnpHost:
    """One simulated SNP host serving one VM directory."""

    def __init__(self, vm_dir: VmDir | str | Path, platform: SimPlatform | None = None, *,
                 vcpu_type: str | None = None, vmm: str = "qemu", guest_features: int = 0x1,
                 host_data: bytes = b"\0" * 32, guest_policy: int = 0x30000, guest_svn: int = 0) -> None:
        self.vm = vm_dir if isinstance(vm_dir, VmDir) else VmDir.open(vm_dir)
        self.platform = platform or SimPlatform("Milan", "VCEK")
        cfg = self.vm.config
        self.shape = Shape(vcpus=cfg.vcpus, vcpu_type=vcpu_type or cfg.cpu or DEFAULT_VCPU_TYPE,
                           vmm=vmm, guest_features=guest_features)  # type: ignore[arg-type]
        if len(host_data) != 32:
            raise ValueError("host_data is 32 bytes (SNP_LAUNCH_FINISH HOST_DATA)")
        self.host_data = host_data
        self.guest_policy = guest_policy
        self.guest_svn = guest_svn
        self._measured: dict[tuple[str, str], tuple[bytes, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.reports_signed = 0

    def launch(self) -> Launch:
        """Measure the firmware in force now (digest-checked bytes from the VM's store)."""
        fw = current_firmware(self.vm)
        key = (fw.digest, self.shape.key())
        with self._lock:
            got = self._measured.get(key)
            if got is None:
                m = expected_measurement(fw.data, self.shape)
                got = self._measured[key] = (m, self._id_fields(fw.data, m))
        return Launch(fw.digest, fw.fwid, self.shape, got[0], got[1])

    def _id_fields(self, firmware: bytes, measurement: bytes) -> dict[str, Any]:
        """What the PSP reports for the owner's ID block that host-install passes with this firmware."""
        from host_install.idblocks import select

        from .psp import launch_fields
        sel = select(self.vm, firmware)
        if sel is None or sel.block is None:
            return {}
        b = sel.block
        return launch_fields(self.platform, measurement, guest_policy=b.verified.block.policy, id_block=b.id_block,
                             id_auth=b.id_auth, author_key_enabled=b.author_key_enabled)

    def report(self, report_data: bytes, *, vmpl: int = 0) -> bytes:
        """A signed 1184-byte report for the launch in force, carrying `report_data`."""
        if len(report_data) > INBLOB_SIZE:
            raise ValueError(f"REPORT_DATA is at most {INBLOB_SIZE} bytes")
        launch = self.launch()
        rid = hashlib.sha256(b"sim-report-id" + bytes.fromhex(launch.firmware_digest)).digest()
        with self._lock:
            self.reports_signed += 1
        fields: dict[str, Any] = {"measurement": launch.measurement, "host_data": self.host_data, "vmpl": vmpl,
                                  "policy": self.guest_policy, "guest_svn": self.guest_svn, "report_id": rid}
        fields.update(launch.id_fields)
        return self.platform.sign_report(report_data=report_data.ljust(INBLOB_SIZE, b"\0"), **fields)

    def cert_table(self) -> bytes:
        """The auxblob: the GUID certificate table, PEM entries as the kernel passes the host's blob."""
        return self.platform.cert_table(pem=True)

    def tsm(self) -> SimTsmBackend:
        return SimTsmBackend(self)


@dataclass
class _Entry:
    inblob: bytes = b""
    privlevel: int = 0
    generation: int = 0
    written: bool = False


@dataclass
class SimTsmBackend:
    """The kernel's side of configfs-tsm (drivers/virt/coco/tsm.c + sev-guest), for a SimSnpHost.

    Same calls as `guest.tsm.FsTsmBackend`; the same errors a real tree gives
    (EEXIST on mkdir, EINVAL for an oversized inblob, ENOENT for an unknown entry).
    """

    host: SimSnpHost
    entries: dict[str, _Entry] = field(default_factory=dict)
    race_after_write: bool = False   # test knob: another writer bumps generation right after ours

    def _entry(self, name: str) -> _Entry:
        e = self.entries.get(name)
        if e is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", name)
        return e

    def mkdir(self, name: str) -> None:
        if "/" in name or name in ("", ".", ".."):
            raise OSError(errno.EINVAL, "Invalid argument", name)
        if name in self.entries:
            raise FileExistsError(errno.EEXIST, "File exists", name)
        self.entries[name] = _Entry()

    def write(self, name: str, attr: str, data: bytes) -> None:
        e = self._entry(name)
        if attr == "inblob":
            if len(data) > INBLOB_SIZE:
                raise OSError(errno.EINVAL, "Invalid argument", f"{name}/inblob")
            e.inblob = bytes(data)
            e.written = True
        elif attr == "privlevel":
            level = int(bytes(data).strip() or b"-1")
            if not 0 <= level <= 3:
                raise OSError(errno.EINVAL, "Invalid argument", f"{name}/privlevel")
            e.privlevel = level
        else:
            raise PermissionError(errno.EACCES, "Permission denied", f"{name}/{attr}")
        e.generation += 1
        if self.race_after_write:
            e.generation += 1

    def read(self, name: str, attr: str, limit: int) -> bytes:
        e = self._entry(name)
        if attr == "outblob":
            out = self.host.report(e.inblob, vmpl=e.privlevel)
        elif attr == "auxblob":
            out = self.host.cert_table()
        elif attr == "generation":
            out = f"{e.generation}\n".encode()
        elif attr == "provider":
            out = b"sev_guest\n"
        elif attr == "privlevel":
            out = f"{e.privlevel}\n".encode()
        else:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", f"{name}/{attr}")
        if len(out) > limit:
            raise OSError(errno.EFBIG, "File too large", f"{name}/{attr}")
        return out

    def rmdir(self, name: str) -> None:
        self._entry(name)
        del self.entries[name]
