"""The guest's side of the host's update channel (docs/host.md, "The request channel").

In a VM the channel is a virtio-serial port (a character device such as
/dev/virtio-ports/org.firmgate.update) whose host end is connected to
`host-install listen`; on the host itself, or in tests, it is the unix socket
<vm>/channel.sock. Same frames either way: host_install.channel's encoder and
bounded reader are reused, over a file descriptor for the character device.
"""
from __future__ import annotations

import os
import select
import stat
from typing import Any

from host_install.channel import ANSWER_MAGIC, REQUEST_MAGIC, VERSION, encode_frame, read_frame
from host_install.channel import request_update as _request_update_socket

from .errors import GuestError

TIMEOUT = 900.0   # an install relaunches and confirms a boot: minutes, not seconds


class _FdConn:
    """`recv(n)` over a character device, with a deadline (what read_frame needs of a socket)."""

    def __init__(self, fd: int, timeout: float) -> None:
        self.fd, self.timeout = fd, timeout

    def recv(self, n: int) -> bytes:
        ready, _, _ = select.select([self.fd], [], [], self.timeout)
        if not ready:
            raise GuestError(f"no answer from the host within {self.timeout:.0f}s")
        return os.read(self.fd, n)


def request_update(path: str, addon: bytes, fwid: str | None = None, *, timeout: float = TIMEOUT) -> dict[str, Any]:
    """Send one install request on the channel at `path` and return the host's answer header."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise GuestError(f"no update channel at {path}: {exc.strerror or exc} "
                         "(is the virtio-serial port configured and `host-install listen` running?)") from exc
    if stat.S_ISSOCK(st.st_mode):
        return _request_update_socket(path, addon, fwid, timeout=timeout)
    if not stat.S_ISCHR(st.st_mode):
        raise GuestError(f"{path} is neither a virtio-serial port (character device) nor a unix socket")
    frame = encode_frame(REQUEST_MAGIC, {"version": VERSION, "op": "install", "fwid": fwid}, addon)
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    try:
        view = memoryview(frame)
        while view:
            view = view[os.write(fd, view):]
        header, _ = read_frame(_FdConn(fd, timeout), ANSWER_MAGIC)  # type: ignore[arg-type]
        return header
    except OSError as exc:
        raise GuestError(f"update channel {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
