"""`host-install listen` logs every request it served; Listener.close() wakes a thread in accept()."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from host_install.channel import Listener, request_update
from host_install.vm import VmDir
from verifier.firmware.addon import build_addon

REPO = Path(__file__).resolve().parent.parent
FW_2026 = "edk2-2026.08-OVMF.amdsev.fd"


def test_listen_logs_each_request_with_its_outcome(tmp_path: Path, firmware_dir: Path) -> None:
    vm = VmDir.create(tmp_path / "vm", snp=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "host_install.cli", "listen", "--vm", str(vm.path),
                             "--no-launch", "--max-requests", "3"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and "listening on" in proc.stdout.readline()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # not a frame at all
            s.connect(str(vm.channel_path))
            s.sendall(b"GET / HTTP/1.1\r\n\r\n")
            s.recv(4096)
        bad = request_update(vm.channel_path, b"not an add-on")
        good = request_update(vm.channel_path, build_addon([("fw", (firmware_dir / FW_2026).read_bytes())]))
        assert not bad["ok"] and good["ok"]
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    lines = [ln for ln in err.splitlines() if ln.startswith("host-install listen: ")]
    assert len(lines) == 3, err
    assert "request refused: bad frame magic" in lines[0] and lines[0].endswith("(exit 2)")
    assert "request (13 bytes) refused:" in lines[1] and "(exit 2)" in lines[1]
    assert lines[2].startswith("host-install listen: request (fwid 'fw', ")
    assert "accepted: installed, firmware in force sha384:" in lines[2] and lines[2].endswith("exit 0")


def test_close_wakes_a_thread_waiting_in_accept(tmp_path: Path) -> None:
    listener = Listener(VmDir.create(tmp_path / "vm"))
    done = threading.Event()

    def serve() -> None:
        try:
            listener.serve_one()
        except OSError:
            done.set()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    time.sleep(0.2)  # the thread is in accept()
    start = time.monotonic()
    listener.close()
    t.join(3)
    assert done.is_set() and not t.is_alive()
    assert time.monotonic() - start < 1.0
    assert not listener.path.exists()
