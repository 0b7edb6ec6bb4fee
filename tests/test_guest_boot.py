"""guest.boot (the boot-time client), host_install.guest_status (what the host tells it through fw_cfg),
the direct-kernel-boot keys of vm.toml, and guest.image's cpio writer: fast, no QEMU.
The whole loop in a real VM is tests/test_guest_real_vm.py."""
from __future__ import annotations

import gzip
import hashlib
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from guest import boot
from guest import image as guest_image
from host_install import qemu
from host_install.errors import VmConfigError
from host_install.guest_status import guest_status, write_guest_status
from host_install.install import install
from host_install.journal import Journal
from host_install.vm import VmDir, parse_config
from verifier.firmware.addon import build_addon

FW_2022 = "edk2-2022.11-OVMF.fd"
FW_2025 = "edk2-2025.02-OVMF.fd"
D1, D2 = "a" * 96, "b" * 96


def _status(**over: Any) -> bytes:
    doc: dict[str, Any] = {"version": 1, "running": D1, "fwid": "v1", "last": None}
    doc.update(over)
    return json.dumps(doc).encode()


def test_host_status_parsed_and_hostile_ones_refused() -> None:
    st = boot.parse_host_status(_status(last={"digest": D2, "outcome": "rolled-back", "reason": "crashed"}))
    assert (st.running, st.fwid, st.last_digest, st.last_outcome, st.last_reason) == (D1, "v1", D2, "rolled-back",
                                                                                       "crashed")
    for raw, why in [(b"\xff", "UTF-8"), (b"[]", "version-1"), (_status(version=True), "version-1"),
                     (_status(version=2), "version-1"), (_status(running="A" * 96), "running"),
                     (_status(running=D1[:-1]), "running"), (_status(last=[1]), "last is not"),
                     (_status(last={"digest": "zz"}), "last.digest"), (_status(fwid=7), "fwid"),
                     (_status(fwid="x" * 5000), "larger"), (b"[" * 100000, "larger")]:
        with pytest.raises(ValueError, match=why):
            boot.parse_host_status(raw)


def test_decide() -> None:
    st = boot.parse_host_status(_status())
    assert boot.decide(D1, st).ask is False
    assert boot.decide(D2, st).ask is True
    assert boot.decide(D2, None).ask is True
    failed = boot.parse_host_status(_status(last={"digest": D2, "outcome": "rolled-back", "reason": "x\x1b[2J"}))
    d = boot.decide(D2, failed)
    assert d.ask is False and "could not boot it (x\\x1b[2J)" in d.why  # escape sequence made printable
    # a different image than the one that failed, or a request still launching: ask
    assert boot.decide(D1 + "", boot.parse_host_status(_status(running=D2, last={"digest": D2, "outcome":
                                                                                   "rolled-back"}))).ask is True
    assert boot.decide(D2, boot.parse_host_status(_status(last={"digest": D2, "outcome": "launching"}))).ask is True


def _esp(root: Path, addon: bytes, name: str = "firmware.addon.efi") -> Path:
    d = root / "EFI" / "Linux" / "uki.efi.extra.d"
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(addon)
    return d / name


def _dmi(root: Path, version: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "bios_vendor").write_text("EFI Development Kit II / OVMF\n")
    (root / "bios_version").write_text(version + "\n")
    (root / "bios_date").write_text("02/06/2015\n")
    return root


def test_run_asks_only_when_its_firmware_is_not_in_force(tmp_path: Path, firmware_dir: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    fw2 = (firmware_dir / FW_2025).read_bytes()
    addon = build_addon([("edk2-2025.02", fw2)])
    esp = tmp_path / "esp"
    path = _esp(esp, addon)
    dmi = _dmi(tmp_path / "dmi", "0.0.0\x07")
    status_file = tmp_path / "status"
    calls: list[tuple[str, bytes, str | None]] = []

    def request(dev: str, data: bytes, fwid: str | None) -> dict[str, Any]:
        calls.append((dev, data, fwid))
        return {"ok": False, "status": "rejected", "error": "no\nthanks"}

    kw: dict[str, Any] = {"esp_roots": [esp], "port": "/dev/fake", "status_path": status_file, "dmi_dir": dmi,
                              "request": request}
    # not in force: asks once with the add-on's bytes and fwid; a refusal is exit 1, its text made printable
    status_file.write_bytes(_status())
    assert boot.run(**kw) == 1
    assert calls == [("/dev/fake", addon, "edk2-2025.02")]
    out = capsys.readouterr().out
    assert out.startswith(boot.UP_MARKER + "\n")
    assert "firmware (SMBIOS): EFI Development Kit II / OVMF 0.0.0\\x07 (02/06/2015)" in out
    assert f"add-on {path}: fwid edk2-2025.02 sha384 {hashlib.sha384(fw2).hexdigest()[:16]}" in out
    assert "host answered rejected: no\\x0athanks" in out
    # in force: does not ask
    status_file.write_bytes(_status(running=hashlib.sha384(fw2).hexdigest(), fwid="edk2-2025.02"))
    assert boot.run(**kw) == 0 and len(calls) == 1
    assert "in force; not asking" in capsys.readouterr().out
    # the host could not boot it before: does not ask again
    status_file.write_bytes(_status(last={"digest": hashlib.sha384(fw2).hexdigest(), "outcome": "rolled-back",
                                          "reason": "the firmware crashed"}))
    assert boot.run(**kw) == 0 and len(calls) == 1
    # a malformed status is ignored (the guest asks; the host answers "unchanged" if it is in force)
    status_file.write_bytes(b'{"version": 1, "running": "nope"}')
    assert boot.run(**kw) == 1 and len(calls) == 2
    assert "ignoring the host's firmware status: status.running" in capsys.readouterr().out


def test_run_refuses_bad_or_ambiguous_addons(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    esp = tmp_path / "esp"
    kw: dict[str, Any] = {"esp_roots": [esp], "port": "/dev/fake", "status_path": tmp_path / "none",
                              "dmi_dir": tmp_path / "none", "request": lambda *a: pytest.fail("must not ask")}
    assert boot.run(**kw) == 0
    assert "no firmware add-on on the ESP" in capsys.readouterr().out
    _esp(esp, b"MZ not a PE")
    assert boot.run(**kw) == 2
    assert "refused:" in capsys.readouterr().out
    _esp(esp, b"MZ", "second.addon.efi")
    assert boot.run(**kw) == 2
    assert "several firmware add-ons" in capsys.readouterr().out


def test_find_addons_and_port(tmp_path: Path) -> None:
    esp = tmp_path / "esp"
    a = _esp(esp, b"x")
    (esp / "loader" / "addons").mkdir(parents=True)
    (esp / "loader" / "addons" / "fw.addon.efi").write_bytes(b"y")
    (esp / "EFI" / "Linux" / "uki.efi.extra.d" / "cmdline.txt").write_bytes(b"z")  # not an add-on
    assert boot.find_addons([esp, esp]) == [a, esp / "loader" / "addons" / "fw.addon.efi"]
    sysd, dev = tmp_path / "sys", tmp_path / "dev"
    for port, name in (("vport0p1", "org.qemu.guest_agent.0"), ("vport0p2", "org.firmgate.update")):
        (sysd / port).mkdir(parents=True)
        (sysd / port / "name").write_text(name + "\n")
    dev.mkdir()
    assert boot.find_port(sys_dir=str(sysd), dev_dir=str(dev)) is None  # no device node
    (dev / "vport0p2").write_bytes(b"")
    assert boot.find_port(sys_dir=str(sysd), dev_dir=str(dev)) == str(dev / "vport0p2")
    (dev / "virtio-ports").mkdir()
    (dev / "virtio-ports" / "org.firmgate.update").write_bytes(b"")  # udev's link wins
    assert boot.find_port(sys_dir=str(sysd), dev_dir=str(dev)) == str(dev / "virtio-ports" / "org.firmgate.update")


def test_guest_status_follows_the_journal(tmp_path: Path, firmware_dir: Path) -> None:
    fw1, fw2 = (firmware_dir / FW_2022).read_bytes(), (firmware_dir / FW_2025).read_bytes()
    d1, d2 = hashlib.sha384(fw1).hexdigest(), hashlib.sha384(fw2).hexdigest()
    vm = VmDir.create(tmp_path / "vm,1", snp=True, update_port=True)
    journal = Journal(vm.journal_path)
    assert guest_status(vm, journal) is None
    install(vm, build_addon([("v1", fw1)]), launch=False)
    st = guest_status(vm, journal)
    assert st == {"version": 1, "running": d1, "fwid": "v1",
                  "last": {"tx": st["last"]["tx"] if st else None, "digest": d1, "fwid": "v1",
                           "outcome": "committed", "reason": None}}
    # a request for v2 that failed to boot: the rollback's relaunch is told so (the guest reads it back)
    journal.append("begin", "t" * 16, kind="install", new=d2, fwid="v2", old=d1, old_fwid="v1", launch=True)
    journal.append("boot-failed", "t" * 16, reason="the firmware crashed " + "x" * 1000)
    write_guest_status(vm, journal)
    parsed = boot.parse_host_status(vm.guest_status_path.read_bytes())
    assert (parsed.running, parsed.fwid, parsed.last_digest, parsed.last_outcome) == (d1, "v1", d2, "rolled-back")
    assert parsed.last_reason is not None and len(parsed.last_reason) == 300
    assert boot.decide(d2, parsed).ask is False and boot.decide(d1, parsed).ask is False
    # QEMU gets it as fw_cfg, with the ',' of the path escaped; a VM without the port gets nothing
    cmd = qemu.build_command(vm, "tcg")
    i = cmd.index("-fw_cfg")
    assert cmd[i + 1] == f"name=opt/org.firmgate/status,file={str(vm.guest_status_path).replace(',', ',,')}"
    plain = VmDir.create(tmp_path / "plain", snp=True)
    write_guest_status(plain, Journal(plain.journal_path))
    assert not plain.guest_status_path.exists() and "-fw_cfg" not in qemu.build_command(plain, "tcg")


def test_vm_toml_direct_kernel_boot(tmp_path: Path) -> None:
    vm = VmDir.create(tmp_path / "vm", kernel="/k/vmlinuz", initrd="initrd", append="console=ttyS0 quiet")
    cmd = qemu.build_command(vm, "tcg")
    assert cmd[cmd.index("-kernel") + 1] == "/k/vmlinuz"
    assert cmd[cmd.index("-initrd") + 1] == str(vm.path / "initrd")  # relative to the VM directory
    assert cmd[cmd.index("-append") + 1] == "console=ttyS0 quiet"
    assert "-kernel" not in qemu.build_command(VmDir.create(tmp_path / "b"), "tcg")
    for text, where in [('initrd = "i"\n', "vm.toml:1"), ('kernel = "k"\nappend = "a\\nb"\n', "vm.toml:2"),
                        ('kernel = ""\n', "vm.toml:1"), ("kernel = 3\n", "vm.toml:1")]:
        with pytest.raises(VmConfigError, match=where):
            parse_config(text)


def _read_cpio(raw: bytes) -> dict[str, tuple[int, bytes]]:
    """A newc reader, independent of the writer: name -> (mode, data)."""
    out: dict[str, tuple[int, bytes]] = {}
    pos = 0
    while True:
        while raw[pos:pos + 6] != b"070701":  # concatenated archives are padded between each other
            assert raw[pos:pos + 1] == b"\0"
            pos += 1
        f = [int(raw[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        name = raw[pos + 110: pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        data = raw[pos:pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            if pos >= len(raw) or not raw[pos:].strip(b"\0"):
                return out
            continue
        out[name] = (mode, data)


def test_cpio_and_initrd_with_addon(tmp_path: Path) -> None:
    c = guest_image.Cpio()
    c.file("usr/bin/tool", b"\x7fELF", 0o755)
    c.symlink("bin/sh", "busybox")
    c.chardev("dev/console", 5, 1)
    entries = _read_cpio(c.finish())
    assert entries["usr/bin/tool"] == (stat.S_IFREG | 0o755, b"\x7fELF")
    assert stat.S_ISDIR(entries["usr"][0]) and stat.S_ISDIR(entries["usr/bin"][0])
    assert entries["bin/sh"] == (stat.S_IFLNK | 0o777, b"busybox")
    assert stat.S_ISCHR(entries["dev/console"][0])
    base = tmp_path / "initrd.base"
    base.write_bytes(gzip.compress(c.finish()))
    img = guest_image.GuestImage(tmp_path, tmp_path / "vmlinuz", base, {})
    out = img.initrd_with_addon(b"ADDON", tmp_path / "initrd")
    both = _read_cpio(gzip.decompress(out.read_bytes()))  # the kernel unpacks the members in order
    assert both[guest_image.ADDON_PATH] == (stat.S_IFREG | 0o644, b"ADDON")
    assert "usr/bin/tool" in both


def test_module_dependencies_from_modinfo() -> None:
    ko = b"\x7fELF...\0license=GPL\0depends=virtio,virtio_ring,virtio-pci-legacy-dev\0vermagic=6.1\0"
    assert guest_image._modinfo_depends(ko) == ["virtio", "virtio_ring", "virtio_pci_legacy_dev"]
    assert guest_image._modinfo_depends(b"\0depends=\0") == []
    assert guest_image._modinfo_depends(b"nothing") == []


def test_demo_waits_for_the_guests_own_request_in_the_journal(tmp_path: Path) -> None:
    from sim.guest_vm import RealGuestVm

    vm = VmDir.create(tmp_path / "vm", update_port=True)
    img = guest_image.GuestImage(tmp_path, tmp_path / "vmlinuz", tmp_path / "base", {})
    g = RealGuestVm(vm, img)
    j = Journal(vm.journal_path)
    assert g.wait_request(D2, 0, 0.3).status == "no request"
    vm.serial_log.write_text("firmgate-guest: the add-on's firmware is in force; not asking\n")
    assert g.wait_request(D2, 0, 0.3).status == "unchanged"
    # once the guest asked, only the journal's terminal record counts (the new boot's console may
    # already say "not asking" before host-install has committed)
    j.append("begin", "t" * 16, kind="install", new=D2, fwid="v2", old=D1, old_fwid="v1", launch=True)
    j.append("launched", "t" * 16, pid=1, accel="tcg")
    assert g.wait_request(D2, 0, 0.3).status == "no request"
    j.append("confirmed", "t" * 16, seconds=51.5, status="running")
    j.append("committed", "t" * 16, in_force=D2, fwid="v2", confirmed=True)
    out = g.wait_request(D2, 0, 0.3)
    assert out.status == "installed"
    assert out.result == {"fwid": "v2", "in_force": D2, "launched": True, "accel": "tcg", "boot_seconds": 51.5}
    assert g.wait_request(D2, 4, 0.3).status == "unchanged"  # records before `since` are not this request
