"""Broker building blocks: JWE layout, REPORT_DATA / HOST_DATA bindings, sealed secrets,
tokens, release decisions, JSON bounds, schema migrations, and the CLI."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask
from hypothesis import given, settings
from hypothesis import strategies as st
from test_broker_support import b64url, guest_decrypt, new_tee_key

from broker import jwe, release, runtime_data, tokens
from broker.db import SCHEMA_VERSION, SchemaError, SchemaVersion, make_engine, migrate, schema_version
from broker.errors import ApiError
from broker.limits import (
    _RAW_NAMES,
    MAX_DEPTH,
    MAX_ITEMS,
    MAX_RAW,
    _check_shape,
    count_upto,
    json_body,
    json_larger_than,
    raw_excess,
)
from broker.secretbox import MasterKeyError, SecretBox, SecretDecryptError, parse_key_text
from verifier.errors import FirmgateError
from verifier.verdict import CheckResult, Outcome, Verdict


# -- JWE ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,coord", [("P-256", 32), ("P-384", 48), ("P-521", 66)])
def test_jwe_ec_header_exact_and_joserfc_decrypts(kind: str, coord: int) -> None:
    key, jwk = new_tee_key(kind)
    for _ in range(8):  # several ephemeral keys: some have short coordinates that must be left-padded
        out = jwe.encrypt(b"disk key", jwk)
        assert list(out) == ["protected", "encrypted_key", "iv", "ciphertext", "tag"]
        header_text = base64.urlsafe_b64decode(out["protected"] + "==").decode()
        h = json.loads(header_text)
        assert list(h) == ["alg", "enc", "epk"] and list(h["epk"]) == ["crv", "kty", "x", "y"]
        assert header_text == json.dumps(h, separators=(",", ":"))  # compact, no spaces
        assert h["alg"] == "ECDH-ES+A256KW" and h["enc"] == "A256GCM" and h["epk"]["crv"] == kind
        assert len(base64.urlsafe_b64decode(h["epk"]["x"] + "==")) == coord
        assert len(base64.urlsafe_b64decode(h["epk"]["y"] + "==")) == coord
        assert len(base64.urlsafe_b64decode(out["encrypted_key"] + "==")) == 40
        assert len(base64.urlsafe_b64decode(out["iv"] + "==")) == 12
        assert guest_decrypt(out, key) == b"disk key"


def test_jwe_rsa_oaep_256() -> None:
    key, jwk = new_tee_key("RSA")
    out = jwe.encrypt(b"x" * 1000, jwk)
    assert base64.urlsafe_b64decode(out["protected"] + "==") == b'{"alg":"RSA-OAEP-256","enc":"A256GCM"}'
    assert guest_decrypt(out, key) == b"x" * 1000


def test_jwe_aad_is_the_protected_string() -> None:
    """Changing the header's serialisation (same JSON value) breaks decryption: the AAD is the string."""
    from joserfc import jwe as jj
    from joserfc.errors import JoseError
    key, jwk = new_tee_key("P-256")
    out = jwe.encrypt(b"s", jwk)
    h = json.loads(base64.urlsafe_b64decode(out["protected"] + "=="))
    reordered = dict(out, protected=b64url(json.dumps({"enc": h["enc"], "alg": h["alg"], "epk": h["epk"]}).encode()))
    with pytest.raises((JoseError, ValueError)):
        jj.decrypt_json(reordered, key, algorithms=["ECDH-ES+A256KW", "A256GCM"])


@pytest.mark.parametrize("bad,why", [
    ({"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA"}, "curve"),
    ({"kty": "EC", "crv": "P-256", "alg": "ECDH-ES", "x": "AA", "y": "AA"}, "alg"),
    ({"kty": "EC", "crv": "P-256", "x": b64url(b"\1" * 32), "y": b64url(b"\2" * 32)}, "not a point"),
    ({"kty": "EC", "crv": "P-256", "x": b64url(b"\1" * 32) + "=", "y": "AA"}, "padding"),
    ({"kty": "EC", "crv": "P-256", "x": b64url(b"\1" * 40), "y": b64url(b"\1" * 40)}, "longer"),
    ({"kty": "RSA", "alg": "RSA-OAEP-256", "n": b64url(b"\xff" * 64), "e": "AQAB"}, "2048"),
    ({"kty": "RSA", "alg": "RSA1_5", "n": "AA", "e": "AQAB"}, "alg"),
    ({"kty": "oct", "k": "AA"}, "kty"),
    ([], "JWK object"),
])
def test_jwe_refuses_bad_keys(bad: Any, why: str) -> None:
    with pytest.raises(jwe.TeeKeyError, match=why):
        jwe.encrypt(b"s", bad)


# -- bindings ----------------------------------------------------------------------------------
def test_jcs_sha384_vector_from_trustee() -> None:
    # attestation-service/src/lib.rs test vector (KBS-FACTS section 3).
    import rfc8785
    assert hashlib.sha384(rfc8785.dumps({"b": 1, "a": "test", "c": {"d": "e"}})).hexdigest() == (
        "e71ce8e70d814ba6639c3612ebee0ff1f76f650f8dbb5e47157e0f3f525cd22c4597480a186427c813ca941da78870c3")


def test_report_data_matches_guest_derivation() -> None:
    _, jwk = new_tee_key("P-256")
    nonce = base64.b64encode(b"\7" * 32).decode()
    extra = '{"nvidia":{"x":1}}'
    guest = json.dumps({"tee-pubkey": jwk, "nonce": nonce, "additional-evidence": extra},
                       separators=(",", ":"), sort_keys=True).encode()
    expected = hashlib.sha384(guest).digest() + b"\0" * 16
    assert runtime_data.expected_report_data(nonce, jwk, extra) == expected
    runtime_data.check_report_data(expected, expected)
    with pytest.raises(runtime_data.BindingError, match="REPORT_DATA"):
        runtime_data.check_report_data(expected[:-1] + b"\1", expected)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(alphabet=st.characters(max_codepoint=127), max_size=12),
                       st.text(max_size=40), max_size=8),
       st.dictionaries(st.text(max_size=6), st.one_of(st.integers(-2**40, 2**40), st.booleans(), st.none(),
                                                       st.text(max_size=8)), max_size=4))
def test_jcs_flat_equals_rfc8785(flat: dict[str, str], mixed: dict[str, object]) -> None:
    """The orjson path of a JWK-shaped object (ASCII names, string values: control characters,
    quotes, non-ASCII, U+2028 in them) and the rfc8785 fallback give RFC 8785's bytes."""
    import rfc8785
    assert runtime_data.jcs_flat(flat) == rfc8785.dumps(flat)
    assert runtime_data.jcs_flat(mixed) == rfc8785.dumps(mixed)


def test_verdict_json_is_to_dict() -> None:
    """verdict_json writes the dataclasses straight through orjson: the same JSON as to_dict."""
    import orjson

    from broker.audit import verdict_json
    checks = tuple(CheckResult(f"c.{i}", o, f"m {i} \u2028\"", None if i % 2 else "e", "a" if i % 3 else None)
                   for i, o in enumerate(Outcome))
    v = Verdict(checks=checks, evidence_sha384="ab" * 48, policy_id="p@1",
                facts={"tcb": {"bl": 3}, "n": [1, 2], "k": {1: "int key"}, "b": b"bytes", "none": None})
    text = verdict_json(v)
    assert text == orjson.dumps(v.to_dict(), default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    assert json.loads(text)["checks"][1] == {"name": "c.1", "outcome": "warn", "message": "m 1 \u2028\"",
                                             "expected": None, "actual": "a"}


def test_initdata_host_data() -> None:
    body = 'algorithm = "sha384"\nversion = "0.1.0"\n[data]\n"aa.toml" = "x"\n'
    hd = runtime_data.initdata_host_data({"format": "toml", "body": body})
    assert hd == hashlib.sha384(body.encode()).digest()[:32]
    body256 = 'algorithm = "sha256"\n'
    assert runtime_data.initdata_host_data({"format": "toml", "body": body256}) == hashlib.sha256(
        body256.encode()).digest()
    assert runtime_data.initdata_host_data(None) is None
    for bad in ({"format": "json", "body": "{}"}, {"format": "toml", "body": "algorithm = 'md5'"},
                {"format": "toml", "body": "= broken"}, "text", {"format": "toml", "body": "", "x": 1}):
        with pytest.raises(runtime_data.BindingError):
            runtime_data.initdata_host_data(bad)
    with pytest.raises(runtime_data.BindingError, match="HOST_DATA"):
        runtime_data.check_host_data(b"\0" * 32, hd)


# -- sealed secrets ------------------------------------------------------------------------------
def test_secretbox_binds_tenant_and_path() -> None:
    box = SecretBox(b"k" * 32)
    nonce, ct = box.seal("acme", "acme/key/disk", b"value")
    assert b"value" not in ct and len(nonce) == 12
    assert box.open("acme", "acme/key/disk", nonce, ct) == b"value"
    for tenant, path in (("globex", "acme/key/disk"), ("acme", "acme/key/other")):
        with pytest.raises(SecretDecryptError):
            box.open(tenant, path, nonce, ct)
    with pytest.raises(SecretDecryptError):
        SecretBox(b"j" * 32).open("acme", "acme/key/disk", nonce, ct)
    assert box.seal("acme", "acme/key/disk", b"value")[0] != nonce  # fresh nonce each time


def test_master_key_forms() -> None:
    key = bytes(range(32))
    assert parse_key_text(key) == key
    assert parse_key_text(key.hex().encode() + b"\n") == key
    assert parse_key_text(base64.b64encode(key)) == key
    for bad in (b"short", b"z" * 64, base64.b64encode(b"x" * 31)):
        with pytest.raises(MasterKeyError):
            parse_key_text(bad)


# -- tokens -------------------------------------------------------------------------------------
def test_token_roundtrip_expiry_and_paths(tmp_path: Path) -> None:
    from sqlalchemy.orm import sessionmaker
    engine = make_engine(f"sqlite:///{tmp_path}/t.db")
    migrate(engine)
    with sessionmaker(engine)() as orm:
        key = tokens.TokenKey.load_or_create(orm, SecretBox(b"m" * 32))
        again = tokens.TokenKey.load_or_create(orm, SecretBox(b"m" * 32))
    assert key.public_jwk == again.public_jwk  # created once, shared by every replica
    _, jwk = new_tee_key("P-256")
    claims = tokens.ear_claims(session_id="ab" * 16, status="affirming", trust_vector={"hardware": 2},
                               policy_id="p", runtime_data={"nonce": "n", "tee-pubkey": jwk},
                               report_data=b"\0" * 64, init_data=None, host_data=b"\0" * 32, snp={}, ttl_s=60)
    tok = key.sign(claims)
    got = key.verify(tok)
    assert tokens.tee_pubkey_from_claims(got) == jwk and got["jti"] == "ab" * 16
    with pytest.raises(tokens.TokenError, match="expired"):
        key.verify(tok, now=int(time.time()) + 61)
    other = tokens.TokenKey(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(tokens.TokenError, match="signature"):
        other.verify(tok)
    assert tokens.tee_pubkey_from_claims({"customized_claims": {"runtime_data": {"tee-pubkey": {"k": 1}}}}) == {"k": 1}
    assert tokens.tee_pubkey_from_claims({"tee-pubkey": "not a dict"}) is None
    engine.dispose()


# -- release decisions ---------------------------------------------------------------------------
def _verdict(ok: bool) -> Verdict:
    return Verdict(checks=(CheckResult("firmware.measurement", Outcome.PASS if ok else Outcome.FAIL,
                                       "matches" if ok else "MEASUREMENT matches no allowed firmware"),))


def test_release_decide() -> None:
    d = release.decide(verdict=_verdict(True), path_allowed=(True, "fw may"), tenant_has_policy=True)
    assert d.allowed and d.reason == "fw may"
    cases = [
        (dict(verdict=_verdict(True), path_allowed=(True, ""), tenant_has_policy=False), "no policy"),
        (dict(verdict=None, path_allowed=None, tenant_has_policy=True), "not been appraised"),
        (dict(verdict=_verdict(False), path_allowed=None, tenant_has_policy=True), "matches no allowed firmware"),
        (dict(verdict=_verdict(True), path_allowed=(False, "revoked"), tenant_has_policy=True), "revoked"),
        (dict(verdict=_verdict(True), path_allowed=None, tenant_has_policy=True), "does not list"),
        (dict(verdict=Verdict(checks=()), path_allowed=(True, ""), tenant_has_policy=True), "no checks ran"),
    ]
    for kw, why in cases:
        d = release.decide(**kw)
        assert not d.allowed and why in d.reason, (kw, d)
    d = release.decide(verdict=_verdict(False), path_allowed=None, tenant_has_policy=True)
    assert d.public == d.reason == ("policy rejected the evidence: firmware.measurement: "
                                    "MEASUREMENT matches no allowed firmware")


# -- JSON bounds ----------------------------------------------------------------------------------
def test_json_shape_bounds() -> None:
    _check_shape(json.loads("[" * MAX_DEPTH + "]" * MAX_DEPTH))
    _check_shape({"a": list(range(10000))})
    with pytest.raises(ValueError, match="deeper"):
        _check_shape(json.loads("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)))
    deep: Any = 1
    for _ in range(MAX_DEPTH):
        deep = {"k": [deep]}
    with pytest.raises(ValueError, match="deeper"):
        _check_shape(deep)


def test_count_upto_counts_exactly_then_stops_past_the_cap() -> None:
    assert count_upto(b"", b",", 3) == 0
    assert count_upto(b"a,b,,c", b",", 3) == 3
    assert count_upto(bytearray(b",,,"), b",", 3) == 3
    assert count_upto(b"," * 1000, b",", 3) == 4  # stopped at cap + 1, not counted to the end


@pytest.mark.parametrize("byte", list(MAX_RAW))
def test_raw_counts_refuse_one_past_each_cap(byte: bytes) -> None:
    cap = MAX_RAW[byte]
    assert raw_excess(b"x" + byte * cap) is None
    assert raw_excess(b"x" + byte * (cap + 1)) == f"more than {cap} {_RAW_NAMES[byte]} in the request body"


def test_json_values_are_limited_after_parsing_where_the_raw_counts_pass() -> None:
    """The raw counts over-count (strings included); the exact rule is at most MAX_ITEMS values,
    counted on what orjson built. {"a": [n integers]} is n + 2 values and has n - 1 commas."""
    assert MAX_ITEMS - 2 <= MAX_RAW[b","]
    app = Flask(__name__)
    app.register_error_handler(ApiError, lambda e: (e.detail, e.status))
    for n, refused in ((MAX_ITEMS - 2, False), (MAX_ITEMS - 1, True)):
        body = json.dumps({"a": [0] * n}).encode()
        assert raw_excess(body) is None
        with app.test_request_context(method="POST", data=body, content_type="application/json"):
            if refused:
                with pytest.raises(ApiError, match=f"more than {MAX_ITEMS} JSON values"):
                    json_body()
            else:
                assert len(json_body()["a"]) == n


def test_json_larger_than_is_json_dumps_length_and_stops_early(monkeypatch: pytest.MonkeyPatch) -> None:
    limit = 100
    for value in ("x" * 98, "x" * 99, "\u00e9" * 16, "\u00e9" * 17, {"k": ["a" * 40, 1, None]}, [[]] * 40):
        assert json_larger_than(value, limit) == (len(json.dumps(value)) > limit), value
    # A 12 MiB non-ASCII string is refused on its characters: json.dumps (~90 ms and 40 MiB) never runs.
    import broker.limits

    def no_dumps(_value: Any) -> str:
        raise AssertionError("json.dumps ran on a value whose characters alone pass the limit")
    monkeypatch.setattr(broker.limits.json, "dumps", no_dumps)
    assert json_larger_than({"a": [1, "\u00e9" * (12 * 1024 * 1024)]}, 16 * 1024)


# -- schema ------------------------------------------------------------------------------------------
def test_migrate_creates_then_is_idempotent_and_refuses_newer(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/m.db")
    assert schema_version(engine) is None
    assert migrate(engine) == 0
    assert schema_version(engine) == SCHEMA_VERSION
    assert migrate(engine) == SCHEMA_VERSION
    with engine.begin() as conn:
        conn.execute(SchemaVersion.__table__.update().values(version=SCHEMA_VERSION + 1))
    with pytest.raises(SchemaError, match="newer"):
        migrate(engine)
    engine.dispose()


def test_migrate_runs_steps_from_an_older_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy import text

    from broker import db as dbmod
    engine = make_engine(f"sqlite:///{tmp_path}/old.db")
    migrate(engine)
    ran: list[int] = []

    def step(conn: Any) -> None:
        ran.append(SCHEMA_VERSION)
        conn.execute(text("CREATE TABLE fg_step_marker (x INTEGER)"))
    monkeypatch.setattr(dbmod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    monkeypatch.setitem(dbmod.MIGRATIONS, SCHEMA_VERSION, step)
    assert dbmod.migrate(engine) == SCHEMA_VERSION
    assert ran == [SCHEMA_VERSION] and dbmod.schema_version(engine) == SCHEMA_VERSION + 1
    monkeypatch.delitem(dbmod.MIGRATIONS, SCHEMA_VERSION)
    monkeypatch.setattr(dbmod, "SCHEMA_VERSION", SCHEMA_VERSION + 2)
    with pytest.raises(SchemaError, match="no migration step"):
        dbmod.migrate(engine)
    engine.dispose()


# -- CLI ----------------------------------------------------------------------------------------------
@dataclass
class Ran:
    returncode: int
    stdout: bytes
    stderr: bytes


def _fg(*args: str, stdin: bytes | None = None) -> Ran:
    """`firmgate ARGS` in-process (the same main() as the console script), output captured."""
    from verifier.cli import main
    out, err = io.StringIO(), io.StringIO()
    old = sys.stdin, sys.stdout, sys.stderr
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin or b""))
    sys.stdout, sys.stderr = out, err
    try:
        try:
            rc = main(list(args))
        except SystemExit as exc:
            rc = int(exc.code or 0)
    finally:
        sys.stdin, sys.stdout, sys.stderr = old
    return Ran(rc, out.getvalue().encode(), err.getvalue().encode())


def test_cli_tenant_and_secrets(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/cli.db"
    key = tmp_path / "master.key"
    key.write_bytes(b"\x11" * 32)
    common = ["--db", db, "--master-key-file", str(key)]
    r = _fg("tenant", "add", "acme", *common)
    assert r.returncode == 0 and r.stdout.decode().startswith("fgt_")
    assert _fg("tenant", "add", "acme", *common).returncode == 2
    r = _fg("secret", "put", "acme/key/disk", "--value", "CLI-SECRET-VALUE", *common)
    assert r.returncode == 0, r.stderr
    assert _fg("secret", "put", "acme/key/stdin", *common, stdin=b"from stdin").returncode == 0
    r = _fg("secret", "list", "acme", "--json", "--db", db)
    assert [x["path"] for x in json.loads(r.stdout)] == ["acme/key/disk", "acme/key/stdin"]
    assert b"CLI-SECRET-VALUE" not in (tmp_path / "cli.db").read_bytes()
    for bad in (["secret", "put", "nobody/key/x", "--value", "v", *common],
                ["secret", "put", "acme/../x", "--value", "v", *common],
                ["secret", "rm", "acme/key/missing", *common],
                ["secret", "put", "acme/key/x", "--value", "v", "--db", db, "--master-key-file", str(tmp_path / "no")]):
        r = _fg(*bad)
        assert r.returncode == 2 and r.stderr.decode().startswith("error: "), (bad, r.stderr)
        assert b"Traceback" not in r.stderr
    assert _fg("secret", "rm", "acme/key/disk", *common).returncode == 0
    # The broker reads what the CLI stored.
    from broker import create_app, vault
    app = create_app({"DATABASE_URL": db, "MASTER_KEY_FILE": str(key), "APPRAISER": object()})
    st = app.extensions["firmgate"]
    with st.sessions() as orm:
        assert vault.get_secret(orm, st.box, "acme", vault.ResourcePath.parse("acme/key/stdin")) == b"from stdin"
    st.engine.dispose()


def test_cli_console_script_one_line_error(tmp_path: Path) -> None:
    r = subprocess.run([str(Path(sys.executable).parent / "firmgate"), "secret", "rm", "acme/key/x", "--db",
                        f"sqlite:///{tmp_path}/x.db"], capture_output=True, timeout=120)
    assert r.returncode == 2 and r.stderr == b"error: no tenant acme: run `firmgate tenant add acme` first\n"


def test_cli_serve_bad_arguments(tmp_path: Path) -> None:
    r = _fg("serve", "--policies", str(tmp_path / "missing"))
    assert r.returncode == 2 and b"no such directory" in r.stderr
    r = _fg("serve", "--policies", str(tmp_path), "--trust-root", str(tmp_path / "none.pem"))
    assert r.returncode == 2 and b"no such file" in r.stderr


def test_firmgate_error_tree_used() -> None:
    assert issubclass(SchemaError, FirmgateError) and issubclass(jwe.TeeKeyError, FirmgateError)


def test_database_outage_is_a_503_json(tmp_path: Path) -> None:
    """Every route answers 503 problem JSON (KBS shape on /kbs) while the database is unreachable."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    from broker import create_app
    app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path}/o.db", "MASTER_KEY": b"o" * 32,
                      "OPERATOR_TOKEN": "op", "APPRAISER": object()})
    st = app.extensions["firmgate"]
    dead = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")
    st.sessions = sessionmaker(dead)  # the ORM routes (admin)
    st.engine = dead                  # the KBS routes' Core connection
    c = app.test_client()
    # /auth needs no database (its challenge is stateless, broker/nonces.py): it still answers.
    auth = c.post("/kbs/v0/auth", json={"version": "0.4.0", "tee": "snp"})
    assert auth.status_code == 200 and auth.get_json()["nonce"]
    for method, url, kw in (("POST", "/kbs/v0/attest", {"json": {}}),
                            ("GET", "/kbs/v0/resource/a/b/c", {}),
                            ("GET", "/admin/v0/secrets", {"headers": {"Authorization": "Bearer fgt_x"}}),
                            ("GET", "/healthz", {})):
        r = c.open(url, method=method, **kw)
        assert r.status_code == 503, (url, r.status_code, r.data[:200])
        body = r.get_json()
        assert isinstance(body["detail"], str) and body["detail"]
        if url.startswith("/kbs/"):
            assert body["type"].startswith("https://github.com/confidential-containers/kbs/errors/")
    dead.dispose()


def test_purge_sessions_and_audit_retention(tmp_path: Path) -> None:
    from sqlalchemy.orm import sessionmaker

    from broker import audit, nonces
    from broker.db import AuditRecord, Session, now_ms
    engine = make_engine(f"sqlite:///{tmp_path}/p.db")
    migrate(engine)
    day = 86400 * 1000
    with sessionmaker(engine)() as orm:
        key = nonces.nonce_key(b"\x01" * 32)
        live = nonces.new_session(key, "snp", 300, None)
        dead = nonces.new_session(key, "snp", 300, None)
        for s in (live, dead):
            assert nonces.consume(orm, key, s.id, s.nonce).ok
        orm.query(Session).filter(Session.id == dead.id).update({"expires_at": now_ms() - 2 * 3600 * 1000})
        for event, age in (("auth", 2 * day), ("auth", 0), ("release", 2 * day), ("release", 100 * day)):
            audit.record(orm, event=event, outcome="ok", reason=f"{event} {age}", commit=False)
            orm.flush()
        orm.query(AuditRecord).filter(AuditRecord.reason.like("% 0")).update({"at": now_ms()})
        for r in orm.query(AuditRecord).all():
            r.at = now_ms() - int(r.reason.split()[1])
        orm.commit()
        nonces.purge_expired(orm, audit_days=90, auth_audit_hours=24)
        assert {s.id for s in orm.query(Session).all()} == {live.id}
        assert sorted(r.reason for r in orm.query(AuditRecord).all()) == [
            "auth 0", f"release {2 * day}"]
    engine.dispose()


def test_json_provider_keeps_order_and_falls_back_for_big_integers(tmp_path: Path) -> None:
    """Responses keep members as built (JWE/JWKS), and what orjson cannot encode still encodes."""
    import json as std_json

    from broker import create_app
    app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path}/j.db", "MASTER_KEY": b"j" * 32,
                      "APPRAISER": object()})
    with app.app_context():
        from flask import jsonify
        body = jsonify({"protected": 1, "encrypted_key": 2, "iv": 3}).get_data()
        assert body == b'{"protected":1,"encrypted_key":2,"iv":3}\n'
        big = {"n": 1 << 70, "k": Path("x")}
        assert std_json.loads(app.json.dumps(big)) == {"n": 1 << 70, "k": "x"}
        assert std_json.loads(jsonify(big).get_data()) == {"n": 1 << 70, "k": "x"}
        assert app.json.loads(b'{"a": [1, 2]}') == {"a": [1, 2]}
