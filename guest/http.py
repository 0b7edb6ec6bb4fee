"""A minimal KBS 0.4.0 HTTP client on the standard library (no `requests` dependency).

One `KbsSession` is one guest attestation: /auth sets the `kbs-session-id`
cookie, /attest and /resource send it back (the background-check mode), or a
resource request sends `Authorization: Bearer <token>` and no cookie (the
passport mode real CoCo pods use). Every non-200 answer is read as
`{"type", "detail"}` and raised as BrokerDenied with the broker's detail.
"""
from __future__ import annotations

import http.client
import json
import re
import ssl
from typing import Any
from urllib.parse import urlsplit

from .errors import BadResponse, BrokerDenied, BrokerUnreachable

PREFIX = "/kbs/v0"
COOKIE = "kbs-session-id"
MAX_BODY = 8 * 1024 * 1024       # a resource JWE or an error; never more
TIMEOUT = 60.0                   # the Trustee guest's HTTP timeout
USER_AGENT = "firmgate-guest/0.1"
_COOKIE_RE = re.compile(r"(?:^|[;,]\s*)kbs-session-id=([0-9a-f]{32})(?:;|$)")
_RESOURCE_PART = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def printable(text: str, limit: int = 2000) -> str:
    """The broker's text, safe for a terminal: control characters (escape sequences, newlines) shown as \\xNN."""
    text = text[:limit]
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def parse_resource_path(text: str) -> tuple[str, str, str]:
    parts = text.strip("/").split("/")
    if len(parts) != 3 or not all(_RESOURCE_PART.fullmatch(p) and p not in (".", "..") for p in parts):
        raise ValueError(f"resource {text!r} must be REPOSITORY/TYPE/TAG of [A-Za-z0-9._-]")
    return parts[0], parts[1], parts[2]


class KbsSession:
    def __init__(self, broker_url: str, *, timeout: float = TIMEOUT, cafile: str | None = None) -> None:
        u = urlsplit(broker_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"broker URL {broker_url!r} must be http(s)://HOST[:PORT]")
        self.scheme, self.host, self.port = u.scheme, u.hostname, u.port
        self.base = u.path.rstrip("/")
        self.timeout = timeout
        self.cafile = cafile
        self.cookie: str | None = None
        self.url = broker_url

    def _conn(self) -> http.client.HTTPConnection:
        if self.scheme == "https":
            ctx = ssl.create_default_context(cafile=self.cafile)
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=ctx)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def request(self, step: str, method: str, path: str, body: Any = None, *, bearer: str | None = None,
                send_cookie: bool = True) -> Any:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        if send_cookie and self.cookie:
            headers["Cookie"] = f"{COOKIE}={self.cookie}"
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        conn = self._conn()
        try:
            conn.request(method, self.base + PREFIX + path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read(MAX_BODY + 1)
            status = resp.status
            for value in resp.headers.get_all("Set-Cookie") or []:
                m = _COOKIE_RE.search(value)
                if m:
                    self.cookie = m.group(1)
        except (OSError, http.client.HTTPException) as exc:
            raise BrokerUnreachable(f"{step}: broker {self.url} unreachable: {exc}") from exc
        finally:
            conn.close()
        if len(raw) > MAX_BODY:
            raise BadResponse(f"{step}: broker answer is larger than {MAX_BODY} bytes")
        try:
            obj = json.loads(raw.decode("utf-8")) if raw else None
        except (UnicodeDecodeError, ValueError, RecursionError):
            obj = None
        if status == 200:
            if obj is None:
                raise BadResponse(f"{step}: broker answered 200 without a JSON body")
            return obj
        if isinstance(obj, dict) and isinstance(obj.get("type"), str) and isinstance(obj.get("detail"), str):
            variant = printable(obj["type"].rsplit("/", 1)[-1], 64)
            raise BrokerDenied(step, status, variant, printable(obj["detail"]))
        raise BrokerUnreachable(f"{step}: broker answered HTTP {status} without a KBS error body "
                                f"({raw[:120]!r})")
