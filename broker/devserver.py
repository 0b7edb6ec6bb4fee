"""`firmgate serve`: the broker app on werkzeug's development server.

The socket is bound here, before anything is printed, so a port in use is one error line (exit 2) and
the banner only appears once the broker really listens. Redirected logs (a file, journald) get no ANSI
colour codes: werkzeug colours its access log unconditionally.
"""
from __future__ import annotations

import logging
import re
import socket
import sys
from typing import Any, TextIO

from verifier.errors import UsageError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _NoColour(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "\x1b" in message:
            record.msg, record.args = _ANSI.sub("", message), None
        return True


def plain_werkzeug_logs(stream: TextIO) -> None:
    """Strip werkzeug's colour codes unless its log goes to a terminal."""
    logger = logging.getLogger("werkzeug")
    if not stream.isatty() and not any(isinstance(f, _NoColour) for f in logger.filters):
        logger.addFilter(_NoColour())


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, or a UsageError naming why not."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise UsageError(f"--host {host}: cannot resolve it ({exc})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve(sock: socket.socket, app: Any, host: str, banner: str, stream: TextIO | None = None) -> None:
    """Serve on a socket from bind(): print the banner (with the real port), then serve until interrupted."""
    from werkzeug.serving import make_server

    out = stream if stream is not None else sys.stderr
    plain_werkzeug_logs(out)
    server = make_server(host, sock.getsockname()[1], app, threaded=True, fd=sock.fileno())
    real_port = server.socket.getsockname()[1]
    print(banner.format(url=f"http://{host}:{real_port}"), file=out, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        sock.close()
