"""The KBS protocol over real HTTP on loopback, with the appraisal seam played by a test double.

The double stands in for the verifier so these tests pin the broker's own job
(sessions, nonces, bindings, release decisions, audit, JWE, tokens) on SQLite and
PostgreSQL; tests/test_broker_e2e.py runs the same flow with the real verifier.
"""
from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from typing import Any, Iterator

import pytest
from test_broker_support import (KBS_ERR, Guest, LiveServer, DbSpec, admin, db, guest_decrypt,  # noqa: F401
                                 http, random_master_key)

from broker import create_app
from broker.appraisal import Attested, Parsed
from verifier.errors import FirmwareError, MalformedReport
from verifier.verdict import CheckResult, Outcome, Verdict

GOOD_FW = "a" * 96
OTHER_FW = "b" * 96
OP = "operator-token-for-tests"


class FakeAppraiser:
    """Test double of appraisal.Appraiser: evidence is {"fake": {report_data, measurement}}."""

    def __init__(self) -> None:
        # tenant -> {"rev": int, "measurements": {hex: firmware id}, "resources": {path: [fw ids]}}
        self.policies: dict[str, dict[str, Any]] = {}
        self.firmware: set[str] = set()
        self.verify_calls = 0

    def parse(self, primary: Any) -> Parsed:
        if not isinstance(primary, dict) or not isinstance(primary.get("fake"), dict):
            raise MalformedReport("not fake evidence")
        f = primary["fake"]
        return Parsed(bytes.fromhex(f["report_data"]), bytes.fromhex(f.get("host_data", "00" * 32)),
                      bytes.fromhex(f["measurement"]), f)

    def verify(self, parsed: Parsed) -> Attested:
        self.verify_calls += 1
        f = parsed.handle
        return Attested(report_data=bytes.fromhex(f["report_data"]), host_data=bytes.fromhex(f.get("host_data", "00" * 32)),
                        measurement=bytes.fromhex(f["measurement"]), snp_claims={"measurement": f["measurement"]},
                        handle=f)

    def tenants(self) -> list[str]:
        return sorted(self.policies)

    def policy_id(self, tenant: str) -> str | None:
        p = self.policies.get(tenant)
        return None if p is None else f"{tenant}@{p['rev']}"

    def appraise(self, attested: Attested, tenant: str, expected_report_data: bytes,
                 expected_host_data: bytes | None = None) -> Verdict:
        p = self.policies[tenant]
        meas = attested.measurement.hex()
        fw = p["measurements"].get(meas)
        checks = (CheckResult("report.report_data", Outcome.PASS if attested.report_data == expected_report_data
                              else Outcome.FAIL, "report_data binding"),
                  CheckResult("firmware.measurement", Outcome.PASS if fw else Outcome.FAIL,
                              f"MEASUREMENT {meas[:12]}... " + ("matches " + fw if fw else "matches no allowed firmware")))
        return Verdict(checks=checks, policy_id=self.policy_id(tenant) or "",
                       facts={"firmware_id": fw, "measurement": meas})

    def release_allowed(self, tenant: str, verdict: Verdict, resource_path: str) -> tuple[bool, str]:
        allowed = self.policies[tenant]["resources"].get(resource_path)
        if allowed is None:
            return False, f"{resource_path} is not in the policy"
        fw = verdict.facts.get("firmware_id")
        return (fw in allowed, f"firmware {fw} " + ("may" if fw in allowed else "may not") + " receive it")

    def lists_firmware(self, tenant: str, data: bytes) -> bool:
        return hashlib.sha384(data).hexdigest() in self.policies.get(tenant, {}).get("firmware_digests", ())

    def trusts_endorsement(self, tenant: str, data: bytes) -> bool:
        return False

    def add_firmware(self, data: bytes) -> list[str]:
        digest = hashlib.sha384(data).hexdigest()
        if not any(digest in p.get("firmware_digests", ()) for p in self.policies.values()):
            raise FirmwareError(f"no policy allows firmware {digest[:16]}...")
        self.firmware.add(digest)
        return [digest]


def fake_evidence(measurement: str = GOOD_FW) -> Any:
    return lambda rd: {"fake": {"report_data": rd.hex(), "measurement": measurement}}


@pytest.fixture
def fake() -> FakeAppraiser:
    f = FakeAppraiser()
    f.policies["acme"] = {"rev": 1, "measurements": {GOOD_FW: "edk2-acme.3"},
                          "resources": {"acme/key/disk": ["edk2-acme.3"]}}
    f.policies["globex"] = {"rev": 1, "measurements": {OTHER_FW: "edk2-globex.1"},
                            "resources": {"globex/key/disk": ["edk2-globex.1"]}}
    return f


@pytest.fixture
def broker(db: DbSpec, fake: FakeAppraiser) -> Iterator[tuple[LiveServer, dict[str, Any]]]:
    cfg = {"DATABASE_URL": db.url, "MASTER_KEY": random_master_key(), "OPERATOR_TOKEN": OP,
           "APPRAISER": fake, "SESSION_TTL": 300}
    srv = LiveServer(create_app(cfg))
    tokens = {}
    for t in ("acme", "globex"):
        r = admin(srv.url, "POST", "/tenants", OP, {"name": t})
        assert r.status == 201, r.body
        tokens[t] = r.body["token"]
        assert admin(srv.url, "PUT", f"/secrets/{t}/key/disk", tokens[t], raw=f"{t}-disk-key".encode()).status == 201
    try:
        yield srv, {"cfg": cfg, "tokens": tokens, "db": db}
    finally:
        srv.stop()


def audit_of(srv: LiveServer, token: str) -> list[dict[str, Any]]:
    r = admin(srv.url, "GET", "/audit?limit=1000", token)
    assert r.status == 200
    return r.body["records"]


def assert_kbs_error(r: Any, status: int, variant: str, needle: str) -> None:
    assert r.status == status, (r.status, r.body)
    assert r.headers.get("Content-Type", "").startswith("application/json")
    assert r.body["type"] == KBS_ERR + variant, r.body
    assert needle in r.body["detail"], r.body["detail"]


# -- the happy paths ------------------------------------------------------------------------------
def test_release_cookie_and_bearer(broker: Any) -> None:
    srv, ctx = broker
    g = Guest(srv.url, fake_evidence())
    r = g.auth()
    assert r.status == 200 and r.body["extra-params"] == ""
    assert len(base64.b64decode(r.body["nonce"])) == 32
    cookie = r.headers.get("Set-Cookie")
    assert cookie.startswith("kbs-session-id=") and "Expires=" in cookie and "Path" not in cookie
    assert len(cookie.split(";")[0].split("=")[1]) == 32
    a = g.attest()
    assert a.status == 200, a.body
    assert g.fetch("acme/key/disk") == b"acme-disk-key"
    # Passport mode: no cookie, the token as Bearer (how the CDH in a CoCo pod asks).
    assert g.fetch("acme/key/disk", bearer=True) == b"acme-disk-key"
    rec = [x for x in audit_of(srv, ctx["tokens"]["acme"]) if x["event"] == "release"]
    assert len(rec) == 2 and rec[0]["firmware_id"] == "edk2-acme.3" and rec[0]["measurement"] == GOOD_FW
    assert rec[0]["verdict"]["accepted"] is True


def test_ear_token_claims_and_jwks(broker: Any) -> None:
    from joserfc import jwt
    from joserfc.jwk import KeySet
    srv, _ = broker
    g = Guest(srv.url, fake_evidence())
    g.auth()
    assert g.attest().status == 200
    header_b64, payload_b64, _ = g.token.split(".")
    assert "=" not in payload_b64
    header = json.loads(base64.urlsafe_b64decode(header_b64 + "=="))
    assert header["alg"] == "ES256" and header["typ"] == "JWT" and header["jwk"]["crv"] == "P-256"
    jwks = http("GET", srv.url + "/kbs/v0/jwks").body
    assert jwks == http("GET", srv.url + "/.well-known/jwks.json").body
    claims = jwt.decode(g.token, KeySet.import_key_set(jwks), algorithms=["ES256"]).claims
    assert isinstance(claims["iat"], int) and claims["exp"] - claims["iat"] == 300
    assert claims["eat_profile"] == "tag:github.com,2024:confidential-containers/Trustee"
    cpu0 = claims["submods"]["cpu0"]
    assert cpu0["ear.status"] == "affirming"
    assert cpu0["ear.veraison.annotated-evidence"]["runtime_data_claims"]["tee-pubkey"] == g.jwk
    assert set(cpu0["ear.trustworthiness-vector"]) >= {"instance-identity", "executables", "hardware"}


@pytest.mark.parametrize("kind", ["P-384", "P-521", "RSA"])
def test_release_other_key_types(broker: Any, kind: str) -> None:
    srv, _ = broker
    g = Guest(srv.url, fake_evidence(), key_kind=kind)
    g.auth()
    assert g.attest().status == 200
    assert g.fetch("acme/key/disk") == b"acme-disk-key"


# -- refusals, each with its reason in the response and the audit log ----------------------------
def test_replayed_nonce_refused(broker: Any) -> None:
    srv, ctx = broker
    g = Guest(srv.url, fake_evidence(), tenant_hint="acme")
    g.auth()
    body = g.attestation()
    assert g.attest(body).status == 200
    r = g.attest(body)
    assert_kbs_error(r, 401, "AttestationError", "already used")
    # refused before any evidence was checked: the operator's record, not acme's (REVIEW-1)
    assert any("already used" in x["reason"] and x["tenant"] is None for x in audit_of(srv, OP))
    assert not any("already used" in x["reason"] for x in audit_of(srv, ctx["tokens"]["acme"]))


def test_expired_session_refused(db: DbSpec, fake: FakeAppraiser) -> None:
    srv = LiveServer(create_app({"DATABASE_URL": db.url, "MASTER_KEY": random_master_key(),
                                 "OPERATOR_TOKEN": OP, "APPRAISER": fake, "SESSION_TTL": 1}))
    try:
        g = Guest(srv.url, fake_evidence(), tenant_hint="acme")
        sid = g.auth().headers["Set-Cookie"].split(";")[0]
        time.sleep(1.3)
        # A well-behaved client drops the expired cookie; a replaying one sends it anyway.
        assert_kbs_error(g.attest(), 401, "AttestationError", "no kbs-session-id cookie")
        r = http("POST", srv.url + "/kbs/v0/attest", g.attestation(), headers={"Cookie": sid})
        assert_kbs_error(r, 401, "AttestationError", "expired")
        assert any("expired" in x["reason"] for x in audit_of(srv, OP) if x["event"] == "attest")
    finally:
        srv.stop()


def test_wrong_report_data_refused(broker: Any) -> None:
    srv, _ = broker
    g = Guest(srv.url, fake_evidence())
    g.auth()
    r = g.attest(report_data=b"\x01" * 64)
    assert_kbs_error(r, 401, "AttestationError", "REPORT_DATA does not bind")
    assert any("REPORT_DATA does not bind" in x["reason"] for x in audit_of(srv, OP))
    # The nonce of another session does not help either.
    g2 = Guest(srv.url, fake_evidence())
    g2.auth()
    assert_kbs_error(g2.attest(nonce=g.nonce), 401, "AttestationError", "not this session's nonce")


def test_other_tenants_resource_refused(broker: Any) -> None:
    srv, ctx = broker
    g = Guest(srv.url, fake_evidence())
    g.auth()
    assert g.attest().status == 200
    for bearer in (False, True):
        r = g.resource("globex/key/disk", bearer=bearer)
        assert_kbs_error(r, 401, "PolicyDeny", "not allowed for this resource")
        assert "acme" not in r.body["detail"] and "firmware.measurement" not in r.body["detail"]
    denials = [x for x in audit_of(srv, ctx["tokens"]["globex"]) if x["event"] == "deny"]
    assert denials and denials[0]["resource"] == "globex/key/disk"
    # A repository nobody has: the same opaque answer, audit only for the operator.
    nobody = g.resource("nobody/key/disk")
    assert_kbs_error(nobody, 401, "PolicyDeny", "not allowed for this resource")
    assert nobody.body == r.body  # a repository without a policy cannot be told from a denial
    assert not any(x["resource"] == "nobody/key/disk" for x in audit_of(srv, ctx["tokens"]["acme"]))


def test_firmware_not_allowed_refused(broker: Any) -> None:
    srv, ctx = broker
    g = Guest(srv.url, fake_evidence("c" * 96), tenant_hint="acme")
    g.auth()
    a = g.attest()
    assert a.status == 200  # the evidence is genuine; the token says the policy contraindicates it
    payload = json.loads(base64.urlsafe_b64decode(g.token.split(".")[1] + "=="))
    assert payload["submods"]["cpu0"]["ear.status"] == "contraindicated"
    r = g.resource("acme/key/disk")
    assert_kbs_error(r, 401, "PolicyDeny", "not allowed for this resource (your evidence: MEASUREMENT " + "c" * 96)
    assert "matches no allowed firmware" not in r.body["detail"]  # the owner's audit has the reason
    rec = [x for x in audit_of(srv, ctx["tokens"]["acme"]) if x["event"] in ("deny", "attest")]
    assert any(x["event"] == "deny" and "matches no allowed firmware" in x["reason"] for x in rec)
    assert any(x["event"] == "attest" and x["outcome"] == "denied" for x in rec)


def test_policy_change_revokes_firmware(broker: Any, fake: FakeAppraiser) -> None:
    srv, ctx = broker
    g = Guest(srv.url, fake_evidence())
    g.auth()
    assert g.attest().status == 200
    assert g.fetch("acme/key/disk") == b"acme-disk-key"
    fake.policies["acme"] = dict(fake.policies["acme"], rev=2, measurements={})  # the owner revokes it
    for bearer in (False, True):
        assert_kbs_error(g.resource("acme/key/disk", bearer=bearer), 401, "PolicyDeny",
                         "not allowed for this resource")
    assert any(x["event"] == "deny" and "matches no allowed firmware" in x["reason"]
               for x in audit_of(srv, ctx["tokens"]["acme"]))


def test_resource_not_in_policy_refused(broker: Any, fake: FakeAppraiser) -> None:
    srv, ctx = broker
    assert admin(srv.url, "PUT", "/secrets/acme/key/other", ctx["tokens"]["acme"], raw=b"x").status == 201
    g = Guest(srv.url, fake_evidence())
    g.auth()
    g.attest()
    assert_kbs_error(g.resource("acme/key/other"), 401, "PolicyDeny", "not allowed for this resource")
    assert any("not in the policy" in x["reason"] for x in audit_of(srv, ctx["tokens"]["acme"]))


def test_unattested_and_bad_tokens_refused(broker: Any) -> None:
    srv, _ = broker
    g = Guest(srv.url, fake_evidence())
    assert_kbs_error(g.resource("acme/key/disk"), 401, "TokenNotFound", "Bearer")
    g.auth()
    assert_kbs_error(g.resource("acme/key/disk"), 401, "TokenNotFound", "not attested")
    g.attest()
    h, p, s = g.token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(p + "=="))
    claims["jti"] = "0" * 32
    forged = h + "." + base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode() + "." + s
    for tok in (forged, "a.b.c", "x" * 10):
        r = http("GET", srv.url + "/kbs/v0/resource/acme/key/disk", headers={"Authorization": f"Bearer {tok}"})
        assert_kbs_error(r, 401, "TokenVerifierError", "")


def test_nonce_race_exactly_one_wins(broker: Any) -> None:
    srv, _ = broker
    for _ in range(5):
        g = Guest(srv.url, fake_evidence())
        g.auth()
        body = g.attestation()
        results: list[int] = []
        barrier = threading.Barrier(2)

        def go() -> None:
            barrier.wait()
            results.append(g.attest(body).status)
        threads = [threading.Thread(target=go) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [200, 401]


# -- errors are JSON, never HTML, never 500 for bad input -----------------------------------------
def test_errors_are_json(broker: Any) -> None:
    srv, _ = broker
    u = srv.url
    assert_kbs_error(http("GET", u + "/kbs/v0/resource/a/b"), 404, "InvalidRequestPath", "")
    assert_kbs_error(http("GET", u + "/kbs/v0/resource/a/b/c/d"), 404, "InvalidRequestPath", "")
    assert_kbs_error(http("GET", u + "/kbs/v0/resource/a//b/c"), 404, "InvalidRequestPath", "")  # no 308 HTML
    assert_kbs_error(http("GET", u + "/kbs/v0/resource/..%2F/b/c"), 404, "InvalidRequestPath", "")
    assert_kbs_error(http("GET", u + "/kbs/v0/auth"), 405, "InvalidRequestPath", "")
    assert_kbs_error(http("POST", u + "/kbs/v0/auth", raw=b"{not json"), 401, "SerdeError", "")
    assert_kbs_error(http("POST", u + "/kbs/v0/auth", raw=b"[" * 50000), 401, "SerdeError", "")
    assert_kbs_error(http("POST", u + "/kbs/v0/auth", raw=b"x" * (200 * 1024)), 413, "SerdeError", "")
    assert_kbs_error(http("POST", u + "/kbs/v0/auth", {"version": "0.1.0", "tee": "snp"}), 401,
                     "AttestationError", "Version Mismatch")
    assert_kbs_error(http("POST", u + "/kbs/v0/auth", {"version": "0.4.0", "tee": "tdx"}), 401,
                     "AttestationError", "not supported")
    assert_kbs_error(http("POST", u + "/kbs/v0/attest", {}), 401, "AttestationError", "cookie")
    g = Guest(u, fake_evidence())
    g.auth()
    for bad in ({}, {"runtime-data": 5}, {"runtime-data": {"nonce": 1}},
                {"runtime-data": {"nonce": g.nonce, "tee-pubkey": {}}, "tee-evidence": []}):
        r = http("POST", u + "/kbs/v0/attest", bad, opener=g.opener)
        assert r.status == 401 and r.body["type"].startswith(KBS_ERR)
    r = g.attest(body={"runtime-data": {"nonce": g.nonce, "tee-pubkey": {"kty": "oct"}},
                       "tee-evidence": {"primary_evidence": {}, "additional_evidence": ""}})
    assert_kbs_error(r, 401, "AttestationError", "kty")
    r = http("GET", u + "/nope")
    assert r.status == 404 and r.headers["Content-Type"].startswith("application/problem+json")
    r = admin(u, "GET", "/secrets", "wrong")
    assert r.status == 401 and r.body["status"] == 401


def test_trustee_guest_evidence_shape_reaches_verifier(broker: Any, fake: FakeAppraiser) -> None:
    """A non-fake (here malformed) primary evidence is refused by the appraiser with its reason."""
    srv, _ = broker
    g = Guest(srv.url, lambda rd: {"attestation_report": {"version": 3}, "cert_chain": None})
    g.auth()
    assert_kbs_error(g.attest(), 401, "AttestationError", "evidence rejected: not fake evidence")


# -- storage --------------------------------------------------------------------------------------
def test_restart_keeps_secrets_and_db_has_no_plaintext(db: DbSpec, fake: FakeAppraiser) -> None:
    key = random_master_key()
    cfg = {"DATABASE_URL": db.url, "MASTER_KEY": key, "OPERATOR_TOKEN": OP, "APPRAISER": fake}
    srv = LiveServer(create_app(cfg))
    marker = b"PLAINTEXT-MARKER-" + base64.b16encode(key[:8])
    try:
        tok = admin(srv.url, "POST", "/tenants", OP, {"name": "acme"}).body["token"]
        assert admin(srv.url, "PUT", "/secrets/acme/key/disk", tok, raw=marker).status == 201
        jwks1 = http("GET", srv.url + "/kbs/v0/jwks").body
    finally:
        srv.stop()
    if db.path:
        import glob
        for f in glob.glob(db.path + "*"):
            with open(f, "rb") as fh:
                data = fh.read()
            assert marker not in data and tok.encode() not in data, f"plaintext in {f}"
    srv = LiveServer(create_app(cfg))  # a restarted broker (or a second replica)
    try:
        assert http("GET", srv.url + "/kbs/v0/jwks").body == jwks1  # same token key
        g = Guest(srv.url, fake_evidence())
        g.auth()
        assert g.attest().status == 200
        assert g.fetch("acme/key/disk") == marker
    finally:
        srv.stop()


def test_wrong_master_key_refuses_to_start(db: DbSpec, fake: FakeAppraiser) -> None:
    from broker.secretbox import SecretDecryptError
    cfg = {"DATABASE_URL": db.url, "MASTER_KEY": random_master_key(), "APPRAISER": fake}
    create_app(cfg).extensions["firmgate"].engine.dispose()
    with pytest.raises(SecretDecryptError):
        create_app(dict(cfg, MASTER_KEY=random_master_key()))


def test_two_replicas_share_sessions(db: DbSpec, fake: FakeAppraiser) -> None:
    cfg = {"DATABASE_URL": db.url, "MASTER_KEY": random_master_key(), "OPERATOR_TOKEN": OP, "APPRAISER": fake}
    a, b = LiveServer(create_app(cfg)), LiveServer(create_app(cfg))
    try:
        tok = admin(a.url, "POST", "/tenants", OP, {"name": "acme"}).body["token"]
        admin(b.url, "PUT", "/secrets/acme/key/disk", tok, raw=b"v")
        g = Guest(a.url, fake_evidence())
        g.auth()
        g.base = b.url  # the load balancer sends the next request to the other replica
        assert g.attest().status == 200
        g.base = a.url
        assert g.fetch("acme/key/disk", bearer=True) == b"v"
        g.base = b.url
        assert g.fetch("acme/key/disk") == b"v"
    finally:
        a.stop()
        b.stop()


# -- admin API ------------------------------------------------------------------------------------
def test_admin_tenant_isolation(broker: Any) -> None:
    srv, ctx = broker
    acme, globex = ctx["tokens"]["acme"], ctx["tokens"]["globex"]
    assert [s["path"] for s in admin(srv.url, "GET", "/secrets", acme).body["secrets"]] == ["acme/key/disk"]
    assert admin(srv.url, "PUT", "/secrets/globex/key/disk", acme, raw=b"overwrite").status == 404
    assert admin(srv.url, "DELETE", "/secrets/globex/key/disk", acme).status == 404
    assert all(r["tenant"] == "acme" for r in audit_of(srv, acme))
    assert all(r["tenant"] == "globex" for r in audit_of(srv, globex))
    assert admin(srv.url, "POST", "/tenants", acme, {"name": "evil"}).status == 403
    assert admin(srv.url, "POST", "/tenants", OP, {"name": "acme"}).status == 409
    assert admin(srv.url, "POST", "/tenants", OP, {"name": "../x"}).status == 400
    assert admin(srv.url, "PUT", "/secrets/acme/key/disk", acme, raw=b"v2").status == 200
    assert admin(srv.url, "DELETE", "/secrets/acme/key/disk", acme).status == 200
    assert admin(srv.url, "GET", "/secrets", acme).body["secrets"] == []
    assert admin(srv.url, "GET", "/audit?after=x", acme).status == 400


def test_admin_firmware_upload_only_allowed_digests(broker: Any, fake: FakeAppraiser) -> None:
    srv, ctx = broker
    fw = b"\x90" * 4096
    r = admin(srv.url, "POST", "/firmware", ctx["tokens"]["acme"], raw=fw)
    assert r.status == 422 and "not allowed by your policy" in r.body["detail"]
    # listed by another tenant only: the same answer as listed by nobody (REVIEW-5)
    fake.policies["globex"]["firmware_digests"] = {hashlib.sha384(fw).hexdigest()}
    r2 = admin(srv.url, "POST", "/firmware", ctx["tokens"]["acme"], raw=fw)
    assert (r2.status, r2.body) == (r.status, r.body)
    fake.policies["acme"]["firmware_digests"] = {hashlib.sha384(fw).hexdigest()}
    r = admin(srv.url, "POST", "/firmware", ctx["tokens"]["acme"], raw=fw)
    assert r.status == 201 and r.body["sha384"] == [hashlib.sha384(fw).hexdigest()]


def test_openapi_matches_routes(broker: Any) -> None:
    srv, _ = broker
    doc = http("GET", srv.url + "/openapi.json").body
    documented = {(p, m.upper()) for p, ops in doc["paths"].items() for m in ops}
    actual = set()
    for rule in srv.app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<repo>", "{repository}").replace("<rtype>", "{type}").replace("<tag>", "{tag}")
        for m in rule.methods - {"HEAD", "OPTIONS"}:
            actual.add((path, m))
    assert documented == actual


def test_healthz_and_metrics(broker: Any) -> None:
    srv, _ = broker
    g = Guest(srv.url, fake_evidence())
    g.auth()
    g.attest()
    g.fetch("acme/key/disk")
    assert http("GET", srv.url + "/healthz").body["status"] == "ok"
    assert http("GET", srv.url + "/metrics").status == 401   # it names tenants: the operator's token
    m = http("GET", srv.url + "/metrics", headers={"Authorization": f"Bearer {OP}"})
    text = m.body.decode()
    assert m.headers["Content-Type"].startswith("text/plain")
    assert 'firmgate_events_total{event="release",outcome="ok"}' in text
    assert "# TYPE firmgate_http_request_duration_seconds histogram" in text


def test_oversized_key_and_init_data_refused(broker: Any) -> None:
    srv, _ = broker
    g = Guest(srv.url, fake_evidence())
    g.auth()
    body = g.attestation()
    body["runtime-data"]["tee-pubkey"] = dict(g.jwk, junk="x" * 5000)
    assert_kbs_error(g.attest(body), 401, "SerdeError", "tee-pubkey is larger")
    body = g.attestation(init_data={"format": "toml", "body": "algorithm = \"sha384\"\n#" + "x" * 20000})
    assert_kbs_error(g.attest(body), 401, "SerdeError", "init-data is larger")
    # Neither consumed the nonce: the session still attests, and the token carries only what was bound.
    assert g.attest().status == 200
    claims = json.loads(base64.urlsafe_b64decode(g.token.split(".")[1] + "=="))
    rdc = claims["submods"]["cpu0"]["ear.veraison.annotated-evidence"]["runtime_data_claims"]
    assert rdc == {"nonce": g.nonce, "tee-pubkey": g.jwk}
