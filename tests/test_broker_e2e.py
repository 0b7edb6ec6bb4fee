"""The whole protocol over loopback HTTP with the REAL verifier and policy store.

Evidence comes from the `sim` platform (its root trusted explicitly, as
`--trust-root` does), the firmware is a real OVMF build from ../shared, the
reference measurement is what the tenant's policy computes for it, and the
guest is the protocol-faithful client in test_broker_support. Runs on SQLite
and, when FIRMGATE_TEST_PG_URL is set, PostgreSQL.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from test_broker_support import (KBS_ERR, DbSpec, Guest, LiveServer, admin, db, http,  # noqa: F401
                                 random_master_key)

from broker import create_app
from tests.conftest import FIRMWARE_DIR, KBS_VECTORS

OP = "e2e-operator"
FW_ACME = "edk2-2025.02-OVMF.fd"
FW_GLOBEX = "edk2-2022.11-OVMF.fd"


def _policy(tenant: str, fwid: str, digest: str, location: str, revoked: bool = False, note: str = "") -> str:
    """The bound form (sim.owner): the firmware enforces its boot chain, the tenant's author key is trusted."""
    from sim.owner import BOOT_CHAIN_REASON, Owner
    rev = f'revoked = ["{fwid}"]\n' if revoked else ""
    return f'''version = 1
description = "e2e test policy of {tenant}{note}"
[firmware]
{rev}[[firmware.allowed]]
id = "{fwid}"
sha384 = "{digest}"
svn = 3
bytes = "{location}"
enforces_boot_chain = "{BOOT_CHAIN_REASON}"

[[shapes]]
vmm = "qemu"
vcpus = [1, 2]
vcpu_types = ["EPYC-v4"]

[platform]
allow_simulated_platform = true
allow_provisional_firmware = true

[guest]

{Owner("e2e-" + tenant).id_block_toml()}
[[secrets]]
path = "{tenant}/key/disk"
firmware = ["{fwid}"]
'''


class Env:
    def __init__(self, root: Path) -> None:
        from sim.platform import SimPlatform
        from verifier.appraise.store import PolicyStore
        self.sim = SimPlatform("Milan")
        self.root_pem = root / "sim-root.pem"
        self.root_pem.write_bytes(self.sim.root_pem())
        self.policies = root / "policies"
        self.policies.mkdir()
        self.cache = root / "measure-cache"
        acme_fw = FIRMWARE_DIR / FW_ACME
        shutil.copyfile(acme_fw, (self.policies / "ovmf.fd"))  # must live in the policy tree
        self.acme_digest = hashlib.sha384(acme_fw.read_bytes()).hexdigest()
        self.globex_bytes = (FIRMWARE_DIR / FW_GLOBEX).read_bytes()
        self.globex_digest = hashlib.sha384(self.globex_bytes).hexdigest()
        self.write_acme()
        (self.policies / "globex.toml").write_text(
            _policy("globex", "edk2-2022.11", self.globex_digest, "uploaded"))
        table = PolicyStore(self.policies, cache_dir=self.cache).get("acme").table
        self.acme_measurement = table.entries()[0][0]

    def write_acme(self, revoked: bool = False, note: str = "") -> None:
        path = self.policies / "acme.toml"
        path.write_text(_policy("acme", "edk2-2025.02", self.acme_digest, "ovmf.fd", revoked, note))
        st = path.stat()  # the store notices changes by stat: make sure this one is visible
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))

    def evidence(self, measurement: bytes | None = None, shape: str = "trustee", owner: str = "acme") -> Any:
        """Evidence of `owner`'s signed launch (its ID block went through the simulated PSP)."""
        from sim.owner import Owner
        meas = measurement or self.acme_measurement
        launch = Owner("e2e-" + owner).launch_fields(self.sim, meas)

        def make(rd: bytes) -> Any:
            report = self.sim.sign_report(report_data=rd, **launch)
            if shape == "trustee":
                return self.sim.trustee_json(report, include=("ARK", "ASK", "LEAF"))
            return self.sim.firmgate_json(report)
        return make


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    if not (FIRMWARE_DIR / FW_ACME).is_file():
        pytest.fail(f"missing real firmware {FIRMWARE_DIR / FW_ACME}")
    return Env(tmp_path_factory.mktemp("e2e"))


@pytest.fixture
def broker(db: DbSpec, env: Env) -> Iterator[tuple[LiveServer, dict[str, str]]]:
    env.write_acme(revoked=False)
    cfg = {"DATABASE_URL": db.url, "MASTER_KEY": random_master_key(), "OPERATOR_TOKEN": OP,
           "POLICIES_DIR": str(env.policies), "TRUST_ROOT_PEM": str(env.root_pem), "MEASURE_CACHE": str(env.cache)}
    srv = LiveServer(create_app(cfg))
    assert srv.app.extensions["firmgate"].appraiser is not None, srv.app.extensions["firmgate"].appraiser_error
    tokens = {}
    for t in ("acme", "globex"):
        tokens[t] = admin(srv.url, "POST", "/tenants", OP, {"name": t}).body["token"]
        assert admin(srv.url, "PUT", f"/secrets/{t}/key/disk", tokens[t], raw=f"{t}-luks-key".encode()).status == 201
    try:
        yield srv, tokens
    finally:
        srv.stop()


def audit_reasons(srv: LiveServer, token: str, event: str) -> list[str]:
    recs = admin(srv.url, "GET", "/audit?limit=1000", token).body["records"]
    return [r["reason"] for r in recs if r["event"] == event]


def denied(r: Any, variant: str, needle: str) -> None:
    assert r.status == 401, (r.status, r.body)
    assert r.body["type"] == KBS_ERR + variant, r.body
    assert needle in r.body["detail"], r.body["detail"]


@pytest.mark.parametrize("shape", ["trustee", "firmgate"])
def test_release_with_real_verifier(broker: Any, env: Env, shape: str) -> None:
    srv, tokens = broker
    g = Guest(srv.url, env.evidence(shape=shape))
    assert g.auth().status == 200
    a = g.attest()
    assert a.status == 200, a.body
    assert g.fetch("acme/key/disk") == b"acme-luks-key"
    assert g.fetch("acme/key/disk", bearer=True) == b"acme-luks-key"
    recs = [r for r in admin(srv.url, "GET", "/audit", tokens["acme"]).body["records"] if r["event"] == "release"]
    assert recs[0]["firmware_id"] == "edk2-2025.02"
    assert recs[0]["measurement"] == env.acme_measurement.hex()
    assert recs[0]["verdict"]["accepted"] and recs[0]["verdict"]["facts"]["simulated"] is True


def test_wrong_report_data(broker: Any, env: Env) -> None:
    srv, _ = broker
    g = Guest(srv.url, env.evidence())
    g.auth()
    denied(g.attest(report_data=hashlib.sha512(b"another session").digest()), "AttestationError",
           "REPORT_DATA does not bind")
    assert any("REPORT_DATA does not bind" in r for r in audit_reasons(srv, OP, "attest"))


def test_replayed_nonce(broker: Any, env: Env) -> None:
    srv, _ = broker
    g = Guest(srv.url, env.evidence())
    g.auth()
    body = g.attestation()
    assert g.attest(body).status == 200
    denied(g.attest(body), "AttestationError", "already used")


def test_firmware_not_allowed(broker: Any, env: Env) -> None:
    srv, tokens = broker
    g = Guest(srv.url, env.evidence(measurement=hashlib.sha384(b"some other firmware").digest()),
              tenant_hint="acme")
    g.auth()
    assert g.attest().status == 200
    r = g.resource("acme/key/disk")
    denied(r, "PolicyDeny", "not allowed for this resource (your evidence: MEASUREMENT ")
    assert "reference measurements" not in r.body["detail"]  # nothing of the policy (REVIEW-5)
    assert any("policy rejected the evidence: " in x for x in audit_reasons(srv, tokens["acme"], "deny"))


def _cpu0(token: str | None) -> dict[str, Any]:
    assert token is not None
    return dict(json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))["submods"]["cpu0"])


def test_a_denied_token_says_nothing_of_the_named_tenants_policy(broker: Any, env: Env) -> None:
    """Any genuine VM may name any tenant. The token of a denial must not tell it which of that
    tenant's rules its launch met: acme's own firmware launched under another ID key (executables
    match, the binding fails) and unknown firmware get the same vector; acme's audit log has why."""
    srv, tokens = broker
    seen = []
    for ev in (env.evidence(owner="mallory"), env.evidence(measurement=hashlib.sha384(b"unknown").digest())):
        g = Guest(srv.url, ev, tenant_hint="acme")
        g.auth()
        assert g.attest().status == 200
        cpu0 = _cpu0(g.token)
        assert cpu0["ear.status"] == "contraindicated"
        seen.append(cpu0["ear.trustworthiness-vector"])
    assert seen[0] == seen[1], seen
    assert seen[0]["executables"] == 33 and seen[0]["configuration"] == 97
    reasons = audit_reasons(srv, tokens["acme"], "attest")
    assert any("id_block.trusted_key" in r for r in reasons) and any("firmware.measurement" in r for r in reasons)
    g = Guest(srv.url, env.evidence(), tenant_hint="acme")  # the owner's own launch: its vector affirms
    g.auth()
    assert g.attest().status == 200 and _cpu0(g.token)["ear.trustworthiness-vector"]["executables"] == 2


def test_other_tenants_resource(broker: Any, env: Env) -> None:
    srv, tokens = broker
    g = Guest(srv.url, env.evidence())
    g.auth()
    assert g.attest().status == 200
    denied(g.resource("globex/key/disk"), "PolicyDeny", "not allowed for this resource")
    denied(g.resource("globex/key/disk", bearer=True), "PolicyDeny", "not allowed for this resource")
    assert audit_reasons(srv, tokens["globex"], "deny")
    assert not any(r["tenant"] == "acme" for r in admin(srv.url, "GET", "/audit?limit=1000",
                                                        tokens["globex"]).body["records"])


def test_policy_change_revokes_firmware(broker: Any, env: Env) -> None:
    srv, tokens = broker
    g = Guest(srv.url, env.evidence())
    g.auth()
    assert g.attest().status == 200
    assert g.fetch("acme/key/disk") == b"acme-luks-key"
    env.write_acme(revoked=True)
    time.sleep(1.1)  # the policy store re-reads changed files at most once a second
    for bearer in (False, True):
        r = g.resource("acme/key/disk", bearer=bearer)
        assert r.status == 401, r.body
        assert r.body["type"] == KBS_ERR + "PolicyDeny"
        assert r.body["detail"].startswith("not allowed for this resource"), r.body["detail"]
    assert any("revoked" in x for x in audit_reasons(srv, tokens["acme"], "deny"))


@pytest.mark.parametrize("shape", ["trustee", "firmgate"])
def test_policy_edit_reappraises_stored_evidence(broker: Any, env: Env, shape: str) -> None:
    """A policy change that still allows the firmware: the next request re-appraises the evidence the
    session stored (compact firmgate JSON, re-verified) under the new policy and releases."""
    from sqlalchemy import create_engine, select

    from broker.db import Session
    srv, tokens = broker
    g = Guest(srv.url, env.evidence(shape=shape))
    g.auth()
    assert g.attest().status == 200
    assert g.fetch("acme/key/disk") == b"acme-luks-key"
    engine = create_engine(srv.app.config["DATABASE_URL"])
    with engine.connect() as conn:
        stored = conn.execute(select(Session.evidence_json).where(Session.state == "attested")
                              .order_by(Session.created_at.desc())).scalars().first()
    engine.dispose()
    assert stored is not None and len(stored) < 8000, len(stored or "")  # not Trustee's integer arrays
    compact = json.loads(stored)
    assert set(compact) == {"report", "cert_table", "certs"} and compact["cert_table"] is None
    env.write_acme(note=" (edited)")
    try:
        time.sleep(1.1)  # the policy store re-reads changed files at most once a second
        for bearer in (False, True):
            assert g.fetch("acme/key/disk", bearer=bearer) == b"acme-luks-key"
        recs = admin(srv.url, "GET", "/audit?limit=1000", tokens["acme"]).body["records"]
        releases = [r for r in recs if r["event"] == "release"]
        assert len({r["verdict"]["policy_id"] for r in releases}) == 2, [r["verdict"]["policy_id"] for r in releases]
    finally:
        env.write_acme()


def test_uploaded_firmware(broker: Any, env: Env) -> None:
    """globex's firmware is 'uploaded': only its allowed digest is taken, then it attests and releases."""
    srv, tokens = broker
    r = admin(srv.url, "POST", "/firmware", tokens["globex"], raw=b"\x00" * 65536)
    assert r.status == 422, r.body
    r = admin(srv.url, "POST", "/firmware", tokens["globex"], raw=env.globex_bytes)
    assert r.status == 201 and r.body["sha384"] == [env.globex_digest], r.body
    from verifier.appraise.store import PolicyStore
    store = PolicyStore(env.policies, cache_dir=env.cache)
    store.add_firmware(env.globex_bytes)
    meas = store.get("globex").table.entries()[0][0]
    g = Guest(srv.url, env.evidence(measurement=meas, owner="globex"))
    g.auth()
    assert g.attest().status == 200
    assert g.fetch("globex/key/disk") == b"globex-luks-key"


def test_real_trustee_evidence_is_parsed(broker: Any, env: Env) -> None:
    """The real Trustee fixture parses; its old report_data then fails the nonce binding."""
    srv, _ = broker
    fixture = json.loads((KBS_VECTORS / "trustee-e2e-snp-evidence.json").read_text())
    g = Guest(srv.url, lambda rd: fixture)
    g.auth()
    r = g.attest()
    denied(r, "AttestationError", "REPORT_DATA does not bind the session nonce")
    assert fixture["attestation_report"]["report_data"][:4] == list(bytes.fromhex(r.body["detail"].split(
        "report has ")[1][:8]))


def test_init_data_bound_through_host_data(broker: Any, env: Env) -> None:
    srv, _ = broker
    body = 'algorithm = "sha384"\nversion = "0.1.0"\n\n[data]\n"policy.rego" = "package agent_policy"\n'
    init = {"format": "toml", "body": body}
    host = hashlib.sha384(body.encode()).digest()[:32]

    from sim.owner import Owner
    launch = Owner("e2e-acme").launch_fields(env.sim, env.acme_measurement)

    def evidence(host_data: bytes) -> Any:
        def make(rd: bytes) -> Any:
            report = env.sim.sign_report(report_data=rd, host_data=host_data, **launch)
            return env.sim.trustee_json(report, include=("ARK", "ASK", "LEAF"))
        return make
    g = Guest(srv.url, evidence(host))
    g.auth()
    assert g.attest(init_data=init).status == 200
    assert g.fetch("acme/key/disk") == b"acme-luks-key"
    g = Guest(srv.url, evidence(b"\0" * 32))
    g.auth()
    denied(g.attest(init_data=init), "AttestationError", "HOST_DATA")
