"""Broker at scale (issue 21): an attestation is appraised only for the tenants whose reference
tables hold its MEASUREMENT; tables share firmware facts and measurements; the first policy load
runs in the background while loaded tenants serve.

Real OVMF builds from ../shared, real policy store, real HTTP on loopback, SQLite and PostgreSQL.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from test_broker_support import (  # noqa: F401
    DbSpec,
    Guest,
    LiveServer,
    admin,
    db,
    http,
    random_master_key,
)

from broker import create_app
from sim.owner import Owner, bound_policy
from tests.conftest import FIRMWARE_DIR
from verifier.appraise import index as index_mod
from verifier.appraise import reference
from verifier.appraise.store import PolicyStore

OP = "index-operator"
BUILDS = {"a": "edk2-2025.02-OVMF.fd", "b": "edk2-2022.11-OVMF.fd"}
SHAPE = '[[shapes]]\nvmm = "qemu"\nvcpus = [{n}]\nvcpu_types = ["EPYC-v4"]'
N_TENANTS = 40


def _owner(tenant: str) -> Owner:
    return Owner("index-" + tenant)


def _write(pol: Path, tenant: str, build: str, vcpus: int, digests: dict[str, str]) -> None:
    """Tenant `tenant` allows firmware `build` ("a"/"b") in a 1- or 2-vCPU shape; its secret is bound."""
    loc = "uploaded" if build == "up" else f"{build}.fd"
    digest = digests["b" if build == "up" else build]
    text_ = bound_policy(_owner(tenant), tenant, [(f"fw-{build}", digest, 1, loc)],
                         secrets=[f"{tenant}/key/disk"], shapes=SHAPE.format(n=vcpus))
    path = pol / f"{tenant}.toml"
    path.write_text(text_)
    st = path.stat()  # the store notices changes by stat: make each write visible
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))


def _group(i: int) -> tuple[str, int]:
    """Tenant i's firmware and vCPU count: 4 groups of 10 with overlap in firmware and in shape."""
    return ("a", 1) if i < 10 else ("a", 2) if i < 20 else ("b", 1) if i < 30 else ("b", 2)


class World:
    def __init__(self, root: Path) -> None:
        from sim.platform import SimPlatform
        self.root = root
        self.sim = SimPlatform("Milan")
        self.root_pem = root / "sim-root.pem"
        self.root_pem.write_bytes(self.sim.root_pem())
        self.cache = root / "mcache"
        self.digests: dict[str, str] = {}
        for k, name in BUILDS.items():
            self.digests[k] = hashlib.sha384((FIRMWARE_DIR / name).read_bytes()).hexdigest()

    def policies(self, name: str, n: int = N_TENANTS) -> Path:
        pol = self.root / name
        pol.mkdir()
        for k, fname in BUILDS.items():
            shutil.copyfile(FIRMWARE_DIR / fname, pol / f"{k}.fd")  # must live in the policy tree
        for i in range(n):
            build, vcpus = _group(i)
            _write(pol, f"t{i:02d}", build, vcpus, self.digests)
        return pol


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    for name in BUILDS.values():
        if not (FIRMWARE_DIR / name).is_file():
            pytest.fail(f"missing real firmware {FIRMWARE_DIR / name}")
    return World(tmp_path_factory.mktemp("index"))


def _measurement(store: PolicyStore, tenant: str) -> bytes:
    return store.get(tenant).table.entries()[0][0]


def test_index_names_only_tenants_whose_table_holds_the_measurement(world: World,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = reference.measurement_table  # type: ignore[attr-defined]

    def counting(payload: bytes, shapes: Any, **kw: Any) -> Any:
        calls.append(len(list(shapes)))
        return real(payload, shapes, **kw)
    monkeypatch.setattr(reference, "measurement_table", counting)
    store = PolicyStore(world.policies("p1"), cache_dir=world.cache)
    assert len(store.tenants()) == N_TENANTS
    # 40 tenants, 2 builds x 2 shapes: each (build, shape) measured once, then shared.
    assert len(calls) == 4, calls
    groups: dict[tuple[str, int], list[str]] = {}
    for i in range(N_TENANTS):
        groups.setdefault(_group(i), []).append(f"t{i:02d}")
    for members in groups.values():
        m = _measurement(store, members[0])
        assert store.candidates(m) == members
        # Every member's own table holds it, and no other tenant's does.
        assert all(store.get(t).table.lookup(m) is not None for t in members)
        assert not any(store.get(t).table.lookup(m) is not None for t in store.tenants() if t not in members)
    assert store.candidates(hashlib.sha384(b"no such firmware").digest()) == []


def test_index_follows_edits_deletions_and_uploads(world: World) -> None:
    pol = world.policies("p2", n=12)
    store = PolicyStore(pol, cache_dir=world.cache, min_interval=0.0)
    m_a1, m_a2 = _measurement(store, "t00"), _measurement(store, "t10")
    assert "t00" in store.candidates(m_a1)
    _write(pol, "t00", "a", 2, world.digests)      # t00 moves to the 2-vCPU shape
    assert "t00" not in store.candidates(m_a1) and "t00" in store.candidates(m_a2)
    (pol / "t01.toml").unlink()
    assert "t01" not in store.candidates(m_a1)
    # A tenant whose firmware bytes are "uploaded" enters the index when the bytes arrive.
    _write(pol, "up", "up", 1, world.digests)
    store.refresh(force=True)
    b_bytes = (FIRMWARE_DIR / BUILDS["b"]).read_bytes()
    table = PolicyStore(world.policies("p2b", n=30), cache_dir=world.cache).get("t20").table
    m_b1 = table.entries()[0][0]
    assert "up" not in store.candidates(m_b1)
    assert store.add_firmware(b_bytes) == ["up"]
    assert "up" in store.candidates(m_b1)


def test_open_admission_hook_makes_a_tenant_a_candidate_for_every_measurement(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    # The hook issue 20's trusted publishers use: such a tenant is appraised for every report.
    monkeypatch.setattr(index_mod, "_open_admission", [])
    index_mod.register_open_admission(lambda p: p.tenant == "t03")
    store = PolicyStore(world.policies("p3", n=12), cache_dir=world.cache)
    unknown = hashlib.sha384(b"endorsed build, bytes not here yet").digest()
    assert store.candidates(unknown) == ["t03"]
    assert store.candidates(_measurement(store, "t10")) == ["t03", "t10", "t11"]


def test_background_first_load(world: World) -> None:
    store = PolicyStore(world.policies("p4", n=12), cache_dir=world.cache, background=True)
    assert store.wait_loaded(120)
    assert not store.loading() and len(store.tenants()) == 12
    assert store.candidates(_measurement(store, "t00")) == [f"t{i:02d}" for i in range(10)]


def test_file_facts_follow_a_changed_file(tmp_path: Path) -> None:
    from verifier.appraise.shared import firmware_file_facts
    src = FIRMWARE_DIR / BUILDS["a"]
    f = tmp_path / "fw.fd"
    f.write_bytes(src.read_bytes())
    facts, payload = firmware_file_facts(f)
    assert payload is not None and facts.sha384 == hashlib.sha384(payload).hexdigest() and facts.snp_error is None
    again, payload2 = firmware_file_facts(f)
    assert again == facts and payload2 is None          # known: not read again
    f.write_bytes((FIRMWARE_DIR / BUILDS["b"]).read_bytes())  # same size or not: the ctime moved
    changed, payload3 = firmware_file_facts(f)
    assert payload3 is not None and changed.sha384 != facts.sha384


# -- over HTTP ------------------------------------------------------------------------------
def _rows(url: str, sql: str, **params: Any) -> list[Any]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql), params))
    finally:
        engine.dispose()


def _sid(g: Guest) -> str:
    return str(next(c.value for c in g.jar if c.name == "kbs-session-id"))


def _evidence(world: World, tenant: str, measurement: bytes) -> Any:
    launch = _owner(tenant).launch_fields(world.sim, measurement)

    def make(rd: bytes) -> Any:
        return world.sim.trustee_json(world.sim.sign_report(report_data=rd, **launch), include=("ARK", "ASK", "LEAF"))
    return make


@pytest.fixture
def served(db: DbSpec, world: World, tmp_path: Path  # noqa: F811 - the db fixture
           ) -> Iterator[tuple[LiveServer, PolicyStore, DbSpec]]:
    pol = world.policies(f"srv-{tmp_path.name}")
    cfg = {"DATABASE_URL": db.url, "MASTER_KEY": random_master_key(), "OPERATOR_TOKEN": OP,
           "POLICIES_DIR": str(pol), "TRUST_ROOT_PEM": str(world.root_pem), "MEASURE_CACHE": str(world.cache)}
    srv = LiveServer(create_app(cfg))
    st = srv.app.extensions["firmgate"]
    assert st.appraiser is not None, st.appraiser_error
    assert st.appraiser.wait_loaded(120)
    for t in ("t12", "t13"):
        token = admin(srv.url, "POST", "/tenants", OP, {"name": t}).body["token"]
        assert admin(srv.url, "PUT", f"/secrets/{t}/key/disk", token, raw=f"{t}-secret".encode()).status == 201
    try:
        yield srv, st.appraiser._store, db
    finally:
        srv.stop()


def test_unhinted_guest_is_appraised_only_for_matching_tenants(served: Any, world: World,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    srv, store, dbs = served
    appraiser = srv.app.extensions["firmgate"].appraiser
    appraised: list[str] = []
    real = appraiser.appraise

    def spy(attested: Any, tenant: str, *a: Any, **kw: Any) -> Any:
        appraised.append(tenant)
        return real(attested, tenant, *a, **kw)
    monkeypatch.setattr(appraiser, "appraise", spy)
    m = _measurement(store, "t12")                # group ("a", 2): t10..t19
    group = [f"t{i}" for i in range(10, 20)]
    g = Guest(srv.url, _evidence(world, "t12", m))  # no tenant hint, as an unmodified guest
    assert g.auth().status == 200
    a = g.attest()
    assert a.status == 200, a.body
    assert sorted(appraised) == group              # 10 of 40 tenants appraised
    sid = _sid(g)
    rows = _rows(dbs.url, "SELECT tenant, accepted FROM fg_session_verdicts WHERE session_id = :s", s=sid)
    assert sorted(r[0] for r in rows) == group
    # Only the owner's launch is accepted: the look-alikes sharing the build are refused by name.
    assert [r[0] for r in rows if r[1]] == ["t12"]
    audit_tenants = _rows(dbs.url, "SELECT tenant FROM fg_audit WHERE session_id = :s AND event = 'attest'", s=sid)
    assert sorted(str(r[0]) for r in audit_tenants) == ["None", "t12"]
    assert g.fetch("t12/key/disk") == b"t12-secret"
    # Another matching tenant's secret: its cached verdict (refused) decides, no new appraisal.
    appraised.clear()
    r = g.resource("t13/key/disk")
    assert r.status == 401 and appraised == []
    # A tenant outside the index is appraised lazily, once, at /resource; still refused.
    r = g.resource("t00/key/disk")
    assert r.status == 401 and appraised == ["t00"]


def test_unmatched_measurement_writes_no_verdict_rows(served: Any, world: World) -> None:
    srv, _, dbs = served
    g = Guest(srv.url, _evidence(world, "t12", hashlib.sha384(b"unknown firmware").digest()))
    g.auth()
    a = g.attest()
    assert a.status == 200, a.body                 # a token with status contraindicated, as before
    assert _rows(dbs.url, "SELECT tenant FROM fg_session_verdicts WHERE session_id = :s", s=_sid(g)) == []
    assert g.resource("t12/key/disk").status == 401


def test_loaded_tenants_serve_while_the_rest_load(db: DbSpec, world: World, tmp_path: Path,  # noqa: F811
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pol = world.policies(f"slow-{tmp_path.name}", n=20)
    release = threading.Event()
    real_build = PolicyStore._build

    def build(self: PolicyStore, path: Path, uploaded: dict[str, bytes]) -> Any:
        if path.stem >= "t15":  # t15..t19 are slow to load
            release.wait(60)
        return real_build(self, path, uploaded)
    monkeypatch.setattr(PolicyStore, "_build", build)
    cfg = {"DATABASE_URL": db.url, "MASTER_KEY": random_master_key(), "OPERATOR_TOKEN": OP,
           "POLICIES_DIR": str(pol), "TRUST_ROOT_PEM": str(world.root_pem), "MEASURE_CACHE": str(world.cache),
           "POLICY_LOAD_WAIT": 0.3}
    srv = LiveServer(create_app(cfg))
    try:
        appraiser = srv.app.extensions["firmgate"].appraiser
        deadline = time.monotonic() + 120
        while appraiser.policy_id("t12") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        for t in ("t12", "t17"):
            token = admin(srv.url, "POST", "/tenants", OP, {"name": t}).body["token"]
            assert admin(srv.url, "PUT", f"/secrets/{t}/key/disk", token, raw=f"{t}-secret".encode()).status == 201
        h = http("GET", srv.url + "/healthz")
        assert h.status == 200 and h.body["policies"] == "loading", h.body
        m = appraiser._store.get("t12").table.entries()[0][0]
        g = Guest(srv.url, _evidence(world, "t12", m))
        g.auth()
        assert g.attest().status == 200
        assert g.fetch("t12/key/disk") == b"t12-secret"    # served while t15..t19 load
        # t17's guest (same build and shape as t12): its policy is not loaded; it waits, then 503.
        g17 = Guest(srv.url, _evidence(world, "t17", m))
        g17.auth()
        r = g17.attest()
        assert r.status == 503 and "still loading" in r.detail, (r.status, r.body)
        assert r.headers["Retry-After"] == "5"
        # With a longer wait, the same guest is answered as soon as t17's policy loads.
        srv.app.config["POLICY_LOAD_WAIT"] = 60
        threading.Timer(0.5, release.set).start()
        g17 = Guest(srv.url, _evidence(world, "t17", m))
        g17.auth()
        assert g17.attest().status == 200
        assert g17.fetch("t17/key/disk") == b"t17-secret"
        assert appraiser.wait_loaded(120)
        h = http("GET", srv.url + "/healthz")
        assert "policies" not in h.body
    finally:
        release.set()
        srv.stop()


def test_a_commit_of_one_policy_re_reads_that_policy_only(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 21: a commit that changes one <tenant>.toml parses that file again, not every tenant's;
    the others are only relabelled with the new commit (RT-5 re-reads all only when a file a policy may
    reference, such as a revocation list, changes)."""
    from test_policy_store import git

    pol = world.policies("commit-one", n=6)
    git(pol, "init", "-q", "-b", "main")
    git(pol, "add", "-A")
    git(pol, "commit", "-q", "-m", "six tenants")
    store = PolicyStore(pol, cache_dir=world.cache, min_interval=0)
    first = {t: store.get(t) for t in ("t00", "t01", "t02")}
    built: list[str] = []
    real_build = PolicyStore._build

    def counting(self: PolicyStore, path: Path, uploaded: dict[str, bytes]) -> Any:
        built.append(path.stem)
        return real_build(self, path, uploaded)

    monkeypatch.setattr(PolicyStore, "_build", counting)
    _write(pol, "t01", "a", 2, world.digests)   # t01 moves to the 2-vCPU shape
    git(pol, "commit", "-q", "-am", "t01: two vCPUs")
    assert store.refresh(force=True)
    assert built == ["t01"]
    t00, t01 = store.get("t00"), store.get("t01")
    assert t00.table is first["t00"].table                      # not re-read...
    assert t00.policy_id != first["t00"].policy_id              # ...but it names the new commit
    assert t01.table.entries()[0][0] != first["t01"].table.entries()[0][0]
