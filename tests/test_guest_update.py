"""`firmgate guest request-update` over a character device, as in a VM (a virtio-serial port):
a raw pty plays the port, its master end plays host-install listen's side."""
from __future__ import annotations

import os
import threading
import tty
from pathlib import Path

import pytest

from guest.errors import GuestError
from guest.update import request_update
from host_install.channel import ANSWER_MAGIC, PREFIX, REQUEST_MAGIC, encode_frame, handle_request
from host_install.install import current_firmware
from host_install.vm import VmDir
from sim.demo import _cli
from verifier.firmware.addon import build_addon

FW = "edk2-2022.11-OVMF.fd"


def _read_exact(fd: int, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def _host_side(master: int, vm: VmDir, seen: list[dict[str, object]]) -> None:
    import json
    magic, hlen, blen = PREFIX.unpack(_read_exact(master, PREFIX.size))
    assert magic == REQUEST_MAGIC
    header = json.loads(_read_exact(master, hlen))
    body = _read_exact(master, blen)
    seen.append(header)
    os.write(master, encode_frame(ANSWER_MAGIC, handle_request(vm, header, body, launch=False)))


@pytest.fixture()
def port() -> tuple[int, str]:
    master, slave = os.openpty()
    tty.setraw(slave)        # a virtio-serial port is a byte pipe: no line discipline
    yield master, os.ttyname(slave)
    os.close(master)
    os.close(slave)


def test_request_update_over_a_character_device(port: tuple[int, str], tmp_path: Path, firmware_dir: Path) -> None:
    master, path = port
    vm = VmDir.create(tmp_path / "vm", snp=True, launch_mode="plain", memory_mib=128)
    image = (firmware_dir / FW).read_bytes()
    addon = tmp_path / "fw.efi"
    addon.write_bytes(build_addon([("fw-a", image)]))
    seen: list[dict[str, object]] = []
    t = threading.Thread(target=_host_side, args=(master, vm, seen), daemon=True)
    t.start()
    code, text = _cli(["guest", "request-update", "--addon", str(addon), "--socket", path])
    t.join(30)
    assert code == 0, text
    assert seen == [{"version": 1, "op": "install", "fwid": None}]
    assert text.startswith("installed: firmware fw-a")
    assert current_firmware(vm).fwid == "fw-a"


def test_no_answer_times_out(port: tuple[int, str], tmp_path: Path) -> None:
    _, path = port
    with pytest.raises(GuestError, match="no answer from the host"):
        request_update(path, b"MZ" + b"\0" * 64, timeout=0.5)


def test_not_a_channel(tmp_path: Path) -> None:
    f = tmp_path / "plain"
    f.write_bytes(b"")
    with pytest.raises(GuestError, match="neither a virtio-serial port"):
        request_update(str(f), b"x")
    with pytest.raises(GuestError, match="no update channel"):
        request_update(str(tmp_path / "absent"), b"x")
