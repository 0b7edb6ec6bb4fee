"""The host's update listener under a trickling peer (docs/security.md, review item 8). Prints a table.

A real `host-install listen --no-launch` (subprocess) on a fresh VM directory; peer A sends
an install frame one byte every `--interval` seconds (20 s in the review); peer B (an
operator) connects one second later and sends a whole request; peer C connects and stays
silent, as QEMU's chardev connection does. Measured: when A and B get their answers.

Run: .venv/bin/python bench/channel_trickle.py [--interval 20]   (needs ../shared/firmware; ~35 s)
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from host_install.channel import (
    ANSWER_MAGIC,
    FRAME_DEADLINE,
    REQUEST_MAGIC,
    encode_frame,
    read_frame,
    request_update,
)
from host_install.vm import VmDir
from verifier.firmware.addon import build_addon

FIRMWARE = Path(os.environ.get("FIRMGATE_SHARED", REPO.parent / "shared")) / "firmware"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interval", type=float, default=20.0, help="seconds between the trickler's bytes")
    args = ap.parse_args()
    addon = build_addon([("fw", (FIRMWARE / "edk2-2026.08-OVMF.amdsev.fd").read_bytes())])
    with tempfile.TemporaryDirectory(prefix="fg-trickle-") as d:
        vm = VmDir.create(Path(d) / "vm", snp=True)
        proc = subprocess.Popen([sys.executable, "-m", "host_install.cli", "listen", "--vm", str(vm.path),
                                 "--no-launch"], cwd=REPO, stdout=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.stdout is not None
        proc.stdout.readline()  # "listening on ..."
        t0 = time.monotonic()
        times: dict[str, float] = {}
        results: dict[str, str] = {}

        def trickler() -> None:
            frame = encode_frame(REQUEST_MAGIC, {"version": 1, "op": "install", "fwid": None}, addon)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(vm.channel_path))
                s.settimeout(args.interval)
                for i, byte in enumerate(frame):
                    try:
                        s.sendall(bytes([byte]))
                        header, _ = read_frame(s, ANSWER_MAGIC)  # waits up to one interval
                    except TimeoutError:
                        continue
                    except OSError as exc:
                        results["A"] = f"connection closed after {i + 1} bytes: {exc}"
                        break
                    results["A"] = f"exit_code {header['exit_code']}: {header['error']} (after {i + 1} bytes)"
                    break
            times["A"] = time.monotonic() - t0

        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(str(vm.channel_path))  # QEMU's chardev: connected, nothing to say
        a = threading.Thread(target=trickler)
        a.start()
        time.sleep(1.0)
        tb = time.monotonic()
        answer = request_update(vm.channel_path, addon, timeout=300)
        times["B"] = time.monotonic() - t0
        results["B"] = f"{answer['status']} (answered {1000 * (times['B'] - (tb - t0)):.0f} ms after it connected)"
        a.join()
        silent.close()
        proc.terminate()
        proc.wait(10)
    print(f"host-install listen, frame deadline {FRAME_DEADLINE:g}s; trickler: 1 byte every {args.interval:g}s; "
          "one silent connection held open throughout")
    print(f"{'peer':<34} {'answered at (s)':>15}  answer")
    print(f"{'A trickler (starts at 0 s)':<34} {times['A']:>15.1f}  {results.get('A')}")
    print(f"{'B operator request (at 1 s)':<34} {times['B']:>15.1f}  {results['B']}")


if __name__ == "__main__":
    main()
