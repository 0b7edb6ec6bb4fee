"""Owner-bound release over real HTTP (issue 13, item 7), with the real verifier, policy store and broker.

Four tenants list the SAME real OVMF build and shape (the normal case: a distribution's OVMF):
- acme and globex: the bound form (sim.owner.bound_policy): the firmware enforces its boot chain,
  and each trusts only its own owner's author key;
- loose: no owner binding, its secret says `unsafe_unbound = true`;
- lax: no owner binding and no `unsafe_unbound`: refused at load, so it has no policy at all.
Reports come from the sim platform; a signed launch went through the simulated PSP (sim.psp).
"""
from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_broker_support import KBS_ERR, Guest, LiveServer, admin, random_master_key

from broker import create_app
from sim.owner import Owner, bound_policy
from sim.platform import SimPlatform
from sim.psp import launch_fields
from tests.conftest import FIRMWARE_DIR
from verifier.idblock import IdBlock, sign

FW = "edk2-2022.11-OVMF.fd"     # 2 MiB with SEV metadata: the quickest real image to measure
OP = "binding-operator"
SHAPE = '[[shapes]]\nvmm = "qemu"\nvcpus = [1]\nvcpu_types = ["EPYC-v4"]'


def _unbound_policy(tenant: str, digest: str, secret_extra: str) -> str:
    return (f'version = 1\n[firmware]\n[[firmware.allowed]]\nid = "ovmf"\nsha384 = "{digest}"\nsvn = 1\n'
            f'bytes = "ovmf.fd"\n{SHAPE}\n[platform]\nallow_simulated_platform = true\n'
            f'[[secrets]]\npath = "{tenant}/key/disk"\n{secret_extra}')


class World:
    def __init__(self, root: Path) -> None:
        from verifier.appraise.store import PolicyStore
        fw = FIRMWARE_DIR / FW
        if not fw.is_file():
            pytest.fail(f"missing real firmware {fw}")
        self.sim = SimPlatform("Milan")
        self.root_pem = root / "sim-root.pem"
        self.root_pem.write_bytes(self.sim.root_pem())
        self.policies = root / "policies"
        self.policies.mkdir()
        (self.policies / "ovmf.fd").write_bytes(fw.read_bytes())  # policy files live inside the policy tree
        digest = hashlib.sha384(fw.read_bytes()).hexdigest()
        self.owners = {t: Owner(f"binding-{t}") for t in ("acme", "globex")}
        for t, owner in self.owners.items():
            (self.policies / f"{t}.toml").write_text(
                bound_policy(owner, t, [("ovmf", digest, 1, "ovmf.fd")], secrets=[f"{t}/key/disk"], shapes=SHAPE))
        (self.policies / "loose.toml").write_text(_unbound_policy("loose", digest, "unsafe_unbound = true\n"))
        (self.policies / "lax.toml").write_text(_unbound_policy("lax", digest, ""))
        self.cache = root / "measure-cache"
        self.measurement = PolicyStore(self.policies, cache_dir=self.cache).get("acme").table.entries()[0][0]

    def evidence(self, launch: dict[str, Any]) -> Any:
        def make(rd: bytes) -> Any:
            return self.sim.trustee_json(self.sim.sign_report(report_data=rd, **launch), include=("ARK", "ASK", "LEAF"))
        return make

    def signed_by(self, tenant: str) -> Any:
        return self.evidence(self.owners[tenant].launch_fields(self.sim, self.measurement))

    def unsigned(self) -> Any:
        return self.evidence(launch_fields(self.sim, self.measurement))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return World(tmp_path_factory.mktemp("binding"))


@pytest.fixture(scope="module")
def broker(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, dict[str, str]]]:
    db = tmp_path_factory.mktemp("binding-db") / "broker.db"
    cfg = {"DATABASE_URL": f"sqlite:///{db}", "MASTER_KEY": random_master_key(), "OPERATOR_TOKEN": OP,
           "POLICIES_DIR": str(world.policies), "TRUST_ROOT_PEM": str(world.root_pem),
           "MEASURE_CACHE": str(world.cache)}
    srv = LiveServer(create_app(cfg))
    tokens = {}
    for t in ("acme", "globex", "loose", "lax"):
        tokens[t] = admin(srv.url, "POST", "/tenants", OP, {"name": t}).body["token"]
        assert admin(srv.url, "PUT", f"/secrets/{t}/key/disk", tokens[t], raw=f"{t} disk key".encode()).status == 201
    try:
        yield srv, tokens
    finally:
        srv.stop()


def _denied(broker: Any, r: Any, owner: str, needle: str) -> str:
    """The guest gets only the generic denial (issue 14: a denial names nothing of the owner's
    policy); the owner's audit log has the reason, which must name `needle`."""
    srv, tokens = broker
    assert r.status == 401, (r.status, r.body)
    assert r.body["type"] == KBS_ERR + "PolicyDeny", r.body
    assert "not allowed for this resource" in r.body["detail"] and needle not in r.body["detail"], r.body
    reason = str(_audit(srv, tokens[owner], "deny")[-1]["reason"])
    assert needle in reason, reason
    return reason


def _attested(srv: LiveServer, evidence: Any, hint: str | None = None) -> Guest:
    g = Guest(srv.url, evidence, tenant_hint=hint) if hint else Guest(srv.url, evidence)
    assert g.auth().status == 200
    a = g.attest()
    assert a.status == 200, a.body
    return g


def _ear_status(token: str) -> str:
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return str(claims["submods"]["cpu0"]["ear.status"])


def _audit(srv: LiveServer, token: str, event: str) -> list[dict[str, Any]]:
    recs = admin(srv.url, "GET", "/audit?limit=1000", token).body["records"]
    return [r for r in recs if r["event"] == event]


def test_owner_signed_launch_is_released(broker: Any, world: World) -> None:
    srv, tokens = broker
    g = _attested(srv, world.signed_by("acme"))      # an unmodified guest: no tenant hint
    assert g.fetch("acme/key/disk") == b"acme disk key"
    assert g.fetch("acme/key/disk", bearer=True) == b"acme disk key"
    rel = _audit(srv, tokens["acme"], "release")[-1]
    checks = {c["name"]: c for c in rel["verdict"]["checks"]}
    assert checks["id_block.trusted_key"]["outcome"] == "pass"
    assert checks["binding.owner_launch"]["outcome"] == "pass"
    assert rel["verdict"]["facts"]["binding"]["bound"] is True
    assert not rel["reason"].startswith("WARNING")


def test_look_alike_vm_of_another_tenant_is_denied_by_name(broker: Any, world: World) -> None:
    """globex's VM: same firmware, same shape, so the same MEASUREMENT; it is globex's own launch."""
    srv, tokens = broker
    g = _attested(srv, world.signed_by("globex"))
    assert g.fetch("globex/key/disk") == b"globex disk key"       # its own secret: yes
    for bearer in (False, True):
        detail = _denied(broker, g.resource("acme/key/disk", bearer=bearer), "acme", "id_block.trusted_key")
        assert "the launch was signed by someone else" in detail


def test_unsigned_look_alike_is_denied(broker: Any, world: World) -> None:
    """Any VM anyone launches with that firmware and no ID block."""
    srv, _ = broker
    g = _attested(srv, world.unsigned(), hint="acme")
    _denied(broker, g.resource("acme/key/disk"), "acme", "launched without an ID block")
    _denied(broker, g.resource("globex/key/disk"), "globex", "id_block.trusted_key")


def test_wrong_author_key_is_denied(broker: Any, world: World) -> None:
    """acme's ID key, but vouched for by an author key acme does not trust: the PSP launches it
    (its signatures are valid) and the report names that author key."""
    srv, _ = broker
    acme, stranger = world.owners["acme"], Owner("binding-stranger")
    block, auth = sign(IdBlock(world.measurement, guest_svn=1), acme.id_key, stranger.author_key)
    launch = launch_fields(world.sim, world.measurement, id_block=block, id_auth=auth, author_key_enabled=True)
    assert launch["author_key_digest"] == stranger.author_digest
    g = _attested(srv, world.evidence(launch), hint="acme")
    detail = _denied(broker, g.resource("acme/key/disk"), "acme", "id_block.trusted_key")
    assert stranger.author_digest.hex()[:16] in detail


def test_unbound_policy_is_refused_at_load(broker: Any, world: World) -> None:
    srv, _ = broker
    store = srv.app.extensions["firmgate"].appraiser._store
    errors = [e.diagnostics() for e in store.last_errors("lax")]
    assert len(errors) == 1 and "lax/key/disk" in errors[0] and "not bound to its owner" in errors[0]
    assert "unsafe_unbound = true" in errors[0]
    g = _attested(srv, world.signed_by("acme"))
    r = g.resource("lax/key/disk")
    assert r.status == 401 and "not allowed for this resource" in r.body["detail"], r.body
    # `firmgate policy check` refuses it too (exit 1), naming the secret's line.
    from verifier.cli import main
    assert main(["policy", "check", str(world.policies / "lax.toml")]) == 1


def test_unsafe_unbound_is_released_with_a_warning(broker: Any, world: World) -> None:
    srv, tokens = broker
    g = _attested(srv, world.unsigned())
    assert _ear_status(g.token) == "warning"                       # the EAR says so
    assert g.fetch("loose/key/disk") == b"loose disk key"
    rel = _audit(srv, tokens["loose"], "release")[-1]
    assert rel["reason"].startswith("WARNING unsafe_unbound: launch not bound to its owner")   # the audit row
    checks = {c["name"]: c for c in rel["verdict"]["checks"]}                                  # the verdict
    assert checks["binding.owner_launch"]["outcome"] == "warn"
    assert "UNSAFE" in checks["binding.owner_launch"]["message"] and "loose/key/disk" in checks["binding.owner_launch"]["message"]
    assert rel["verdict"]["facts"]["binding"] == {"bound": False, "pinned_by": None, "owner_named_by": None}
    # ...while the bound tenants' secrets stay out of this VM's reach.
    _denied(broker, g.resource("acme/key/disk"), "acme", "id_block.trusted_key")

