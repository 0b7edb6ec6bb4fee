"""Shared helpers for the broker tests: databases, a live server on loopback, a KBS guest.

The guest here computes REPORT_DATA and decrypts the JWE the way KBS-FACTS says
a Trustee guest does (its own code, not the broker's), so the tests check the
broker against the protocol rather than against itself.
"""
from __future__ import annotations

import base64
import hashlib
from http.cookiejar import CookieJar
import json
import os
import secrets
import threading
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest
from sqlalchemy import create_engine, text
from werkzeug.serving import make_server

PG_URL = os.environ.get("FIRMGATE_TEST_PG_URL")
KBS_ERR = "https://github.com/confidential-containers/kbs/errors/"


# -- databases ------------------------------------------------------------------------------
@dataclass
class DbSpec:
    url: str
    kind: str
    path: str | None = None  # the SQLite file


def _pg_schema_url(schema: str) -> str:
    assert PG_URL is not None
    sep = "&" if "?" in PG_URL else "?"
    return f"{PG_URL}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[DbSpec]:
    if request.param == "sqlite":
        path = str(tmp_path / "broker.db")
        yield DbSpec("sqlite:///" + path, "sqlite", path)
        return
    if not PG_URL:
        pytest.skip("FIRMGATE_TEST_PG_URL not set")
    schema = "fg_test_" + uuid.uuid4().hex[:12]
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield DbSpec(_pg_schema_url(schema), "postgres")
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


# -- live server --------------------------------------------------------------------------------
class LiveServer:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.app.extensions["firmgate"].engine.dispose()


@dataclass
class Reply:
    status: int
    body: Any
    headers: Any

    @property
    def detail(self) -> str:
        return str(self.body.get("detail", "")) if isinstance(self.body, dict) else ""


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
         opener: urllib.request.OpenerDirector | None = None, raw: bytes | None = None) -> Reply:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if body is not None and raw is None:
        req.add_header("Content-Type", "application/json")
    op = opener or urllib.request.build_opener()
    try:
        with op.open(req, timeout=30) as resp:
            payload = resp.read()
            status, hdrs = resp.status, resp.headers
    except urllib.error.HTTPError as err:
        payload, status, hdrs = err.read(), err.code, err.headers
    ctype = hdrs.get("Content-Type", "")
    parsed: Any = json.loads(payload) if "json" in ctype and payload else payload
    return Reply(status, parsed, hdrs)


# -- the guest ----------------------------------------------------------------------------------
def b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def guest_report_data(nonce: str, jwk: dict[str, Any], additional: str = "") -> bytes:
    """The guest's REPORT_DATA (KBS-FACTS section 3): sha384 over the canonical JSON, padded to 64."""
    obj = {"tee-pubkey": jwk, "nonce": nonce, "additional-evidence": additional}
    canon = json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha384(canon).digest() + b"\0" * 16


def new_tee_key(kind: str = "P-256") -> tuple[Any, dict[str, Any]]:
    """(joserfc private key, the JWK the guest sends) like guest-components keypair.rs."""
    from joserfc.jwk import ECKey, RSAKey
    if kind == "RSA":
        key = RSAKey.generate_key(2048)
        pub = key.as_dict(private=False)
        return key, {"kty": "RSA", "alg": "RSA-OAEP-256", "n": pub["n"], "e": pub["e"]}
    key = ECKey.generate_key(kind)
    pub = key.as_dict(private=False)
    return key, {"kty": "EC", "crv": kind, "alg": "ECDH-ES+A256KW", "x": pub["x"], "y": pub["y"]}


def guest_decrypt(jwe: dict[str, str], key: Any) -> bytes:
    """Decrypt as the Trustee guest does: re-serialise the header for the AAD, then joserfc."""
    from joserfc import jwe as jj
    for k in ("protected", "encrypted_key", "iv", "ciphertext", "tag"):
        assert isinstance(jwe[k], str) and "=" not in jwe[k], f"{k} must be unpadded base64url"
    header = json.loads(base64.urlsafe_b64decode(jwe["protected"] + "=" * (-len(jwe["protected"]) % 4)))
    # serde: ProtectedHeader{alg, enc, #[flatten] other} -> alg, enc, then the rest (sorted map)
    rebuilt = {"alg": header["alg"], "enc": header["enc"]}
    for k in sorted(k for k in header if k not in ("alg", "enc")):
        v = header[k]
        rebuilt[k] = {kk: v[kk] for kk in sorted(v)} if isinstance(v, dict) else v
    assert b64url(json.dumps(rebuilt, separators=(",", ":")).encode()) == jwe["protected"]
    return jj.decrypt_json(jwe, key, algorithms=["ECDH-ES+A256KW", "RSA-OAEP-256", "A256GCM"]).plaintext


@dataclass
class Guest:
    base: str
    evidence_for: Any  # callable(report_data: bytes) -> primary_evidence JSON
    key_kind: str = "P-256"
    tenant_hint: str | None = None
    jar: CookieJar = field(default_factory=CookieJar)

    def __post_init__(self) -> None:
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        self.key, self.jwk = new_tee_key(self.key_kind)
        self.token: str | None = None
        self.nonce: str | None = None

    def auth(self) -> Reply:
        extra: dict[str, Any] = {"supported-hash-algorithms": ["sha256", "sha384", "sha512", "sm3"]}
        if self.tenant_hint:
            extra["tenant"] = self.tenant_hint
        r = http("POST", self.base + "/kbs/v0/auth", {"version": "0.4.0", "tee": "snp", "extra-params": extra},
                 opener=self.opener)
        if r.status == 200:
            self.nonce = r.body["nonce"]
        return r

    def attestation(self, nonce: str | None = None, report_data: bytes | None = None,
                    additional: str = "", init_data: Any = None) -> dict[str, Any]:
        n = nonce if nonce is not None else self.nonce
        assert n is not None
        rd = report_data if report_data is not None else guest_report_data(n, self.jwk, additional)
        return {"init-data": init_data, "runtime-data": {"nonce": n, "tee-pubkey": self.jwk},
                "tee-evidence": {"primary_evidence": self.evidence_for(rd), "additional_evidence": additional}}

    def attest(self, body: dict[str, Any] | None = None, **kw: Any) -> Reply:
        r = http("POST", self.base + "/kbs/v0/attest", body or self.attestation(**kw), opener=self.opener)
        if r.status == 200:
            self.token = r.body["token"]
        return r

    def resource(self, path: str, bearer: bool = False) -> Reply:
        if bearer:  # the CDH way: a fresh client, no cookie, the token as Bearer
            return http("GET", self.base + "/kbs/v0/resource/" + path,
                        headers={"Authorization": f"Bearer {self.token}"})
        return http("GET", self.base + "/kbs/v0/resource/" + path, opener=self.opener)

    def fetch(self, path: str, bearer: bool = False) -> bytes:
        r = self.resource(path, bearer)
        assert r.status == 200, (r.status, r.body)
        return guest_decrypt(r.body, self.key)


def admin(base: str, method: str, path: str, token: str, body: Any = None, raw: bytes | None = None) -> Reply:
    return http(method, base + "/admin/v0" + path, body=body, raw=raw, headers={"Authorization": f"Bearer {token}"})


def random_master_key() -> bytes:
    return secrets.token_bytes(32)
