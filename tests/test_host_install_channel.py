"""The update request channel: frame bounds, the listener, request_update (no QEMU: --no-launch)."""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_install import channel
from host_install.channel import (ANSWER_MAGIC, MAX_BODY, MAX_HEADER, REQUEST_MAGIC, Listener, encode_frame,
                                  read_frame, request_update)
from host_install.errors import ChannelError, InstallFailed
from host_install.install import current_firmware
from host_install.vm import VmDir
from verifier.firmware.addon import build_addon

REPO = Path(__file__).resolve().parent.parent
FW_2026 = "edk2-2026.08-OVMF.amdsev.fd"


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.settimeout(5)
    return a, b


def test_frame_round_trip() -> None:
    a, b = _pair()
    with a, b:
        a.sendall(encode_frame(REQUEST_MAGIC, {"version": 1, "op": "install", "fwid": "x"}, b"\x01\x02"))
        header, body = read_frame(b, REQUEST_MAGIC)
    assert header == {"version": 1, "op": "install", "fwid": "x"} and body == b"\x01\x02"


@pytest.mark.parametrize("raw, why", [
    (struct.pack("<4sII", b"XXXX", 2, 0) + b"{}", "bad frame magic"),
    (struct.pack("<4sII", REQUEST_MAGIC, 0, 0), "header_len 0 is outside"),
    (struct.pack("<4sII", REQUEST_MAGIC, MAX_HEADER + 1, 0), f"header_len {MAX_HEADER + 1} is outside"),
    # the body length is refused before a single body byte is read
    (struct.pack("<4sII", REQUEST_MAGIC, 2, MAX_BODY + 1) + b"{}", f"body_len {MAX_BODY + 1} is above"),
    (struct.pack("<4sII", REQUEST_MAGIC, 4, 0) + b"\xff\xfe{}", "not UTF-8 JSON"),
    (struct.pack("<4sII", REQUEST_MAGIC, 2, 0) + b"[]", "not a JSON object"),
    (struct.pack("<4sII", REQUEST_MAGIC, 2, 10) + b"{}abc", "peer closed the connection after 3 of 10"),
    (b"FG", "after 2 of 12 bytes"),
])
def test_bad_frames_are_refused(raw: bytes, why: str) -> None:
    a, b = _pair()
    with a, b:
        a.sendall(raw)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(ChannelError, match=why) as e:
            read_frame(b, REQUEST_MAGIC)
    assert e.value.exit_code == 2 and e.value.hint


def test_encode_refuses_oversized(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel, "MAX_BODY", 16)
    with pytest.raises(ChannelError, match="above the channel limit"):
        encode_frame(REQUEST_MAGIC, {}, b"x" * 17)
    with pytest.raises(ChannelError, match="frame header is"):
        encode_frame(REQUEST_MAGIC, {"k": "v" * MAX_HEADER})


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[VmDir, list[dict[str, Any]]]]:
    vm = VmDir.create(tmp_path / "vm", snp=True)
    listener = Listener(vm, launch=False)
    answers: list[dict[str, Any]] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                answer = listener.serve_one()
            except OSError:
                return
            if answer is not None:
                answers.append(answer)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield vm, answers
    finally:
        stop.set()
        listener.sock.shutdown(socket.SHUT_RDWR)
        listener.close()
        t.join(5)


def test_request_update_installs_and_reports_errors(served: tuple[VmDir, list[dict[str, Any]]],
                                                    firmware_dir: Path) -> None:
    vm, answers = served
    assert (vm.channel_path.stat().st_mode & 0o777) == 0o600
    data = (firmware_dir / FW_2026).read_bytes()
    addon = build_addon([("edk2-2026.08", data)])
    ok = request_update(vm.channel_path, addon)
    assert ok["ok"] is True and ok["exit_code"] == 0 and ok["status"] == "installed"
    assert ok["result"]["fwid"] == "edk2-2026.08" and ok["result"]["launched"] is False
    assert current_firmware(vm).data == data
    unknown = request_update(vm.channel_path, addon, fwid="nope")
    assert unknown["ok"] is False and unknown["exit_code"] == 2 and unknown["status"] == "rejected"
    assert "no firmware with fwid 'nope'" in unknown["error"] and unknown["hint"]
    junk = request_update(vm.channel_path, b"not a PE file")
    assert junk["exit_code"] == 2 and "add-on rejected" in junk["error"]
    # a hostile raw frame gets an error answer, and the listener keeps serving
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(vm.channel_path))
        s.sendall(struct.pack("<4sII", REQUEST_MAGIC, 2, MAX_BODY + 1) + b"{}")
        header, body = read_frame(s, ANSWER_MAGIC)
    assert header["exit_code"] == 2 and "body_len" in header["error"] and body == b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(vm.channel_path))
        s.sendall(encode_frame(REQUEST_MAGIC, {"version": 9, "op": "install"}))
        header, _ = read_frame(s, ANSWER_MAGIC)
    assert header["exit_code"] == 2 and "unsupported request version" in header["error"]
    # a connection that closes without a byte gets no answer and is not counted
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(vm.channel_path))
    again = request_update(vm.channel_path, addon)
    assert again["ok"] and again["status"] == "unchanged"
    deadline = time.monotonic() + 5  # the listener records an answer just after sending it
    while len(answers) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [a["exit_code"] for a in answers] == [0, 2, 2, 2, 2, 0]


def test_second_listener_is_refused(served: tuple[VmDir, list[dict[str, Any]]]) -> None:
    vm, _ = served
    with pytest.raises(InstallFailed, match="already serves"):
        Listener(vm, launch=False)


def test_request_update_without_listener(tmp_path: Path) -> None:
    with pytest.raises(InstallFailed, match="No such file") as e:
        request_update(tmp_path / "none.sock", b"x")


def test_listen_command(tmp_path: Path, firmware_dir: Path) -> None:
    vm = VmDir.create(tmp_path / "vm", snp=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "host_install.cli", "listen", "--vm", str(vm.path),
                             "--no-launch", "--max-requests", "1"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert b"listening on" in proc.stdout.readline()
        answer = request_update(vm.channel_path, build_addon([("fw", (firmware_dir / FW_2026).read_bytes())]))
        assert answer["ok"] and answer["result"]["fwid"] == "fw"
        assert proc.wait(30) == 0
        assert not vm.channel_path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for f in (proc.stdout, proc.stderr):
            if f:
                f.close()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64) | st.builds(
    lambda h, b, rest: struct.pack("<4sII", REQUEST_MAGIC, h, b) + rest,
    st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.binary(max_size=64)))
def test_read_frame_fails_closed_on_any_bytes(raw: bytes) -> None:
    """Whatever a guest sends, the reader returns a frame or raises ChannelError, nothing else."""
    a, b = _pair()
    with a, b:
        a.sendall(raw)
        a.shutdown(socket.SHUT_WR)
        try:
            header, body = read_frame(b, REQUEST_MAGIC)
        except ChannelError as exc:
            assert exc.exit_code == 2
        else:
            assert isinstance(header, dict) and len(body) <= MAX_BODY


def test_idle_connection_times_out_silently(tmp_path: Path) -> None:
    vm = VmDir.create(tmp_path / "vm")
    listener = Listener(vm, launch=False, idle_timeout=0.2)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(vm.channel_path))
            assert listener.serve_one() is None
            s.settimeout(2)
            assert s.recv(16) == b""  # closed without an answer
    finally:
        listener.close()


def test_stalled_frame_is_answered_with_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel, "FRAME_DEADLINE", 0.2)
    vm = VmDir.create(tmp_path / "vm")
    listener = Listener(vm, launch=False)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(vm.channel_path))
            s.sendall(REQUEST_MAGIC + b"\x02")  # a frame that starts, then stalls
            answer = listener.serve_one()
            assert answer is not None and answer["exit_code"] == 2 and "not received" in answer["error"]
            s.settimeout(2)
            header, _ = read_frame(s, ANSWER_MAGIC)
            assert header == answer
    finally:
        listener.close()


# -- review item 8 (docs/security.md REVIEW-8): whole-frame deadline, connections served concurrently ----
@pytest.fixture()
def listening(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[VmDir]:
    """`Listener.serve()` (what `host-install listen` runs) in a thread, with a 1.5 s frame deadline."""
    monkeypatch.setattr(channel, "FRAME_DEADLINE", 1.5)
    vm = VmDir.create(tmp_path / "vm", snp=True)
    listener = Listener(vm, launch=False)
    t = threading.Thread(target=listener.serve, daemon=True)
    t.start()
    try:
        yield vm
    finally:
        listener.close()
        t.join(5)


def test_a_trickled_frame_is_cut_off_at_the_whole_frame_deadline(listening: VmDir) -> None:
    """One byte every 0.3 s: each read is quick, but the frame as a whole misses its deadline; before
    the fix (a per-read timeout) this frame was read to its end, however long it took."""
    frame = encode_frame(REQUEST_MAGIC, {"version": 1, "op": "install", "fwid": None}, b"x" * 64)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(listening.channel_path))
        sent = 0
        for byte in frame:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break  # the listener closed the connection: it gave up on the frame
            sent += 1
            ready = s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) if _readable(s) else b""
            if ready:
                break
            time.sleep(0.3)
        header, _ = read_frame(s, ANSWER_MAGIC)
    assert header["exit_code"] == 2 and "not complete within 1.5s" in header["error"], header
    assert sent < len(frame)  # answered long before the trickle would have ended


def _readable(s: socket.socket) -> bool:
    import select
    return bool(select.select([s], [], [], 0)[0])


def test_a_silent_connection_and_a_trickler_do_not_hold_up_an_operator(listening: VmDir,
                                                                      firmware_dir: Path) -> None:
    """QEMU's chardev connection stays open and silent; a second peer trickles; an operator's
    request on the same socket is answered meanwhile (before the fix it hung behind the first)."""
    addon = build_addon([("edk2-2026.08", (firmware_dir / FW_2026).read_bytes())])
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as qemu_like, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as trickler:
        qemu_like.connect(str(listening.channel_path))
        trickler.connect(str(listening.channel_path))
        trickler.sendall(REQUEST_MAGIC[:2])
        answer = request_update(listening.channel_path, addon, timeout=20)
        assert answer["ok"] and answer["status"] == "installed", answer
        # the silent connection still works afterwards, for several frames in a row (as QEMU's does)
        qemu_like.settimeout(20)
        for status in ("unchanged", "unchanged"):
            qemu_like.sendall(encode_frame(REQUEST_MAGIC, {"version": 1, "op": "install", "fwid": None}, addon))
            header, _ = read_frame(qemu_like, ANSWER_MAGIC)
            assert header["ok"] and header["status"] == status, header


def test_concurrent_installs_are_serial_not_refused(listening: VmDir, firmware_dir: Path) -> None:
    """Two operators at once: both answered, neither sees "another host-install is working" (the
    listener queues them; the flock still refuses other processes), and the journal's two
    transactions do not interleave."""
    from host_install.journal import Journal
    images = [(firmware_dir / FW_2026).read_bytes(), (firmware_dir / "edk2-2025.02-OVMF.fd").read_bytes()]
    answers: list[dict[str, Any]] = []

    def ask(data: bytes, fwid: str) -> None:
        answers.append(request_update(listening.channel_path, build_addon([(fwid, data)]), timeout=60))

    threads = [threading.Thread(target=ask, args=(data, f"fw{i}")) for i, data in enumerate(images)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(a["status"] for a in answers) == ["installed", "installed"], answers
    txs = [r["tx"] for r in Journal(listening.journal_path).records() if r.get("tx")]
    assert len(set(txs)) == 2
    first = txs[0]
    assert txs[:txs.count(first)] == [first] * txs.count(first)  # one transaction, then the other


def test_listen_answers_busy_past_max_connections(tmp_path: Path) -> None:
    vm = VmDir.create(tmp_path / "vm", snp=True)
    listener = Listener(vm, launch=False, max_connections=1)
    t = threading.Thread(target=listener.serve, daemon=True)
    t.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as held, \
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as extra:
            held.connect(str(vm.channel_path))
            time.sleep(0.5)  # let the listener take the first connection
            extra.settimeout(10)
            extra.connect(str(vm.channel_path))
            header, _ = read_frame(extra, ANSWER_MAGIC)
        assert header["exit_code"] == 2 and "already serves 1 connections" in header["error"]
    finally:
        listener.close()
        t.join(5)
