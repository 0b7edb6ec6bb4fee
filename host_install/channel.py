"""The update request channel: framed, size-bounded requests on a unix socket.

In production a virtio-serial port carries the same byte stream from the guest:
with `update_port = true` in vm.toml, QEMU gets a virtserialport named
org.firmgate.update whose chardev connects to <vm>/channel.sock, which
`host-install listen` serves (a unix socket client can use it directly, too).
One frame (all integers
little-endian, as in the .efifw header):

    offset  size        field
    0       4           magic: b"FGUR" (request) or b"FGUA" (answer)
    4       4           u32 header_len, 2 .. MAX_HEADER
    8       4           u32 body_len: request 0 .. MAX_BODY (the add-on), answer 0
    12      header_len  JSON object, UTF-8
    ...     body_len    the UKI add-on bytes

Request header: {"version": 1, "op": "install", "fwid": null | "<fwid>"}.
Answer header:  {"version": 1, "ok": bool, "exit_code": 0|1|2, "status": str,
                 "error": str | null, "hint": str | null, "result": {...} | null}.
A frame that breaks a bound is answered with exit_code 2 and the connection closed.

A connection may carry several frames, one after the other (QEMU's chardev
connection stays up for the VM's life and carries every request its guest
makes). Each connection is served by its own thread, so QEMU's silent
connection does not keep an operator's client waiting; installs stay serial (one
lock per listener, and the VM's flock against other host-install processes).
Once a frame's first byte has arrived, the WHOLE frame must arrive within
FRAME_DEADLINE seconds (not a per-read timeout: a peer trickling one byte at a
time is cut off at the deadline all the same).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

from verifier.errors import FirmgateError

from .errors import BootFailed, ChannelError, InstallFailed
from .listen_log import log_answer
from .vm import VmDir

REQUEST_MAGIC = b"FGUR"
ANSWER_MAGIC = b"FGUA"
PREFIX = struct.Struct("<4sII")
MAX_HEADER = 16 * 1024
MAX_BODY = 64 * 1024 * 1024  # the verifier's add-on limit (verifier.firmware.addon.MAX_ADDON_SIZE)
VERSION = 1
log = logging.getLogger(__name__)
FRAME_DEADLINE = 30.0        # seconds for a whole frame, from its first byte (64 MiB needs ~2 MB/s)
MAX_CONNECTIONS = 8          # QEMU's plus a few operators'; one more is answered "busy" and closed
LOCK_WAIT = 120.0            # a request waits this long for an install in progress (vm_lock)


def encode_frame(magic: bytes, header: dict[str, Any], body: bytes = b"") -> bytes:
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if len(head) > MAX_HEADER:
        raise ChannelError(f"frame header is {len(head)} bytes, above {MAX_HEADER}", "send a shorter header")
    if len(body) > MAX_BODY:
        raise ChannelError(f"add-on is {len(body)} bytes, above the channel limit of {MAX_BODY}",
                           "the add-on must be at most 64 MiB")
    return PREFIX.pack(magic, len(head), len(body)) + head + body


def _recv_exact(conn: socket.socket, n: int, deadline: float | None = None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        late = TimeoutError(f"frame not complete within {FRAME_DEADLINE:g}s of its first byte")
        if deadline is not None:  # the timeout of each read is what is left of the frame's time
            left = deadline - time.monotonic()
            if left <= 0:
                raise late
            conn.settimeout(left)
        try:
            chunk = conn.recv(min(n - len(buf), 1 << 20))
        except TimeoutError:
            if deadline is None:
                raise
            raise late from None
        if not chunk:
            raise ChannelError(f"peer closed the connection after {len(buf)} of {n} bytes",
                               "send the whole frame (docs/host.md)")
        buf += chunk
    return bytes(buf)


def read_frame(conn: socket.socket, magic: bytes, already: bytes = b"",
               deadline: float | None = None) -> tuple[dict[str, Any], bytes]:
    """Read one frame, checking every length before reading what it announces.

    `already` holds bytes of the prefix the caller has read (at most PREFIX.size).
    `deadline` (time.monotonic()): the whole frame must be in by then, else TimeoutError.
    """
    already = already[:PREFIX.size]
    got_magic, head_len, body_len = PREFIX.unpack(already + _recv_exact(conn, PREFIX.size - len(already),
                                                                        deadline))
    if got_magic != magic:
        raise ChannelError(f"bad frame magic {got_magic!r}, expected {magic!r}", "speak the frame of docs/host.md")
    if not 2 <= head_len <= MAX_HEADER:
        raise ChannelError(f"frame header_len {head_len} is outside 2..{MAX_HEADER}", "send a JSON object header")
    if body_len > MAX_BODY:
        raise ChannelError(f"frame body_len {body_len} is above {MAX_BODY}", "the add-on must be at most 64 MiB")
    try:
        header = json.loads(_recv_exact(conn, head_len, deadline).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nesting too deep
        raise ChannelError(f"frame header is not UTF-8 JSON: {exc}", "send a JSON object header") from exc
    if not isinstance(header, dict):
        raise ChannelError("frame header is not a JSON object", "send a JSON object header")
    return header, _recv_exact(conn, body_len, deadline)


def _answer_for_error(exc: FirmgateError) -> dict[str, Any]:
    result = getattr(exc, "result", None)
    return {"version": VERSION, "ok": False, "exit_code": exc.exit_code,
            "status": "rolled-back" if isinstance(exc, BootFailed) else "rejected" if exc.exit_code == 2 else "failed",
            "error": str(exc), "hint": getattr(exc, "hint", None) or None,
            "result": result.to_dict() if result is not None else None}


def handle_request(vm: VmDir, header: dict[str, Any], body: bytes, *, launch: bool = True) -> dict[str, Any]:
    """Run one request; always returns an answer header (never raises a FirmgateError)."""
    from .install import install

    try:
        version = header.get("version")
        # The integer 1 only: in Python true == 1 and 1.0 == 1, but neither is version 1.
        if type(version) is not int or version != VERSION:
            raise ChannelError(f"unsupported request version {str(version)[:32]!r}",
                               f"send version {VERSION} (a JSON integer)")
        if header.get("op") != "install":
            raise ChannelError(f"unknown op {header.get('op')!r}", 'the only op is "install"')
        fwid = header.get("fwid")
        if fwid is not None and (not isinstance(fwid, str) or not 0 < len(fwid) <= 256):
            raise ChannelError("fwid must be null or a string of 1..256 characters", "send the add-on's fwid")
        result = install(vm, body, fwid, launch=launch, lock_wait=LOCK_WAIT)
    except FirmgateError as exc:
        return _answer_for_error(exc)
    except Exception as exc:  # never let one request take the listener down; the journal has the state
        log.exception("install request failed")
        return _answer_for_error(InstallFailed(f"internal error: {type(exc).__name__}: {exc}",
                                               "see the listener's log; run `host-install status`"))
    return {"version": VERSION, "ok": True, "exit_code": 0, "status": result.status, "error": None,
            "hint": None, "result": result.to_dict()}


class Listener:
    """Serve <vm>/channel.sock: each connection in its own thread, installs one at a time."""

    def __init__(self, vm: VmDir, *, launch: bool = True, idle_timeout: float | None = None,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.vm = vm
        self.launch = launch
        # how long a connection may stay silent before a frame's first byte (None: forever, as
        # QEMU's virtio-serial chardev stays connected while the guest has nothing to say)
        self.idle_timeout = idle_timeout
        self.path = vm.channel_path
        self.sock = self._bind(self.path)
        # Installs from this listener queue here (the flock in install() refuses other processes).
        self._install_lock = threading.Lock()
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._done = threading.Condition()
        self._answered = 0
        self._conns: set[socket.socket] = set()

    @staticmethod
    def _bind(path: Path) -> socket.socket:
        if path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # stale socket of a listener that died
            else:
                raise InstallFailed(f"a listener already serves {path}", "stop it before starting another")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # socket file 0600: only the host's operator talks to it
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(MAX_CONNECTIONS)
        return sock

    def _next_answer(self, conn: socket.socket) -> tuple[dict[str, Any] | None, bool]:
        """Read one frame on `conn` and answer it: (answer or None when the peer left first, keep going)."""
        conn.settimeout(self.idle_timeout)
        try:
            first = conn.recv(1)
        except (TimeoutError, OSError):
            return None, False
        if not first:
            return None, False
        deadline = time.monotonic() + FRAME_DEADLINE  # the whole frame, however it is split
        keep = True
        body_len: int | None = None
        try:
            header, body = read_frame(conn, REQUEST_MAGIC, first, deadline)
        except ChannelError as exc:
            answer, keep = _answer_for_error(exc), False
        except (TimeoutError, OSError) as exc:
            answer, keep = _answer_for_error(ChannelError(f"request not received: {exc}", "resend the request")), False
        else:
            conn.settimeout(None)  # an install with a relaunch takes as long as the boot timeout
            body_len = len(body)
            with self._install_lock:
                answer = handle_request(self.vm, header, body, launch=self.launch)
        log_answer(answer, body_len)
        try:
            conn.sendall(encode_frame(ANSWER_MAGIC, answer))
        except OSError:
            keep = False  # the guest went away (a relaunch ends its QEMU); the journal has the outcome
        with self._done:
            self._answered += 1
            self._done.notify_all()
        return answer, keep

    def _serve_connection(self, conn: socket.socket, first_only: bool = False) -> dict[str, Any] | None:
        """Answer the frames of one connection until it closes, idles out or sends a bad frame.
        Returns the first answer (None: no frame came)."""
        first: dict[str, Any] | None = None
        with self._done:
            self._conns.add(conn)
        try:
            with conn:
                while True:
                    answer, keep = self._next_answer(conn)
                    if first is None:
                        first = answer
                    if not keep or first_only:
                        break
        finally:
            with self._done:
                self._conns.discard(conn)
        return first

    def serve_one(self) -> dict[str, Any] | None:
        """Serve one connection in this thread (its first frame only); None when it closed (or idled
        out) before sending a byte. `serve` is the listener proper."""
        conn, _ = self.sock.accept()
        return self._serve_connection(conn, first_only=True)

    def _connection_thread(self, conn: socket.socket) -> None:
        try:
            self._serve_connection(conn)
        except Exception:  # one connection must never take the listener down
            log.exception("update channel connection failed")
        finally:
            self._slots.release()

    def serve(self, max_requests: int | None = None) -> None:
        """Accept connections until `max_requests` frames were answered (None: forever)."""
        self.sock.settimeout(0.2)  # wake up to see whether the count is reached
        while True:
            with self._done:
                if max_requests is not None and self._answered >= max_requests:
                    return
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            if not self._slots.acquire(blocking=False):
                with conn:
                    conn.settimeout(5)
                    busy = ChannelError(f"the listener already serves {self.max_connections} connections",
                                        "retry when one of them has closed")
                    try:
                        conn.sendall(encode_frame(ANSWER_MAGIC, _answer_for_error(busy)))
                    except OSError:
                        pass
                continue
            threading.Thread(target=self._connection_thread, args=(conn,), daemon=True,
                             name="fg-channel-conn").start()

    def close(self) -> None:
        try:  # wakes a thread blocked in accept(): close() alone leaves it waiting for the next peer
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self._done:
            conns = list(self._conns)
        for conn in conns:  # wake the connection threads blocked in recv
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.path.unlink(missing_ok=True)


def request_update(socket_path: str | os.PathLike[str], addon_bytes: bytes, fwid: str | None = None,
                   timeout: float = 900.0) -> dict[str, Any]:
    """Send one install request and return the host's answer header (see the module docstring)."""
    frame = encode_frame(REQUEST_MAGIC, {"version": VERSION, "op": "install", "fwid": fwid}, addon_bytes)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(socket_path))
            sock.sendall(frame)
            header, _ = read_frame(sock, ANSWER_MAGIC)
        except (OSError, TimeoutError) as exc:
            raise InstallFailed(f"update channel {socket_path} failed: {exc}",
                                "is `host-install listen` running for this VM?") from exc
    return header
