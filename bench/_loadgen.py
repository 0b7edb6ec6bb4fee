"""The lean KBS guest load generator behind bench/broker.py, and the no-op app for the HTTP floor.

The load generator shares the machine's cores with the server, so every client
microsecond is a microsecond the broker does not get. This client therefore
keeps one keep-alive TCP connection (TCP_NODELAY) per process, writes requests
as bytes and parses answers minimally (status line, Content-Length,
Set-Cookie), and precomputes everything that does not depend on the nonce.

It still does per handshake what an unmodified Trustee guest does (KBS-FACTS
sections 2-5): a fresh P-256 tee key, /auth, a freshly signed report whose
REPORT_DATA is SHA-384(JCS(runtime-data)) zero-padded to 64 bytes, /attest with
the SnpEvidence JSON, /resource with the cookie (or the token as a Bearer, like
the CoCo CDH), then the JWE checks the guest makes (`guest.keys.validate_jwe`)
and the decryption: ECDH-ES + Concat KDF (RFC 7518 4.6) + AES key unwrap
(RFC 3394) + A256GCM, all with `cryptography`, and a check that the secret is
the stored one.

The no-op app (`noop_app()`) answers the same three routes with fixed JSON
bodies of the same shape after reading the request body; gunicorn serves it with
the same command line as the broker so that the pair of runs gives the HTTP
floor: what this client and this server stack reach when the broker does nothing.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import rfc8785
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap

from broker.jwe import ECDH_ALG, b64url, b64url_decode, concat_kdf

MAX_HEAD = 16 * 1024          # status line + headers; the broker's are < 1 KB
MAX_BODY = 1024 * 1024        # the largest answer is the resource JWE (secrets are small here)
SECRET_PATH = "bench/key/disk"
SECRET = b"bench-secret"
COOKIE = "kbs-session-id"


class HandshakeError(Exception):
    """One handshake did not end with the right secret (counted as an error, the bench exits 1)."""


class ProtocolError(HandshakeError):
    """The server's HTTP answer is outside what this minimal client accepts (chunked, no length, ...)."""


# -- HTTP/1.1 over one keep-alive connection -------------------------------------------------
@dataclass
class Response:
    status: int
    body: bytes
    cookie: str | None       # "name=value" of the (last) Set-Cookie, attributes dropped


class Connection:
    """One persistent HTTP/1.1 connection to 127.0.0.1:port.

    Only Content-Length bodies are accepted: a chunked answer or one without a
    length raises ProtocolError. `Connection: close` from the server is legal; the
    socket is reopened before the next request and counted in `reconnects`.
    """

    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        self.reconnects = 0     # reopened after the server closed (or after an error)
        self.cycles = 0         # closed on purpose by the client (--reconnect-every)
        self.host = f"Host: 127.0.0.1:{port}\r\n".encode("ascii")

    def _open(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf.clear()
        return s

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.buf.clear()

    def cycle(self) -> None:
        """Close on purpose; the next request opens a new connection (it may land on another worker)."""
        if self.sock is not None:
            self.close()
            self.cycles += 1

    def reopen_after_error(self) -> None:
        """After a failed exchange the stream position is unknown: start a new connection."""
        if self.sock is not None:
            self.close()
            self.reconnects += 1

    def request(self, method: bytes, path: bytes, headers: bytes = b"", body: bytes | None = None) -> Response:
        if self.sock is None:
            self.sock = self._open()
        head = b"%s %s HTTP/1.1\r\n%s%s" % (method, path, self.host, headers)
        if body is not None:
            head += b"Content-Length: %d\r\n" % len(body)
        self.sock.sendall(head + b"\r\n" + (body or b""))
        return self._read_response()

    def _fill(self) -> None:
        if self.sock is None:
            raise ProtocolError("no connection")
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ProtocolError("server closed the connection mid-response")
        self.buf += chunk

    def _read_response(self) -> Response:
        end = self.buf.find(b"\r\n\r\n")
        while end < 0:
            if len(self.buf) > MAX_HEAD:
                raise ProtocolError(f"response head longer than {MAX_HEAD} bytes")
            self._fill()
            end = self.buf.find(b"\r\n\r\n")
        lines = bytes(self.buf[:end]).split(b"\r\n")
        del self.buf[:end + 4]
        status_line = lines[0].split(b" ", 2)
        if len(status_line) < 2 or status_line[0] != b"HTTP/1.1" or not status_line[1].isdigit():
            raise ProtocolError(f"bad status line {lines[0][:80]!r}")
        status = int(status_line[1])
        length: int | None = None
        cookie: str | None = None
        close = False
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ProtocolError(f"bad header line {line[:80]!r}")
            name = name.strip().lower()
            value = value.strip()
            if name == b"content-length":
                if not value.isdigit() or length is not None:
                    raise ProtocolError(f"bad or repeated Content-Length {value[:20]!r}")
                length = int(value)
            elif name == b"transfer-encoding":
                raise ProtocolError(f"Transfer-Encoding {value[:20]!r}: this client reads Content-Length only")
            elif name == b"set-cookie":
                cookie = value.split(b";", 1)[0].decode("latin-1")
            elif name == b"connection":
                close = value.lower() == b"close"
        if length is None:
            raise ProtocolError(f"HTTP {status} without Content-Length")
        if length > MAX_BODY:
            raise ProtocolError(f"body of {length} bytes is over the {MAX_BODY} bound")
        while len(self.buf) < length:
            self._fill()
        body = bytes(self.buf[:length])
        del self.buf[:length]
        if close:
            self.close()
            self.reconnects += 1
        return Response(status, body, cookie)


# -- the guest ----------------------------------------------------------------------------------
_BYTE_TEXT = [str(i) for i in range(256)]


def _json_bytes(data: bytes) -> str:
    """A byte field as serde serialises `[u8; N]`: a JSON array of integers (KBS-FACTS section 1)."""
    return "[" + ",".join([_BYTE_TEXT[b] for b in data]) + "]"


class EvidenceTemplate:
    """The SnpEvidence JSON text with only REPORT_DATA and the signature left to fill in.

    The report's other fields and the cert chain are the same in every handshake,
    so their JSON is rendered once; `render()` is checked against
    `sim.trustee_json` at construction (a mismatch raises).
    """

    REPORT_DATA_MARK = "\u0001REPORT_DATA\u0001"
    R_MARK = "\u0001SIG_R\u0001"
    S_MARK = "\u0001SIG_S\u0001"

    def __init__(self, sim: Any, measurement: bytes, include: tuple[str, ...] = ("ARK", "ASK", "LEAF")) -> None:
        self.sim, self.measurement = sim, measurement
        probe = sim.sign_report(report_data=os.urandom(64), measurement=measurement)
        doc = sim.trustee_json(probe, include=include)
        ar = doc["attestation_report"]
        ar["report_data"] = self.REPORT_DATA_MARK
        ar["signature"] = {"r": self.R_MARK, "s": self.S_MARK}
        text = json.dumps(doc, separators=(",", ":"))
        marks = [json.dumps(m) for m in (self.REPORT_DATA_MARK, self.R_MARK, self.S_MARK)]
        a, rest = text.split(marks[0])
        b, rest = rest.split(marks[1])
        c, d = rest.split(marks[2])
        self.parts = (a, b, c, d)
        check = self.render(probe)
        if json.loads(check) != sim.trustee_json(probe, include=include):
            raise RuntimeError("evidence template does not render what sim.trustee_json gives")

    def render(self, report: bytes) -> str:
        a, b, c, d = self.parts
        # SNP ABI Table 23: REPORT_DATA at 0x50 (64 bytes); signature R at 0x2A0, S at 0x2E8 (72 bytes each).
        return (a + _json_bytes(report[0x50:0x90]) + b + _json_bytes(report[0x2A0:0x2E8]) + c
                + _json_bytes(report[0x2E8:0x330]) + d)

    def signed(self, report_data: bytes) -> str:
        return self.render(self.sim.sign_report(report_data=report_data, measurement=self.measurement))


@dataclass(frozen=True)
class _Kind:
    """What guest.keys.validate_jwe reads of the run's key (its curve name)."""

    kind: str = "P-256"


def decrypt_jwe(body: Any, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A flattened ECDH-ES+A256KW / A256GCM JWE (broker/jwe.py) after the Trustee guest's checks."""
    from guest.errors import BadResponse
    from guest.keys import validate_jwe
    try:
        header = validate_jwe(body, _Kind())  # type: ignore[arg-type]  # reads .kind only
    except BadResponse as exc:
        raise HandshakeError(str(exc)) from None
    epk = header["epk"]
    # SEC 1 2.3.3 uncompressed point; validate_jwe checked both coordinates are 32 bytes.
    peer = ec.EllipticCurvePublicKey.from_encoded_point(
        ec.SECP256R1(), b"\x04" + b64url_decode(epk["x"]) + b64url_decode(epk["y"]))
    kek = concat_kdf(key.exchange(ec.ECDH(), peer))
    try:
        cek = aes_key_unwrap(kek, b64url_decode(body["encrypted_key"]))
        sealed = b64url_decode(body["ciphertext"]) + b64url_decode(body["tag"])
        # RFC 7516 5.2 step 14: the AAD is the ASCII of the protected header as sent.
        return AESGCM(cek).decrypt(b64url_decode(body["iv"]), sealed, body["protected"].encode("ascii"))
    except Exception as exc:  # noqa: BLE001 - InvalidUnwrap / InvalidTag / bad lengths: all a wrong answer
        raise HandshakeError(f"resource JWE does not decrypt: {type(exc).__name__}") from None


def new_tee_key() -> tuple[ec.EllipticCurvePrivateKey, str, dict[str, str]]:
    key = ec.generate_private_key(ec.SECP256R1())
    nums = key.public_key().public_numbers()
    jwk = {"kty": "EC", "crv": "P-256", "alg": ECDH_ALG,
           "x": b64url(nums.x.to_bytes(32, "big")), "y": b64url(nums.y.to_bytes(32, "big"))}
    return key, json.dumps(jwk, separators=(",", ":")), jwk


def _json_object(resp: Response, what: str) -> dict[str, Any]:
    if resp.status != 200:
        raise HandshakeError(f"{what} answered {resp.status}: {resp.body[:300]!r}")
    try:
        obj = json.loads(resp.body)
    except ValueError:
        raise HandshakeError(f"{what} answer is not JSON: {resp.body[:100]!r}") from None
    if not isinstance(obj, dict):
        raise HandshakeError(f"{what} answer is not a JSON object")
    return obj


def _header_value(text: str) -> bytes:
    """A value the server gave us, to be sent back in a header: printable ASCII only (no CR/LF)."""
    if not text.isascii() or not text.isprintable():
        raise HandshakeError(f"server value {text[:40]!r} cannot go into a request header")
    return text.encode("ascii")


@dataclass
class Guest:
    """Everything a client process needs; built once in the parent and inherited through fork."""

    evidence: EvidenceTemplate
    bearer: bool = False
    # The no-op app's /resource is a fixed JWE, so it is made for this fixed key; the
    # client still generates, sends and binds a fresh key and pays the same decryption.
    fixed_key: ec.EllipticCurvePrivateKey | None = None
    # KBS-FACTS section 2: the guest's Request, verbatim.
    auth_body: bytes = (b'{"version":"0.4.0","tee":"snp","extra-params":'
                        b'{"supported-hash-algorithms":["sha256","sha384","sha512","sm3"]}}')
    json_header: bytes = b"Content-Type: application/json\r\n"
    resource_path: bytes = ("/kbs/v0/resource/" + SECRET_PATH).encode("ascii")
    token_len: int = 0         # of the last token seen (the no-op app answers one of the broker's size)

    def handshake(self, conn: Connection) -> None:
        key, jwk_text, jwk = new_tee_key()
        r = conn.request(b"POST", b"/kbs/v0/auth", self.json_header, self.auth_body)
        nonce = _json_object(r, "/auth").get("nonce")
        if not isinstance(nonce, str) or not 0 < len(nonce) <= 256 or r.cookie is None:
            raise HandshakeError("/auth gave no nonce or no session cookie")
        cookie = b"Cookie: " + _header_value(r.cookie) + b"\r\n"
        # KBS-FACTS section 3: REPORT_DATA = SHA-384(JCS({additional-evidence, nonce, tee-pubkey})), zero-padded.
        rd = hashlib.sha384(rfc8785.dumps({"additional-evidence": "", "nonce": nonce, "tee-pubkey": jwk})).digest()
        evidence = self.evidence.signed(rd + bytes(16))
        body = ('{"init-data":null,"runtime-data":{"nonce":' + json.dumps(nonce) + ',"tee-pubkey":' + jwk_text
                + '},"tee-evidence":{"primary_evidence":' + evidence + ',"additional_evidence":""}}')
        r = conn.request(b"POST", b"/kbs/v0/attest", self.json_header + cookie, body.encode("ascii"))
        token = _json_object(r, "/attest").get("token")
        if not isinstance(token, str) or not token or len(token) > 64 * 1024:
            raise HandshakeError("/attest gave no token")
        self.token_len = len(token)
        if self.bearer:
            auth = b"Authorization: Bearer " + _header_value(token) + b"\r\n"
        else:
            auth = b"Cookie: " + _header_value(r.cookie) + b"\r\n" if r.cookie else cookie
        r = conn.request(b"GET", self.resource_path, auth)
        plain = decrypt_jwe(_json_object(r, "/resource"), self.fixed_key or key)
        if plain != SECRET:
            raise HandshakeError("the resource decrypted to a value other than the stored secret")


@dataclass
class ClientResult:
    latencies: list[float]
    cpu: float                 # this process's CPU seconds inside the loop
    elapsed: float             # wall seconds of the loop
    errors: int
    reconnects: int
    cycles: int
    first_errors: list[str]
    token_len: int


GUEST: Guest | None = None     # set by the parent before it forks the client pool


def run_client(args: tuple[int, float, int]) -> ClientResult:
    """Handshakes back to back for `seconds` on one connection (a pool worker's task); with
    `every` > 0 the client closes and reopens it after every `every` handshakes."""
    port, seconds, every = args
    guest = GUEST
    if guest is None:
        raise RuntimeError("bench/_loadgen.GUEST is not set before the fork")
    conn = Connection(port)
    lat: list[float] = []
    errors, first = 0, []
    cpu0, t_start = time.process_time(), time.perf_counter()
    end = t_start + seconds
    t0 = t_start
    while t0 < end:
        try:
            guest.handshake(conn)
            t1 = time.perf_counter()
            lat.append(t1 - t0)
            if every and len(lat) % every == 0:
                conn.cycle()
        except (HandshakeError, OSError, ValueError, KeyError, TypeError) as exc:  # all printed, all exit 1
            errors += 1
            if len(first) < 3:
                first.append(f"{type(exc).__name__}: {exc}")
            conn.reopen_after_error()
            t1 = time.perf_counter()
        t0 = t1
    result = ClientResult(lat, time.process_time() - cpu0, time.perf_counter() - t_start, errors,
                          conn.reconnects, conn.cycles, first, guest.token_len)
    conn.close()
    return result


# -- the no-op app (the HTTP floor) -----------------------------------------------------------
def noop_app() -> Any:
    """Flask app with the three KBS routes answering fixed JSON of the broker's shapes.

    FIRMGATE_NOOP_JWE holds the fixed resource JWE (made by the bench parent with
    broker.jwe.encrypt), FIRMGATE_NOOP_TOKEN_BYTES the token's length. The POST routes
    read the whole request body and do not parse it: how to parse JSON is the broker's
    choice (stdlib json takes ~0.4 ms on a 21 KB Trustee body, orjson ~0.1 ms), so its
    cost counts as broker work, not as the HTTP floor.
    """
    from flask import Flask, jsonify, request
    app = Flask("firmgate-noop")
    jwe_body = json.loads(os.environ["FIRMGATE_NOOP_JWE"])
    cookie = f"{COOKIE}={'0' * 32}; Expires=Thu, 01 Jan 2099 00:00:00 GMT"
    nonce = base64.b64encode(b"\x00" * 32).decode("ascii")  # Trustee: standard base64 of 32 bytes
    # A fixed JWS-shaped string as long as the broker's token in the same bench run.
    size = max(int(os.environ.get("FIRMGATE_NOOP_TOKEN_BYTES", "1300")), 100)
    token = "e30." + "A" * (size - 91) + "." + "B" * 86

    @app.post("/kbs/v0/auth")
    def auth() -> Any:
        request.get_data()
        resp = jsonify({"nonce": nonce, "extra-params": ""})
        resp.headers.add("Set-Cookie", cookie)
        return resp

    @app.post("/kbs/v0/attest")
    def attest() -> Any:
        request.get_data()
        resp = jsonify({"token": token})
        resp.headers.add("Set-Cookie", cookie)
        return resp

    @app.get("/kbs/v0/resource/<repo>/<rtype>/<tag>")
    def resource(repo: str, rtype: str, tag: str) -> Any:
        return jsonify(jwe_body)

    @app.get("/healthz")
    def healthz() -> Any:
        return jsonify({"status": "ok"})

    return app


# -- optional server profile (--profile-server) ------------------------------------------------
def profiled_broker() -> Any:
    """broker.create_app() with every request run under its own cProfile.Profile (gthread runs
    requests in pool threads, and a profiler sees only the thread it was enabled in); the
    worker's merged stats go to FIRMGATE_BENCH_PROFILE_DIR/<pid>.prof when it exits.
    FIRMGATE_BENCH_PROFILE_CLOCK=wall times with the wall clock (waits on locks and the
    database show), anything else with the thread's CPU clock (what the server CPU row counts)."""
    import atexit
    import cProfile
    import pstats
    import threading

    from broker import create_app
    app = create_app()
    out = os.environ["FIRMGATE_BENCH_PROFILE_DIR"]
    lock = threading.Lock()
    merged: list[pstats.Stats] = []
    wsgi = app.wsgi_app

    clock = time.perf_counter if os.environ.get("FIRMGATE_BENCH_PROFILE_CLOCK") == "wall" else time.thread_time

    def profiled(environ: Any, start_response: Any) -> Any:
        prof = cProfile.Profile(clock)
        prof.enable()
        try:
            return list(wsgi(environ, start_response))  # consume the body inside the profile
        finally:
            prof.disable()
            with lock:
                if merged:
                    merged[0].add(prof)
                else:
                    merged.append(pstats.Stats(prof))

    def dump() -> None:
        with lock:
            if merged:
                merged[0].dump_stats(os.path.join(out, f"{os.getpid()}.prof"))

    atexit.register(dump)
    app.wsgi_app = profiled  # type: ignore[method-assign]
    return app
