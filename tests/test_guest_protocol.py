"""The guest client against a deliberately broken broker (a tiny http.server on loopback): every
answer that is not the KBS protocol is refused with a clear reason, never a traceback; and the
evidence JSON our guest sends has the shape a real Trustee guest sends."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from guest import BadResponse, BrokerDenied, BrokerUnreachable, KbsSession, TeeKey, attest, auth
from guest.evidence import evidence_json
from conftest import KBS_VECTORS
from sim.platform import SimPlatform

COOKIE = "kbs-session-id=0123456789abcdef0123456789abcdef; Expires=Wed, 21 Oct 2037 07:28:00 GMT"
Reply = tuple[int, dict[str, str], bytes]


class Fake:
    """Answers each path with what the test says; records requests."""

    def __init__(self) -> None:
        self.routes: dict[str, Callable[[dict[str, Any] | None], Reply]] = {}
        self.seen: list[tuple[str, str, dict[str, str], Any]] = []


@pytest.fixture()
def fake() -> Iterator[tuple[Fake, str]]:
    f = Fake()

    class H(BaseHTTPRequestHandler):
        def _do(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n)) if n else None
            f.seen.append((self.command, self.path, dict(self.headers), body))
            status, headers, data = f.routes[self.path](body)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _do

        def log_message(self, *a: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f, f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()


def _ok(obj: Any, cookie: bool = True) -> Callable[[Any], Reply]:
    return lambda body: (200, {"Set-Cookie": COOKIE} if cookie else {}, json.dumps(obj).encode())


class Source:
    name = "fake"

    def __init__(self) -> None:
        self.p = SimPlatform("Milan", "VCEK")

    def get(self, report_data: bytes) -> tuple[bytes, bytes]:
        return self.p.sign_report(report_data=report_data), self.p.cert_table(pem=True)


CHALLENGE = {"nonce": "AAAA" * 11, "extra-params": ""}


def test_auth_request_is_what_the_trustee_guest_sends(fake: tuple[Fake, str]) -> None:
    f, url = fake
    f.routes["/kbs/v0/auth"] = _ok(CHALLENGE)
    s = KbsSession(url)
    assert auth(s) == CHALLENGE["nonce"] and s.cookie == "0123456789abcdef0123456789abcdef"
    method, path, _, body = f.seen[0]
    assert (method, path) == ("POST", "/kbs/v0/auth")
    assert body == {"version": "0.4.0", "tee": "snp",
                    "extra-params": {"supported-hash-algorithms": ["sha256", "sha384", "sha512", "sm3"]}}


@pytest.mark.parametrize("reply,exc,why", [
    ((500, {}, b"oops"), BrokerUnreachable, "HTTP 500 without a KBS error body"),
    ((401, {}, b'{"type": 1}'), BrokerUnreachable, "without a KBS error body"),
    ((200, {}, b"not json"), BadResponse, "without a JSON body"),
    ((200, {"Set-Cookie": COOKIE}, b'{"extra-params": ""}'), BadResponse, "no nonce"),
    ((200, {}, json.dumps(CHALLENGE).encode()), BadResponse, "no kbs-session-id cookie"),
    ((200, {"Set-Cookie": COOKIE}, json.dumps({**CHALLENGE, "extra-params": {"selected-hash-algorithm": "sha512"}})
      .encode()), BadResponse, "selected hash 'sha512'"),
    ((401, {}, b'{"type":"https://github.com/confidential-containers/kbs/errors/AttestationError",'
               b'"detail":"KBS Client Protocol Version Mismatch"}'), BrokerDenied, "Protocol Version Mismatch"),
])
def test_auth_refusals(fake: tuple[Fake, str], reply: Reply, exc: type[Exception], why: str) -> None:
    f, url = fake
    f.routes["/kbs/v0/auth"] = lambda body: reply
    with pytest.raises(exc, match=why):
        auth(KbsSession(url))


def test_attest_answer_without_a_jwt(fake: tuple[Fake, str]) -> None:
    f, url = fake
    f.routes["/kbs/v0/auth"] = _ok(CHALLENGE)
    f.routes["/kbs/v0/attest"] = _ok({"token": "not-a-jwt"})
    with pytest.raises(BadResponse, match="not a JWT"):
        attest(KbsSession(url), Source(), TeeKey.generate())
    # The attest request carried the session cookie and the KBS 0.4.0 body.
    _, _, headers, body = f.seen[-1]
    assert headers["Cookie"] == "kbs-session-id=0123456789abcdef0123456789abcdef"
    assert set(body) == {"init-data", "runtime-data", "tee-evidence"} and body["init-data"] is None
    assert set(body["tee-evidence"]) == {"primary_evidence", "additional_evidence"}
    assert body["tee-evidence"]["additional_evidence"] == ""


def test_resource_bad_jwe_is_refused(fake: tuple[Fake, str]) -> None:
    from guest import fetch_resource
    f, url = fake
    f.routes["/kbs/v0/resource/a/b/c"] = _ok({"protected": "e30", "iv": "AAAA"})
    with pytest.raises(BadResponse, match="no 'encrypted_key'"):
        fetch_resource(KbsSession(url), "a/b/c", TeeKey.generate())


def test_evidence_has_the_trustee_shape() -> None:
    """Same keys, same order, same JSON types as the SnpEvidence a real Trustee guest sent (vectors/kbs)."""
    real = json.loads((KBS_VECTORS / "trustee-e2e-snp-evidence.json").read_text())
    p = SimPlatform("Milan", "VCEK")
    ours = json.loads(json.dumps(evidence_json(p.sign_report(), p.cert_table(pem=True))))
    assert list(ours) == list(real)
    rk, ok = list(real["attestation_report"]), list(ours["attestation_report"])
    assert [k for k in ok if k in rk] == rk          # every real key, in the real order
    assert set(ok) - set(rk) <= {"launch_mit_vector", "current_mit_vector"}  # sev 7's v5 fields (null here)
    for k in rk:
        assert type(ours["attestation_report"][k]) is type(real["attestation_report"][k]), k
    assert {c["cert_type"] for c in ours["cert_chain"]} <= {"ARK", "ASK", "VCEK", "VLEK"}
    assert all(isinstance(b, int) for b in ours["cert_chain"][0]["data"][:8])


def test_broker_text_cannot_drive_the_terminal(fake: tuple[Fake, str]) -> None:
    f, url = fake
    evil = {"type": "https://x/errors/Policy\x1b[2JDeny", "detail": "denied\n\x1b]0;owned\x07 and more"}
    f.routes["/kbs/v0/auth"] = lambda body: (401, {}, json.dumps(evil).encode())
    with pytest.raises(BrokerDenied) as ei:
        auth(KbsSession(url))
    msg = str(ei.value)
    assert "\x1b" not in msg and "\n" not in msg and "\x07" not in msg
    assert "\\x1b]0;owned\\x07 and more" in msg and ei.value.variant == "Policy\\x1b[2JDeny"
