"""Publisher-endorsed firmware through the real broker over HTTP on loopback (SQLite, simulated SNP host):
a fixed build (svn 3) endorsed by a trusted publisher is released a secret with no policy commit; the
same build endorsed by an untrusted key, a revoked build, a stale svn and an expired endorsement are
denied by name; endorsements arrive in the add-on, in additional_evidence, or through the admin API."""
from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guest import BrokerDenied, KbsSession, TeeKey, attest, fetch_resource
from guest.evidence import TsmSource
from host_install.install import install
from host_install.vm import VmDir
from sim.demo import LoopbackBroker, _cli, derive
from sim.host import SimSnpHost
from sim.platform import SimPlatform
from tests.endorse_helpers import new_key, pem_public, signed
from verifier.endorse.corim import Revocations, sign_revocations
from verifier.firmware.addon import build_addon

FW = "edk2-2022.11-OVMF.fd"
SECRET = b"acme disk key"
pytestmark = pytest.mark.slow   # five simulated VMs installed with real firmware: ~10 s of setup

BUILDS = ("listed", "fix", "bad", "late", "inline", "replica")   # "bad": one image, denied under several endorsements


class World:
    def __init__(self, root: Path, image: bytes) -> None:
        self.platform = SimPlatform("Milan", "VCEK")
        self.key, self.rogue = new_key(), new_key()
        self.images = {"listed": image, **{b: derive(image, f"build-{b}".encode().ljust(16, b"!")) for b in BUILDS[1:]}}
        self.digests = {k: hashlib.sha384(v).hexdigest() for k, v in self.images.items()}
        now = int(time.time())
        self.ends = {
            "fix": signed(self.key, self.digests["fix"], fwid="edk2-2026.09-acme.3", svn=3, eid="acme-fix-3"),
            "untrusted": signed(self.rogue, self.digests["bad"], fwid="edk2-2026.09-acme.3", svn=3, eid="rogue-1"),
            "revoked": signed(self.key, self.digests["bad"], fwid="edk2-2026.07-acme.2", svn=2, eid="acme-bad-2"),
            "stale": signed(self.key, self.digests["bad"], fwid="edk2-2025.01-acme.1", svn=1, eid="acme-old-1"),
            "expired": signed(self.key, self.digests["bad"], fwid="edk2-2025.02-acme.2", svn=2,
                              eid="acme-expired", valid=(now - 7200, now - 3600)),
            "late": signed(self.key, self.digests["late"], fwid="edk2-2026.10-acme.4", svn=4, eid="acme-late-4"),
            "inline": signed(self.key, self.digests["inline"], fwid="edk2-2026.11-acme.5", svn=5, eid="acme-in-5"),
            "replica": signed(self.key, self.digests["replica"], fwid="edk2-2026.12-acme.6", svn=6, eid="acme-r-6"),
        }
        # The guest's add-on carries its endorsement in a .corim section (except "late", uploaded by the
        # admin API, and "inline", sent beside the add-on in additional_evidence).
        self.addons = {k: build_addon([(f"fw-{k}", v)]) for k, v in self.images.items()}
        self.addons["fix"] = build_addon([("fw-fix", self.images["fix"])], extra_sections=[(".corim", self.ends["fix"])])
        for case in ("untrusted", "revoked", "stale", "expired"):
            self.addons[case] = build_addon([("fw-bad", self.images["bad"])],
                                            extra_sections=[(".corim", self.ends[case])])
        pol = root / "policies"
        (pol / "fw").mkdir(parents=True)
        (pol / "fw" / "listed.efi").write_bytes(self.addons["listed"])
        (pol / "publishers").mkdir()
        (pol / "publishers" / "acme.pem").write_bytes(pem_public(self.key))
        (pol / "publishers" / "acme.revoked").write_bytes(sign_revocations(
            Revocations("acme", now, frozenset({"acme-bad-2"}), frozenset()), self.key))
        listed = f'''version = 1
[firmware]
[[firmware.allowed]]
id = "fw-listed"
sha384 = "{self.digests['listed']}"
svn = 1
bytes = "fw/listed.efi"
'''
        publisher = '''
[[firmware.publishers]]
name = "acme-firmware"
key = "publishers/acme.pem"
fwid = "edk2-*-acme.*"
min_svn = 2
revocations = "publishers/acme.revoked"
'''
        shape_platform = '''
[[shapes]]
vmm = "qemu"
vcpus = [1]
vcpu_types = ["EPYC-v4"]

[platform]
products = ["Milan"]
signers = ["VCEK"]
vmpls = [0]
allow_simulated_platform = true
'''
        (pol / "acme.toml").write_text(listed + publisher + shape_platform + '''
[[secrets]]
path = "acme/key/disk"
unsafe_unbound = true   # this test is about admission; release binding has its own tests
''')
        # A second tenant with the same build and shape that trusts no publisher.
        (pol / "beta.toml").write_text(listed + shape_platform
                                       + '[[secrets]]\npath = "beta/key/disk"\nunsafe_unbound = true\n')
        (root / "ark.pem").write_bytes(self.platform.root_pem())
        mkey = root / "master.key"
        mkey.write_text(os.urandom(32).hex())
        db = f"sqlite:///{root / 'broker.db'}"
        code, out = _cli(["tenant", "add", "acme", "--db", db, "--master-key-file", str(mkey)])
        assert code == 0, out
        self.token = next(w for w in out.split() if w.startswith("fgt_"))
        code, out = _cli(["tenant", "add", "beta", "--db", db, "--master-key-file", str(mkey)])
        assert code == 0, out
        self.beta_token = next(w for w in out.split() if w.startswith("fgt_"))
        for path, value in (("acme/key/disk", SECRET.decode()), ("beta/key/disk", "beta disk key")):
            code, out = _cli(["secret", "put", path, "--value", value, "--db", db, "--master-key-file", str(mkey)])
            assert code == 0, out
        self.config = {"POLICIES_DIR": str(pol), "DATABASE_URL": db, "TRUST_ROOT_PEM": str(root / "ark.pem"),
                       "MASTER_KEY_FILE": str(mkey)}
        self.broker = LoopbackBroker(self.config)
        self.hosts: dict[str, SimSnpHost] = {}
        for k in self.images:
            vm = VmDir.create(root / f"vm-{k}", snp=True, launch_mode="plain", memory_mib=128)
            install(vm, self.addons[k], launch=False)   # host-install ignores the .corim section
            self.hosts[k] = SimSnpHost(vm, self.platform)

    def fetch(self, which: str, *, addon: bool = True, endorsement: bytes | None = None, url: str | None = None,
              resource: str = "acme/key/disk") -> bytes:
        key = TeeKey.generate()
        s = KbsSession(url or self.broker.url)
        host = self.hosts[which if which in self.hosts else "bad"]
        attest(s, TsmSource(host.tsm()), key, addon=self.addons[which] if addon else None, endorsement=endorsement)
        return fetch_resource(s, resource, key)

    def admin(self, path: str, body: bytes, token: str | None = None) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(f"{self.broker.url}/admin/v0{path}", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {token or self.token}",
                                              "Content-Type": "application/octet-stream"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, firmware_dir: Path) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("endorse"), (firmware_dir / FW).read_bytes())
    with w.broker:
        yield w


def _denied(w: World, which: str, **kw: Any) -> str:
    with pytest.raises(BrokerDenied) as ei:
        w.fetch(which, **kw)
    assert ei.value.status == 401
    return ei.value.detail


def test_listed_build_still_released(world: World) -> None:
    assert world.fetch("listed") == SECRET


def test_fixed_build_endorsed_by_trusted_publisher_is_released_without_policy_change(world: World) -> None:
    assert world.fetch("fix") == SECRET
    # The broker now knows the build: an unmodified guest (no add-on) with it gets through too.
    assert world.fetch("fix", addon=False) == SECRET


NOT_ADMITTED = "no endorsement it came with admits it (the reasons are in the operator's audit log)"


def _refused(w: World, which: str, **kw: Any) -> str:
    """The guest reads words that depend only on what it sent (RT-3); the operator's audit row of
    that refusal names the reason. Returns the operator's reason."""
    detail = _denied(w, which, **kw)
    assert detail.endswith(NOT_ADMITTED) and "publisher" not in detail.replace(NOT_ADMITTED, ""), detail
    return _operator_reason(w)


def _operator_reason(w: World) -> str:
    from sqlalchemy import select

    from broker.db import AuditRecord, make_engine
    engine = make_engine(w.config["DATABASE_URL"])
    try:
        with engine.connect() as conn:
            q = (select(AuditRecord.reason).where(AuditRecord.tenant.is_(None), AuditRecord.event == "attest",
                                                  AuditRecord.outcome == "denied")
                 .order_by(AuditRecord.id.desc()).limit(1))
            return str(conn.execute(q).scalar() or "")
    finally:
        engine.dispose()


def test_same_build_endorsed_by_untrusted_key_denied_by_name(world: World) -> None:
    reason = _refused(world, "untrusted")
    assert "no trusted publisher" in reason and "sha256:" in reason


def test_revoked_build_denied_by_name(world: World) -> None:
    reason = _refused(world, "revoked")
    assert "acme-bad-2" in reason and "revoked by the publisher's revocation list" in reason


def test_stale_svn_and_expired_endorsement_denied_by_name(world: World) -> None:
    assert "below the publisher's minimum 2" in _refused(world, "stale")
    reason = _refused(world, "expired")
    assert "acme-expired" in reason and "expired at" in reason


def test_rt3_refusals_name_no_tenants_publisher_rules(world: World) -> None:
    """A guest (any genuine SNP VM) naming beta sends a build acme's publisher endorsed below acme's
    minimum svn: neither its answer nor beta's audit shows acme's publisher name or minimum, and the
    answer is the one a key nobody trusts gets (no oracle for who trusts which publisher)."""
    from sqlalchemy import select

    from broker.db import AuditRecord, make_engine
    answers = []
    for case in ("stale", "untrusted"):
        with pytest.raises(BrokerDenied) as ei:
            attest(KbsSession(world.broker.url), TsmSource(world.hosts["bad"].tsm()), TeeKey.generate(),
                   addon=world.addons[case], tenant="beta")
        answers.append(ei.value.detail)
        if case == "stale":
            assert "publisher acme-firmware" in _operator_reason(world)      # the operator still learns why
    assert answers[0] == answers[1] and answers[0].endswith(NOT_ADMITTED), answers
    engine = make_engine(world.config["DATABASE_URL"])
    try:
        with engine.connect() as conn:
            beta = [str(r) for r in conn.execute(select(AuditRecord.reason).where(AuditRecord.tenant == "beta"))]
    finally:
        engine.dispose()
    assert len(beta) >= 2 and not any("acme-firmware" in r or "minimum" in r for r in beta), beta


def test_a_build_admitted_for_one_tenant_is_not_admitted_for_another(world: World) -> None:
    """acme's publisher endorsed "fix"; beta lists the stock build only and trusts no publisher. The
    same VM gets acme's secret and not beta's, and beta's owner reads why in its own audit."""
    assert world.fetch("fix") == SECRET
    assert world.fetch("listed", resource="beta/key/disk") == b"beta disk key"
    with pytest.raises(BrokerDenied) as ei:
        world.fetch("fix", resource="beta/key/disk")
    assert ei.value.variant == "PolicyDeny" and ei.value.detail.startswith("not allowed for this resource")
    status, body = _get(world, "/audit?limit=1000", world.beta_token)
    denials = [r["reason"] for r in body["records"] if r["event"] == "deny" and r["resource"] == "beta/key/disk"]
    assert status == 200 and denials and "firmware.measurement" in denials[-1], denials


def _get(w: World, path: str, token: str) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"{w.broker.url}/admin/v0{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status, json.loads(resp.read())


def test_endorsement_uploaded_through_the_admin_api(world: World) -> None:
    assert "came with no endorsement" in _denied(world, "late")
    status, body = world.admin("/endorsements", world.ends["late"])
    assert (status, body) == (201, {"endorsement": "acme-late-4"})
    assert world.fetch("late") == SECRET


def test_admin_api_refuses_untrusted_and_non_endorsements(world: World) -> None:
    status, body = world.admin("/endorsements", world.ends["untrusted"])
    assert status == 422 and "publisher your policy trusts" in body["detail"]
    status, _ = world.admin("/endorsements", b"MZ not an endorsement")
    assert status == 400
    status, body = world.admin("/endorsements", b"\xd2\x84\x40")
    assert status == 422 and body["detail"]


def test_admin_api_answers_alike_for_another_tenants_publisher_and_nobodys(world: World) -> None:
    """beta trusts no publisher: acme's publisher (trusted by acme) and a rogue key (trusted by nobody)
    get the same 422, so an upload cannot probe another tenant's policy (issue 14, item 5)."""
    s1, b1 = world.admin("/endorsements", world.ends["replica"], token=world.beta_token)
    s2, b2 = world.admin("/endorsements", world.ends["untrusted"], token=world.beta_token)
    assert s1 == s2 == 422
    assert b1 == b2 and "publisher your policy trusts" in b1["detail"]


def test_endorsement_beside_the_addon_in_additional_evidence(world: World) -> None:
    assert world.fetch("inline", endorsement=world.ends["inline"]) == SECRET


def test_endorsement_that_is_no_cose_in_additional_evidence_is_refused(world: World) -> None:
    assert "no COSE_Sign1" in _denied(world, "listed", endorsement=b"not cbor")


def test_an_endorsement_uploaded_to_one_replica_admits_firmware_at_another(world: World) -> None:
    """Endorsements are kept in the shared database like firmware: a second broker on the same database
    reads them (smallest blobs first) before the firmware they admit arrives there."""
    status, _ = world.admin("/endorsements", world.ends["replica"])
    assert status == 201
    with LoopbackBroker(world.config) as replica:
        assert world.fetch("replica", url=replica.url) == SECRET
