"""Regression tests for the outside review of issue 14 (docs/security.md, REVIEW-1 .. REVIEW-10).

Each attack of the review, replayed over the interface it used: HTTP on loopback
against the real broker (real verifier, `sim` evidence), the `firmgate` command
line, or the host's update socket. REVIEW-5 and REVIEW-8 live beside the tests
they extend (test_broker_protocol.py, test_broker_e2e.py, test_host_install_channel.py).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st
from test_broker_support import (
    KBS_ERR,
    Guest,
    admin,
    b64url,
    guest_report_data,
    http,
    new_tee_key,
)

from broker import create_app
from broker.config import DEFAULTS

REPO = Path(__file__).resolve().parent.parent
OP = "review-operator"
FIRMGATE = str(Path(sys.executable).parent / "firmgate")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


class MeteredServer:
    """The broker on loopback (werkzeug, one thread per request), measuring each request's CPU time
    in the thread that served it (thread_time: what the server spent, not wall time on a busy host)."""

    def __init__(self, app: Any) -> None:
        from werkzeug.serving import make_server
        self.app = app
        self.cpu: list[tuple[str, float]] = []
        self.trace_next = False
        self.peak: list[int] = []
        self.server = make_server("127.0.0.1", 0, self._wsgi, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _wsgi(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        trace, self.trace_next = self.trace_next, False
        if trace:  # the process's peak RSS, reset now (proc(5), clear_refs 5): what this request adds to it
            Path("/proc/self/clear_refs").write_text("5")
            base = _status_kib("VmRSS")
        t0 = time.thread_time()
        try:
            out = b"".join(self.app(environ, start_response))  # reading the body and answering, all here
        finally:
            self.cpu.append((environ["PATH_INFO"], time.thread_time() - t0))
            if trace:
                self.peak.append((_status_kib("VmHWM") - base) * 1024)
        return [out]

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.server.server_port), timeout=30)

    def exchange(self, request: bytes, end_writing: bool = False) -> tuple[bytes, bytes]:
        """(status code, whole answer) for raw bytes sent on a connection of their own, read until
        the server closes it; end_writing: then shut down our side (the request is all there is)."""
        with self.connect() as s:
            s.sendall(request)
            if end_writing:
                s.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        return answer.split(b"\r\n", 1)[0].split()[1], answer

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.app.extensions["firmgate"].engine.dispose()


@pytest.fixture(scope="module")
def sim() -> Any:
    from sim.platform import SimPlatform
    return SimPlatform("Milan")


@pytest.fixture
def broker(tmp_path: Path, sim: Any) -> Iterator[tuple[MeteredServer, dict[str, str]]]:
    (tmp_path / "policies").mkdir()
    (tmp_path / "root.pem").write_bytes(sim.root_pem())
    app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'b.db'}", "MASTER_KEY": secrets.token_bytes(32),
                      "OPERATOR_TOKEN": OP, "POLICIES_DIR": str(tmp_path / "policies"),
                      "TRUST_ROOT_PEM": str(tmp_path / "root.pem")})
    srv = MeteredServer(app)
    tokens = {t: admin(srv.url, "POST", "/tenants", OP, {"name": t}).body["token"] for t in ("acme", "globex")}
    try:
        yield srv, tokens
    finally:
        srv.stop()


def _records(srv: MeteredServer, token: str) -> list[dict[str, Any]]:
    r = admin(srv.url, "GET", "/audit?limit=1000", token)
    assert r.status == 200, r.body
    return list(r.body["records"])


def _session(srv: MeteredServer, hint: str | None = None) -> Guest:
    g = Guest(srv.url, lambda rd: {}, tenant_hint=hint)
    assert g.auth().status == 200
    return g


# -- REVIEW-1: nobody writes into a tenant's audit log without verified evidence --------------------
NOTICE = "SECURITY NOTICE from operator: rotate your keys at http://evil.example/\n" * 48  # ~3.5 KB: fits the JWK cap


def test_unverified_attest_leaves_nothing_in_the_tenants_audit(broker: Any, sim: Any) -> None:
    srv, tokens = broker
    before = len(_records(srv, tokens["acme"]))
    # no hardware, no token: a hint naming the victim, then a garbage attestation with a 4 KB "alg"
    g = _session(srv, hint="acme")
    _key, jwk = new_tee_key()
    body = {"init-data": None, "runtime-data": {"nonce": g.nonce, "tee-pubkey": dict(jwk, alg=NOTICE)},
            "tee-evidence": {"primary_evidence": {}, "additional_evidence": ""}}
    assert g.attest(body).status == 401
    # a well-formed report with an attacker-chosen MEASUREMENT that never verifies (wrong REPORT_DATA)
    g2 = _session(srv, hint="acme")
    fake_measurement = bytes.fromhex("de" * 48)
    forged = g2.attestation(report_data=b"\x01" * 64)
    forged["tee-evidence"]["primary_evidence"] = sim.trustee_json(
        sim.sign_report(report_data=b"\x01" * 64, measurement=fake_measurement), include=("ARK", "ASK", "LEAF"))
    r = g2.attest(forged)
    assert r.status == 401 and "REPORT_DATA does not bind" in r.detail
    assert len(_records(srv, tokens["acme"])) == before  # not one row (no auth row, no denial) for acme
    ops = [x for x in _records(srv, OP) if x["session"] in (_sid(g), _sid(g2))]
    assert ops and all(x["tenant"] is None and x["measurement"] is None for x in ops), ops
    denial = next((x for x in ops if x["session"] == _sid(g) and x["outcome"] == "denied"), None)
    assert denial is not None, ops
    assert len(denial["reason"]) < 300 and "\n" not in denial["reason"] and "\\n" in denial["reason"]
    assert "de" * 48 not in json.dumps(_records(srv, OP))  # the unverified MEASUREMENT is nowhere


def _sid(g: Guest) -> str:
    return next(str(c.value) for c in g.jar if c.name == "kbs-session-id")


def test_unverified_rows_have_the_short_retention(broker: Any) -> None:
    from broker import nonces
    srv, _tokens = broker
    g = _session(srv, hint="acme")
    assert g.attest(g.attestation(report_data=b"\x01" * 64)).status == 401
    admin_row = [x for x in _records(srv, OP) if x["event"] == "admin"]
    with srv.app.extensions["firmgate"].engine.connect() as db:
        nonces.purge_expired(db, audit_days=90, auth_audit_hours=0)  # the short retention has passed
    left = _records(srv, OP)
    assert not any(x["session"] == _sid(g) for x in left)  # its auth row and its denial are gone
    assert [x for x in left if x["event"] == "admin"] == admin_row  # the 90-day rows are not


# -- REVIEW-2, BUG-19: work before verification is bounded -------------------------------------------
MAX_BODY = DEFAULTS["ATTEST_MAX_BYTES"]


def _body(nonce: str, jwk: dict[str, Any], primary: bytes = b"{}", additional: bytes = b'""',
          pad: bool = True, init: Any = None) -> bytes:
    """An attest body with these raw JSON members, space-padded to exactly MAX_BODY bytes."""
    head = json.dumps({"init-data": init, "runtime-data": {"nonce": nonce, "tee-pubkey": jwk}},
                      ensure_ascii=False).encode()
    body = (head[:-1] + b', "tee-evidence": {"primary_evidence": ' + primary + b', "additional_evidence": '
            + additional + b"}}")
    assert len(body) <= MAX_BODY
    return b" " * (MAX_BODY - len(body)) * pad + body


def _room(nonce: str, jwk: dict[str, Any]) -> int:
    return MAX_BODY - len(_body(nonce, jwk, pad=False)) - 2  # the space left for a member's contents


def _array(unit: bytes) -> Any:
    return lambda n, k: _body(n, k, primary=b"[" + b",".join([unit] * (_room(n, k) // (len(unit) + 1))) + b"]")


def _string(unit: bytes) -> Any:
    return lambda n, k: _body(n, k, additional=b'"' + unit * (_room(n, k) // len(unit)) + b'"')


def _long_member(where: str) -> Any:
    """init-data, or a member of tee-pubkey, as one string of 2-byte characters filling the body:
    json.dumps, which measured their sizes, escaped all of it first (~90 ms and 40 MiB)."""
    def make(n: str, k: dict[str, Any]) -> bytes:
        text = "\u00e9" * (_room(n, k) // 2 - 16)
        return _body(n, k, init=text) if where == "init-data" else _body(n, dict(k, x5u=text))
    return make


_NEST = b"[" * 1000 + b"]" * 1000  # orjson nests up to 1024: no comma needed for a thousand arrays
_OBJ = b'{"a":' * 1000 + b"0" + b"}" * 1000
# Each maximal body of one shape: what refuses it, and how. The review's (8 million '"') cost ~1.6 s
# and ~85 MiB before REVIEW-2; BUG-19's shapes cost 3-4 s and 480 MiB (empty arrays), 600 ms and 480
# MiB (empty objects), 250 ms and 240 MiB (integers) until the raw counts ran before parsing.
HOSTILE = {
    "the review's: escaped quotes": (_string(b'\\"'), "more than 16384 backslashes"),
    "unicode escapes": (_string(b"\\u00e9"), "more than 16384 backslashes"),
    "integers": (_array(b"0"), "more than 32768 commas"),
    "floats": (_array(b"1e308"), "more than 32768 commas"),
    "empty strings": (_array(b'""'), "more than 32768 commas"),
    "empty arrays": (_array(b"[]"), "more than 32768 commas"),
    "empty objects": (_array(b"{}"), "more than 32768 commas"),
    "arrays nested without commas": (lambda n, k: _body(n, k, primary=b"[" + b",".join(
        [_NEST] * (_room(n, k) // (len(_NEST) + 1))) + b"]"), "more than 4096 '[' characters"),
    "objects nested without commas": (lambda n, k: _body(n, k, primary=b"[" + b",".join(
        [_OBJ] * (_room(n, k) // (len(_OBJ) + 1))) + b"]"), "more than 4096 '{' characters"),
    "one string over the additional_evidence cap": (_string(b"x"), "longer than 11250348 characters"),
    "a multi-byte string under the cap": (_string("\u20ac".encode()), "evidence rejected"),
    "init-data: one long non-ASCII string": (_long_member("init-data"), "init-data is larger than 16384 bytes"),
    "tee-pubkey: one long non-ASCII member": (_long_member("tee-pubkey"), "tee-pubkey is larger than 4096 bytes"),
}


@pytest.mark.parametrize("shape", HOSTILE)
def test_a_maximal_hostile_attest_body_costs_little_cpu_and_memory(broker: Any, shape: str) -> None:
    """A maximal body of each shape is refused with its reason. The bound asserted is the issue's:
    under 100 ms of the serving thread's CPU time (not wall time; the least of three requests, as
    the noise of a shared machine only ever adds), and a peak RSS growth of under three bodies: the
    body read once, and what orjson builds of a long string (a 12 MiB multi-byte one: a scratch copy
    of its UTF-8 and the 8 MiB str, 32 MiB in all when it is the process's first large allocation;
    less after others, as glibc then reuses the freed heap). Before BUG-19 empty arrays grew it by
    480 MiB. (tracemalloc would count the address space orjson reserves but never touches.)"""
    srv, _ = broker
    make, reason = HOSTILE[shape]
    _key, jwk = new_tee_key()
    cpu = []
    for attempt in range(3):
        g = _session(srv)
        body = make(g.nonce or "", jwk)
        assert len(body) == MAX_BODY
        srv.trace_next = attempt == 0
        r = http("POST", srv.url + "/kbs/v0/attest", raw=body, opener=g.opener,
                 headers={"Content-Type": "application/json"})
        assert r.status == 401 and reason in r.body["detail"], (r.status, r.body)
        path, spent = srv.cpu[-1]
        assert path == "/kbs/v0/attest"
        cpu.append(spent)
    assert min(cpu) < 0.100, f"{min(cpu) * 1000:.0f} ms of server CPU"
    assert srv.peak[-1] < 3 * MAX_BODY, f"peak RSS grew by {srv.peak[-1] / 2**20:.0f} MiB"


def test_a_body_refused_by_its_raw_counts_spends_no_nonce(broker: Any) -> None:
    srv, _ = broker
    g = _session(srv)
    _key, jwk = new_tee_key()
    r = http("POST", srv.url + "/kbs/v0/attest", raw=_body(g.nonce or "", jwk, primary=b"[" + b"0," * 40_000 + b"0]"),
             opener=g.opener, headers={"Content-Type": "application/json"})
    assert r.status == 401 and r.body["type"] == KBS_ERR + "SerdeError", r.body
    again = g.attest(g.attestation())  # the same session's nonce, refused for its evidence ({}) only
    assert again.status == 401 and "already used" not in again.detail and "evidence rejected" in again.detail


def test_a_body_shorter_than_its_content_length_is_a_clean_refusal(broker: Any) -> None:
    srv, _ = broker
    status, answer = srv.exchange(b"POST /kbs/v0/attest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                  b"Cookie: kbs-session-id=" + b"0" * 32 + b"\r\nContent-Length: 100000\r\n\r\n"
                                  + b"{" * 10, end_writing=True)
    assert status == b"401", answer[:300]
    assert b"SerdeError" in answer and b"Traceback" not in answer


@pytest.mark.parametrize("path", ["/kbs/v0/auth", "/kbs/v0/attest", "/admin/v0/tenants"])
def test_a_chunked_body_is_refused_before_it_is_read(broker: Any, path: str) -> None:
    """Every chunk cost the server ~3 us before the body limit applied (a 12 MiB body of 1-byte
    chunks: ~40 s), and werkzeug cut an over-long chunked body at the limit instead of refusing it."""
    srv, _ = broker
    status, answer = srv.exchange(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                  f"Authorization: Bearer {OP}\r\nCookie: kbs-session-id={'0' * 32}\r\n"
                                  "Transfer-Encoding: chunked\r\n\r\n".encode() + b"1\r\n{\r\n" * 1000)  # no end
    assert status == (b"411" if path.startswith("/admin") else b"401"), answer[:300]
    assert b"needs a Content-Length" in answer and b"Traceback" not in answer
    assert srv.cpu[-1][0] == path and srv.cpu[-1][1] < 0.100


def test_a_post_with_neither_length_nor_chunks_has_an_empty_body(broker: Any) -> None:
    srv, _ = broker
    status, answer = srv.exchange(f"POST /admin/v0/tenants HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OP}\r\n"
                                  "Connection: close\r\n\r\n".encode())
    assert status == b"400" and b"not valid JSON" in answer, answer[:300]


def test_a_stalled_body_holds_the_bytes_it_sent_not_the_size_it_declared(broker: Any) -> None:
    """A body of 1 MiB or more is read into an anonymous mapping, whose pages exist as bytes arrive;
    a zero-filled bytearray of the declared size was resident at once (4 x 12 MiB here)."""
    srv, _ = broker
    def serving() -> int:  # werkzeug's threaded server: a socketserver thread per connection
        return sum("process_request" in t.name for t in threading.enumerate())
    before = _status_kib("VmRSS")
    socks = []
    try:
        for _ in range(4):  # /attest (a well-formed cookie: the body is read before the nonce is looked up)
            s = srv.connect()
            s.sendall(b"POST /kbs/v0/attest HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Cookie: kbs-session-id=" + b"0" * 32 + b"\r\nContent-Length: %d\r\n\r\n{" % MAX_BODY)
            socks.append(s)
        deadline = time.monotonic() + 10
        while serving() < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert serving() >= 4
        time.sleep(0.5)  # each is now blocked reading the body it was promised
        grew = (_status_kib("VmRSS") - before) * 1024
    finally:
        for s in socks:
            s.close()
    assert grew < MAX_BODY, f"RSS grew by {grew / 2**20:.0f} MiB for 4 stalled bodies"


def test_attest_max_bytes_fits_the_largest_genuine_body() -> None:
    """The limit is the largest add-on's additional_evidence plus more than 1 MiB for the rest
    (primary evidence of at most 32,768 commas' worth of integers, 16 KiB of init-data, the key)."""
    from broker.kbs import MAX_ADDITIONAL_EVIDENCE
    assert MAX_BODY - MAX_ADDITIONAL_EVIDENCE > 1024 * 1024


def test_additional_evidence_above_the_cap_is_refused_before_the_nonce(broker: Any) -> None:
    from broker.kbs import MAX_ADDITIONAL_EVIDENCE
    srv, _ = broker
    g = _session(srv)
    body = g.attestation(additional="x" * (MAX_ADDITIONAL_EVIDENCE + 1))
    r = g.attest(body)
    assert r.status == 401 and "longer than 11250348 characters" in r.detail
    body["tee-evidence"]["additional_evidence"] = ""
    again = g.attest(body)  # refused for its evidence ({}), not for a spent nonce: the cap ran first
    assert again.status == 401 and "already used" not in again.detail and "evidence rejected" in again.detail


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=64),
       st.text(max_size=8).filter(lambda s: all(not 0xD800 <= ord(c) <= 0xDFFF for c in s)))
def test_report_data_hash_is_sha384_of_the_rfc8785_form(additional: str, nonce: str) -> None:
    """The broker hashes member by member with orjson for the big string; the result must be RFC 8785
    (the rfc8785 package) and what a guest computes (json.dumps with sorted keys, test_broker_support)."""
    from broker.runtime_data import expected_report_data
    jwk = {"kty": "EC", "crv": "P-256", "x": "AQ", "y": "Ag", "alg": "ECDH-ES+A256KW"}
    want = hashlib.sha384(rfc8785.dumps({"additional-evidence": additional, "nonce": nonce,
                                         "tee-pubkey": jwk})).digest().ljust(64, b"\0")
    assert expected_report_data(nonce, jwk, additional) == want == guest_report_data(nonce, jwk, additional)


# -- REVIEW-3: the wrong master key -------------------------------------------------------------------
def _fg(*argv: str) -> subprocess.CompletedProcess[bytes]:
    """The `firmgate` console script in its own process, as an operator runs it (~2 s a call here)."""
    return subprocess.run([FIRMGATE, *argv], capture_output=True, timeout=120, check=False)


def _cli(*argv: str) -> Any:
    """`firmgate ARGV` in this process: the console script's main(), output captured."""
    from test_broker_units import _fg as in_process
    return in_process(*argv)


def test_secret_put_and_rm_with_the_wrong_master_key_change_nothing(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'b.db'}"
    right, wrong = tmp_path / "right.key", tmp_path / "wrong.key"
    right.write_bytes(b"\x11" * 32)
    wrong.write_bytes(b"\x22" * 32)
    assert _cli("tenant", "add", "acme", "--db", db).returncode == 0
    assert _cli("secret", "put", "acme/key/disk", "--value", "LIVE", "--db", db,
               "--master-key-file", str(right)).returncode == 0
    for run, argv in ((_fg, ["secret", "put", "acme/key/disk", "--value", "X"]),  # the console script once
                      (_cli, ["secret", "rm", "acme/key/disk"])):
        r = run(*argv, "--db", db, "--master-key-file", str(wrong))
        assert r.returncode == 2, r
        assert r.stderr.decode().startswith("error: the master key does not open this database") and \
            r.stderr.count(b"\n") == 1, r.stderr
    from sqlalchemy.orm import Session

    from broker import vault
    from broker.db import make_engine
    from broker.secretbox import SecretBox
    engine = make_engine(db)
    with Session(engine) as orm:
        assert vault.get_secret(orm, SecretBox(b"\x11" * 32), "acme",
                                vault.ResourcePath.parse("acme/key/disk")) == b"LIVE"
    engine.dispose()


def test_a_value_that_does_not_decrypt_is_a_generic_500(tmp_path: Path) -> None:
    """A broker whose stored value was sealed under another key (what the old CLI let happen):
    /resource answers 500 with a generic detail, never a 401 that sends the guest round the loop."""
    from test_broker_protocol import GOOD_FW, FakeAppraiser, fake_evidence
    from test_broker_support import LiveServer

    from broker import vault
    from broker.secretbox import SecretBox
    fake = FakeAppraiser()
    fake.policies["acme"] = {"rev": 1, "measurements": {GOOD_FW: "fw"}, "resources": {"acme/key/disk": ["fw"]}}
    srv = LiveServer(create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'b.db'}", "MASTER_KEY": b"\x11" * 32,
                                 "OPERATOR_TOKEN": OP, "APPRAISER": fake}))
    try:
        admin(srv.url, "POST", "/tenants", OP, {"name": "acme"})
        with srv.app.extensions["firmgate"].sessions() as orm:
            vault.put_secret(orm, SecretBox(b"\x22" * 32), "acme", vault.ResourcePath.parse("acme/key/disk"), b"v")
        g = Guest(srv.url, fake_evidence())
        g.auth()
        assert g.attest().status == 200
        r = g.resource("acme/key/disk")
        assert r.status == 500 and r.body == {"type": KBS_ERR + "HTTPFailed",
                                              "detail": "internal error; see the broker log"}, r.body
    finally:
        srv.stop()


# -- REVIEW-4: one name rule, fullmatch, everywhere ----------------------------------------------------
@pytest.mark.parametrize("name", ["acme\n", "Acme.Corp", "ACME", "a" * 64, ".acme", "acme/x"])
def test_names_outside_the_policy_files_rule_are_refused(broker: Any, name: str) -> None:
    srv, _tokens = broker
    r = admin(srv.url, "POST", "/tenants", OP, {"name": name})
    assert r.status == 400, (name, r.body)
    r = http("POST", srv.url + "/kbs/v0/auth", {"version": "0.4.0", "tee": "snp", "extra-params": {"tenant": name}})
    assert r.status == 401 and "not a valid tenant name" in r.body["detail"]


def test_trailing_newline_paths_are_refused_over_http_and_cli(broker: Any, tmp_path: Path) -> None:
    srv, tokens = broker
    r = admin(srv.url, "PUT", "/secrets/acme/key/disk%0A", tokens["acme"], raw=b"v")
    assert r.status == 404
    r = http("GET", srv.url + "/kbs/v0/resource/acme/key/disk%0A")
    assert r.status == 404 and r.body["type"] == KBS_ERR + "InvalidRequestPath"
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    assert _cli("tenant", "add", "acme\n", "--db", db).returncode == 2
    assert _cli("tenant", "add", "acme", "--db", db).returncode == 0
    key = tmp_path / "k"
    key.write_bytes(b"\x11" * 32)
    ran = _cli("secret", "put", "acme/key/disk\n", "--value", "v", "--db", db, "--master-key-file", str(key))
    assert ran.returncode == 2 and b"must be TENANT/TYPE/TAG" in ran.stderr


def test_an_older_database_with_other_names_keeps_working(tmp_path: Path) -> None:
    """Rows an older broker stored under names the rule now refuses: the broker starts, the operator
    lists and removes them; nothing new is created under such a name."""
    from sqlalchemy import text

    from broker.db import make_engine, migrate
    from broker.secretbox import SecretBox
    db = f"sqlite:///{tmp_path / 'old.db'}"
    key = tmp_path / "k"
    key.write_bytes(b"\x11" * 32)
    assert _cli("tenant", "add", "acme", "--db", db).returncode == 0
    assert _cli("secret", "put", "acme/key/disk", "--value", "v", "--db", db, "--master-key-file", str(key)).returncode == 0
    engine = make_engine(db)
    migrate(engine)
    nonce, sealed = SecretBox(b"\x11" * 32).seal("Acme.Corp", "Acme.Corp/key/disk", b"old")
    with engine.begin() as conn:  # what an older broker stored: tenant "Acme.Corp" and its secret
        conn.execute(text("INSERT INTO fg_tenants (name, created_at) VALUES ('Acme.Corp', 0)"))
        conn.execute(text("INSERT INTO fg_secrets (tenant, path, nonce, ciphertext, created_at, updated_at) "
                          "VALUES ('Acme.Corp', 'Acme.Corp/key/disk', :n, :c, 0, 0)"), {"n": nonce, "c": sealed})
    engine.dispose()
    r = _cli("secret", "list", "Acme.Corp", "--db", db)
    assert r.returncode == 0 and b"Acme.Corp/key/disk" in r.stdout
    assert _cli("secret", "put", "Acme.Corp/key/new", "--value", "v", "--db", db,
               "--master-key-file", str(key)).returncode == 2
    r = _cli("secret", "rm", "Acme.Corp/key/disk", "--db", db, "--master-key-file", str(key))
    assert r.returncode == 0, r.stderr
    assert _cli("secret", "list", "acme", "--db", db).stdout.startswith(b"acme/key/disk")


# -- REVIEW-6: policy firmware files: regular, inside the tree, non-blocking ------------------------------
def _policy_with_bytes(d: Path, location: str, digest: str) -> Path:
    p = d / "acme.toml"
    p.write_text(f'''version = 1
[firmware]
[[firmware.allowed]]
id = "fw"
sha384 = "{digest}"
svn = 1
bytes = "{location}"

[[shapes]]
vmm = "qemu"
vcpus = [1]
vcpu_types = ["EPYC-v4"]
''')
    return p


def test_policy_bytes_symlink_out_of_the_tree_is_refused_without_reading_it(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"host-name-of-the-broker\n")
    tree = tmp_path / "policies"
    tree.mkdir()
    (tree / "fw.fd").symlink_to(outside)
    policy = _policy_with_bytes(tree, "fw.fd", "00" * 48)
    r = _cli("policy", "check", str(policy))
    assert r.returncode == 1, r
    out = (r.stdout + r.stderr).decode()
    assert "resolves outside the policy's directory" in out
    assert hashlib.sha384(outside.read_bytes()).hexdigest()[:16] not in out  # nothing of the file leaks


def test_policy_bytes_fifo_fails_at_once(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fw.fd")
    policy = _policy_with_bytes(tmp_path, "fw.fd", "00" * 48)
    r = _fg("policy", "check", str(policy))  # blocked for ever before the fix (timeout=120 s here)
    assert r.returncode == 1 and b"not a regular file" in r.stdout + r.stderr, r


def test_policy_bytes_symlink_inside_the_tree_still_works(tmp_path: Path, firmware_dir: Path) -> None:
    import shutil
    fw = firmware_dir / "edk2-2026.08-OVMF.amdsev.fd"
    (tmp_path / "store").mkdir()
    shutil.copyfile(fw, tmp_path / "store" / "ovmf.fd")
    (tmp_path / "fw.fd").symlink_to("store/ovmf.fd")
    policy = _policy_with_bytes(tmp_path, "fw.fd", hashlib.sha384(fw.read_bytes()).hexdigest())
    r = _cli("policy", "check", str(policy))
    assert r.returncode == 0, r


# -- REVIEW-7: an RSA tee-pubkey with an even modulus --------------------------------------------------
def test_rsa_tee_pubkey_with_an_even_modulus_is_refused_at_attest(broker: Any, sim: Any) -> None:
    srv, _ = broker
    _key, jwk = new_tee_key("RSA")
    n = int.from_bytes(base64.urlsafe_b64decode(jwk["n"] + "=="), "big") & ~1
    g = _session(srv)
    g.jwk = dict(jwk, n=b64url(n.to_bytes(256, "big")))
    g.evidence_for = lambda rd: sim.trustee_json(sim.sign_report(report_data=rd), include=("ARK", "ASK", "LEAF"))
    r = g.attest()
    assert r.status == 401 and "RSA modulus is even" in r.detail, r.body


# -- REVIEW-9: state outside the source tree, files 0600 ----------------------------------------------
def test_serve_without_db_keeps_its_state_in_the_state_dir_0600(tmp_path: Path) -> None:
    state = tmp_path / "xdg"
    (tmp_path / "policies").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIRMGATE_")}
    env["XDG_STATE_HOME"] = str(state)
    proc = subprocess.Popen([FIRMGATE, "serve", "--policies", str(tmp_path / "policies"),
                             "--port", str(port)], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if http("GET", f"http://127.0.0.1:{port}/healthz").status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        d = state / "firmgate"
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        files = sorted(p.name for p in d.iterdir())
        assert "firmgate.db" in files and "master.key" in files, files
        for f in d.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, (f.name, oct(f.stat().st_mode))
        assert not (tmp_path / "instance").exists()
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()
    r = _cli("serve", "--help")
    assert b"XDG_STATE_HOME" in r.stdout and b"FIRMGATE_STATE_DIR" in r.stdout
    assert "instance/" in (REPO / ".gitignore").read_text().split()


def test_an_explicit_sqlite_file_is_created_0600(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    app = create_app({"DATABASE_URL": f"sqlite:///{db}", "MASTER_KEY": secrets.token_bytes(32), "APPRAISER": object()})
    try:
        files = [p for p in tmp_path.iterdir() if p.name.startswith("b.db")]
        assert {p.name for p in files} >= {"b.db", "b.db-wal", "b.db-shm"}, files  # WAL: the pool holds a connection
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files), [(p.name, oct(p.stat().st_mode)) for p in files]
    finally:
        app.extensions["firmgate"].engine.dispose()


# -- REVIEW-10: the update channel's version is the integer 1 --------------------------------------------
@pytest.mark.parametrize("version", [True, 1.0, "1"])
def test_update_channel_version_must_be_the_integer_1(tmp_path: Path, version: Any) -> None:
    from host_install.channel import (
        ANSWER_MAGIC,
        REQUEST_MAGIC,
        Listener,
        encode_frame,
        read_frame,
    )
    from host_install.vm import VmDir
    vm = VmDir.create(tmp_path / "vm", snp=True)
    listener = Listener(vm, launch=False)
    t = threading.Thread(target=listener.serve, daemon=True)
    t.start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(vm.channel_path))
            s.sendall(encode_frame(REQUEST_MAGIC, {"version": version, "op": "install", "fwid": None}, b"MZ"))
            header, _ = read_frame(s, ANSWER_MAGIC)
        assert header["exit_code"] == 2 and "unsupported request version" in header["error"], header
    finally:
        listener.close()
        t.join(5)
