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
"""
from __future__ import annotations

import json
import logging
import os
import socket
import struct
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
READ_TIMEOUT = 30.0          # a peer that stalls mid-frame is dropped


def encode_frame(magic: bytes, header: dict[str, Any], body: bytes = b"") -> bytes:
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if len(head) > MAX_HEADER:
        raise ChannelError(f"frame header is {len(head)} bytes, above {MAX_HEADER}", "send a shorter header")
    if len(body) > MAX_BODY:
        raise ChannelError(f"add-on is {len(body)} bytes, above the channel limit of {MAX_BODY}",
                           "the add-on must be at most 64 MiB")
    return PREFIX.pack(magic, len(head), len(body)) + head + body


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ChannelError(f"peer closed the connection after {len(buf)} of {n} bytes",
                               "send the whole frame (docs/host.md)")
        buf += chunk
    return bytes(buf)


def read_frame(conn: socket.socket, magic: bytes, already: bytes = b"") -> tuple[dict[str, Any], bytes]:
    """Read one frame, checking every length before reading what it announces.

    `already` holds bytes of the prefix the caller has read (at most PREFIX.size).
    """
    already = already[:PREFIX.size]
    got_magic, head_len, body_len = PREFIX.unpack(already + _recv_exact(conn, PREFIX.size - len(already)))
    if got_magic != magic:
        raise ChannelError(f"bad frame magic {got_magic!r}, expected {magic!r}", "speak the frame of docs/host.md")
    if not 2 <= head_len <= MAX_HEADER:
        raise ChannelError(f"frame header_len {head_len} is outside 2..{MAX_HEADER}", "send a JSON object header")
    if body_len > MAX_BODY:
        raise ChannelError(f"frame body_len {body_len} is above {MAX_BODY}", "the add-on must be at most 64 MiB")
    try:
        header = json.loads(_recv_exact(conn, head_len).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nesting too deep
        raise ChannelError(f"frame header is not UTF-8 JSON: {exc}", "send a JSON object header") from exc
    if not isinstance(header, dict):
        raise ChannelError("frame header is not a JSON object", "send a JSON object header")
    return header, _recv_exact(conn, body_len)


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
        if header.get("version") != VERSION:
            raise ChannelError(f"unsupported request version {header.get('version')!r}", f"send version {VERSION}")
        if header.get("op") != "install":
            raise ChannelError(f"unknown op {header.get('op')!r}", 'the only op is "install"')
        fwid = header.get("fwid")
        if fwid is not None and (not isinstance(fwid, str) or not 0 < len(fwid) <= 256):
            raise ChannelError("fwid must be null or a string of 1..256 characters", "send the add-on's fwid")
        result = install(vm, body, fwid, launch=launch)
    except FirmgateError as exc:
        return _answer_for_error(exc)
    except Exception as exc:  # never let one request take the listener down; the journal has the state
        log.exception("install request failed")
        return _answer_for_error(InstallFailed(f"internal error: {type(exc).__name__}: {exc}",
                                               "see the listener's log; run `host-install status`"))
    return {"version": VERSION, "ok": True, "exit_code": 0, "status": result.status, "error": None,
            "hint": None, "result": result.to_dict()}


class Listener:
    """Serve <vm>/channel.sock; one request at a time (installs on a VM are serialized anyway)."""

    def __init__(self, vm: VmDir, *, launch: bool = True, idle_timeout: float | None = None) -> None:
        self.vm = vm
        self.launch = launch
        # how long a connection may stay silent before its first byte (None: forever, as
        # QEMU's virtio-serial chardev stays connected while the guest has nothing to say)
        self.idle_timeout = idle_timeout
        self.path = vm.channel_path
        self.sock = self._bind(self.path)

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
        sock.listen(4)
        return sock

    def serve_one(self) -> dict[str, Any] | None:
        """Serve one connection; None when it closed (or idled out) before sending a byte."""
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(self.idle_timeout)
            try:
                first = conn.recv(1)
            except (TimeoutError, OSError):
                return None
            if not first:
                return None
            conn.settimeout(READ_TIMEOUT)  # once a frame has started, a stalled peer is dropped
            body_len: int | None = None
            try:
                header, body = read_frame(conn, REQUEST_MAGIC, first)
            except ChannelError as exc:
                answer = _answer_for_error(exc)
            except (TimeoutError, OSError) as exc:
                answer = _answer_for_error(ChannelError(f"request not received: {exc}", "resend the request"))
            else:
                conn.settimeout(None)  # an install with a relaunch takes as long as the boot timeout
                body_len = len(body)
                answer = handle_request(self.vm, header, body, launch=self.launch)
            log_answer(answer, body_len)
            try:
                conn.sendall(encode_frame(ANSWER_MAGIC, answer))
            except OSError:
                pass  # the guest went away; the journal has the outcome
        return answer

    def serve(self, max_requests: int | None = None) -> None:
        n = 0
        while max_requests is None or n < max_requests:
            if self.serve_one() is not None:
                n += 1

    def close(self) -> None:
        try:  # wakes a thread blocked in accept(): close() alone leaves it waiting for the next peer
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
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
