"""/metrics through prometheus_client: one process (plain registry) and real gunicorn with 2 workers.

The gunicorn test starts the broker as operators do (`gunicorn -c python:broker.gunicorn_conf`),
sends /auth requests until both workers have answered some, reads each worker's own count from
its value file, and checks that ONE scrape of /metrics shows their sum; then kills a worker and
checks that its counts stay in the sum after gunicorn replaces it.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_broker_protocol import OP, FakeAppraiser, fake_evidence
from test_broker_support import Guest, LiveServer, http, random_master_key

from broker import create_app
from tests.conftest import SNP_VECTORS
from verifier import observe

REPO = Path(__file__).resolve().parent.parent
AUTH = {"version": "0.4.0", "tee": "snp", "extra-params": {}}
SCRAPE = {"Authorization": f"Bearer {OP}"}
METRICS_TOKEN = "scrape-only-token"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


# -- one process: `firmgate serve` / the test server -----------------------------------------------
@pytest.fixture
def served(tmp_path: Path) -> Iterator[LiveServer]:
    fake = FakeAppraiser()
    fake.policies["acme"] = {"rev": 1, "measurements": {"a" * 96: "edk2-acme.3"},
                             "resources": {"acme/key/disk": ["edk2-acme.3"]}}
    fake.policies["globex"] = {"rev": 1, "measurements": {"b" * 96: "edk2-globex.1"},
                               "resources": {"globex/key/disk": ["edk2-globex.1"]}}
    srv = LiveServer(create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'b.db'}", "MASTER_KEY": random_master_key(),
                                 "OPERATOR_TOKEN": OP, "APPRAISER": fake}))
    token = http("POST", srv.url + "/admin/v0/tenants", {"name": "acme"},
                 headers={"Authorization": f"Bearer {OP}"}).body["token"]
    http("PUT", srv.url + "/admin/v0/secrets/acme/key/disk", raw=b"k", headers={"Authorization": f"Bearer {token}"})
    try:
        yield srv
    finally:
        srv.stop()


def test_plain_registry_counts_releases_denials_and_checks_by_tenant(served: LiveServer) -> None:
    before = http("GET", served.url + "/metrics", headers=SCRAPE).body.decode()
    good = Guest(served.url, fake_evidence("a" * 96), tenant_hint="acme")
    good.auth()
    assert good.attest().status == 200
    good.fetch("acme/key/disk")
    bad = Guest(served.url, fake_evidence("c" * 96), tenant_hint="acme")
    bad.auth()
    assert bad.attest().status == 200          # a token, status contraindicated
    assert bad.resource("acme/key/disk").status == 401
    # An unmodified guest names no tenant: every policy is tried, but globex's failures are not globex's
    # business (its audit does not get them), so they are not counted under globex either.
    plain = Guest(served.url, fake_evidence("a" * 96))
    plain.auth()
    assert plain.attest().status == 200
    # A made-up tenant name from a guest does not become a label value.
    stranger = Guest(served.url, fake_evidence("a" * 96), tenant_hint="made-up-" + "x" * 20)
    stranger.auth()
    assert stranger.resource("made-up-xxxxxxxxxxxxxxxxxxxx/key/disk").status == 401
    # A method nobody uses is counted as "other", not as a new label value.
    req = urllib.request.Request(served.url + "/healthz", method="MADEUPMETHOD")
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(req, timeout=10)
    assert http("GET", served.url + "/metrics").status == 401         # tenants' names and counts: not public
    r = http("GET", served.url + "/metrics", headers=SCRAPE)
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    after = r.body.decode()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("firmgate_releases_total", tenant="acme") == 1
    assert delta("firmgate_events_total", event="release", outcome="ok") == 1
    assert delta("firmgate_denials_total", tenant="acme", event="deny", reason_class="PolicyDeny") == 1
    assert delta("firmgate_denials_total", tenant="", event="deny", reason_class="TokenNotFound") == 1
    # acme's look-alike VM: once at /attest (it named acme), once at the /resource denial.
    assert delta("firmgate_appraisal_failed_checks_total", tenant="acme", check="firmware.measurement") == 2
    assert delta("firmgate_appraisal_failed_checks_total", tenant="globex", check="firmware.measurement") == 0
    assert delta("firmgate_attestation_duration_seconds_count", outcome="affirming") == 2
    assert delta("firmgate_attestation_duration_seconds_count", outcome="contraindicated") == 1
    assert delta("firmgate_http_requests_total", method="POST", route="/kbs/v0/auth", status="200") == 4
    assert "made-up" not in after and "MADEUPMETHOD" not in after
    assert delta("firmgate_http_requests_total", method="other", route="unmatched", status="405") == 1


def test_verifier_events_reach_the_counters(tmp_path: Path) -> None:
    """Policy reloads (loaded, refused with the last good kept) come from the policy store via verifier.observe."""
    from test_broker_e2e import _policy

    from broker import metrics
    from verifier.appraise.store import PolicyStore
    seen: list[tuple[str, float, dict[str, str]]] = []

    def listen(name: str, v: float, labels: dict[str, str]) -> None:
        seen.append((name, v, labels))

    observe.subscribe(listen)
    try:
        before = metrics.render().decode()
        pol = tmp_path / "pol"
        pol.mkdir()
        f = pol / "initech.toml"
        f.write_text(_policy("initech", "edk2-x", "ab" * 48, "uploaded"))
        store = PolicyStore(pol, min_interval=0)
        assert store.get("initech").policy.tenant == "initech"
        f.write_text("version = 1\n[firmware\n")           # broken: the last good one stays in force
        os.utime(f, ns=(time.time_ns(), time.time_ns() + 2_000_000_000))
        assert store.get("initech").policy.tenant == "initech"
        after = metrics.render().decode()
    finally:
        observe.unsubscribe(listen)
    assert ("policy_reload", 1.0, {"tenant": "initech", "result": "loaded", "fallback": "no"}) in seen
    assert ("policy_reload", 1.0, {"tenant": "initech", "result": "refused", "fallback": "yes"}) in seen
    for name, labels, n in (("firmgate_policy_reloads_total", {"tenant": "initech", "result": "loaded"}, 1),
                            ("firmgate_policy_reloads_total", {"tenant": "initech", "result": "refused"}, 1),
                            ("firmgate_policy_last_good_fallbacks_total", {"tenant": "initech"}, 1)):
        assert value(after, name, **labels) - value(before, name, **labels) == n


def test_kds_cache_hits_and_misses_are_counted(tmp_path: Path) -> None:
    from broker import metrics
    from verifier.abi.fields import Product
    from verifier.errors import FetchError
    from verifier.kds.fetch import HttpFetcher
    fetcher = HttpFetcher(tmp_path, offline=True)
    before = metrics.render().decode()
    with pytest.raises(FetchError):
        fetcher.chain(Product.MILAN, "VCEK")            # offline and not cached: an error
    roots = SNP_VECTORS / "roots"
    pems = sorted(roots.glob("milan/*"))
    assert pems, f"no AMD roots under {roots}"
    from verifier.kds import chain_url
    url = fetcher.base_url + chain_url(Product.MILAN, "VCEK").removeprefix("https://kdsintf.amd.com")
    fetcher._path(url).write_bytes(pems[0].read_bytes())
    assert fetcher.chain(Product.MILAN, "VCEK")          # now a cache hit
    after = metrics.render().decode()
    assert value(after, "firmgate_kds_requests_total", kind="chain", source="error") - \
        value(before, "firmgate_kds_requests_total", kind="chain", source="error") == 1
    assert value(after, "firmgate_kds_requests_total", kind="chain", source="cache") - \
        value(before, "firmgate_kds_requests_total", kind="chain", source="cache") == 1


# -- gunicorn, 2 workers ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker_auth_count(value_file: Path, scratch: Path) -> float:
    """One worker's own count of auth events, read from its value file alone."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess
    d = scratch / value_file.stem
    d.mkdir(exist_ok=True)
    shutil.copy(value_file, d / value_file.name)
    reg = CollectorRegistry()
    multiprocess.MultiProcessCollector(reg, path=str(d))
    return value(generate_latest(reg).decode(), "firmgate_events_total", event="auth", outcome="ok")


def _pids(prom: Path) -> set[int]:
    return {int(m.group(1)) for p in prom.iterdir() if (m := re.fullmatch(r"counter_(\d+)\.db", p.name))}


@pytest.mark.slow
def test_gunicorn_two_workers_one_scrape_shows_the_sum(tmp_path: Path) -> None:
    prom = tmp_path / "prom"
    prom.mkdir()
    (prom / "counter_1.db").write_bytes(b"left by an earlier run")   # must be wiped at start
    (prom / "keep.txt").write_text("not a value file")                # must not be
    policies = tmp_path / "policies"
    policies.mkdir()
    port = _free_port()
    key = random_master_key()
    # The schema and keys first, in this process: two workers creating a fresh SQLite schema at the same
    # instant can race (one fails to boot, and gunicorn then stops), which is not what this test is about.
    create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'b.db'}", "MASTER_KEY": key,
                "POLICIES_DIR": str(policies)}).extensions["firmgate"].engine.dispose()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom), "FIRMGATE_DB": f"sqlite:///{tmp_path / 'b.db'}",
           "FIRMGATE_POLICIES": str(policies), "FIRMGATE_MASTER_KEY": key.hex(),
           "FIRMGATE_OPERATOR_TOKEN": OP, "FIRMGATE_METRICS_TOKEN": METRICS_TOKEN, "PYTHONPATH": str(REPO)}
    log = (tmp_path / "gunicorn.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "python:broker.gunicorn_conf", "-w", "2",
                             "-b", f"127.0.0.1:{port}", "--graceful-timeout", "2", "broker:create_app()"],
                            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if http("GET", base + "/openapi.json").status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "gunicorn.log").read_text()
            time.sleep(0.2)
        assert not (prom / "counter_1.db").exists() and (prom / "keep.txt").exists()

        sent = 0
        lock = threading.Lock()

        errors: list[str] = []

        def burst(n: int) -> None:
            nonlocal sent
            for _ in range(n):
                try:
                    r = http("POST", base + "/kbs/v0/auth", AUTH)
                except OSError as exc:
                    errors.append(repr(exc))
                    return
                if r.status != 200:
                    errors.append(f"{r.status} {r.body!r}")
                    return
                with lock:
                    sent += 1

        per_worker: dict[int, float] = {}
        for _ in range(40):  # until both workers answered some (bounded: 40 x 24 requests)
            threads = [threading.Thread(target=burst, args=(6,)) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, (errors, (tmp_path / "gunicorn.log").read_text())
            per_worker = {pid: _worker_auth_count(prom / f"counter_{pid}.db", tmp_path) for pid in _pids(prom)}
            if len([v for v in per_worker.values() if v > 0]) >= 2:
                break
        assert proc.poll() is None, (tmp_path / "gunicorn.log").read_text()
        assert len([v for v in per_worker.values() if v > 0]) == 2, per_worker
        assert sum(per_worker.values()) == sent

        # With a metrics token set, only it opens /metrics (not the operator's token).
        assert http("GET", base + "/metrics", headers=SCRAPE).status == 401
        scrape_auth = {"Authorization": f"Bearer {METRICS_TOKEN}"}
        scrape = http("GET", base + "/metrics", headers=scrape_auth).body.decode()   # ONE scrape, any worker
        assert value(scrape, "firmgate_events_total", event="auth", outcome="ok") == sent
        assert value(scrape, "firmgate_http_requests_total", method="POST", route="/kbs/v0/auth",
                     status="200") == sent
        assert value(scrape, "firmgate_http_request_duration_seconds_count", route="/kbs/v0/auth") == sent

        # A worker dies: gunicorn replaces it, and its counts stay in the sum.
        victim = max(per_worker, key=lambda p: per_worker[p])
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            errors.clear()
            burst(1)
            if not errors:
                break
            assert time.monotonic() < deadline, errors
            time.sleep(0.2)
        scrape = http("GET", base + "/metrics", headers=scrape_auth).body.decode()
        assert value(scrape, "firmgate_events_total", event="auth", outcome="ok") == sent
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_gunicorn_conf_makes_a_private_directory_and_wipes_only_value_files(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = str(REPO)
    for name in ("counter_12.db", "histogram_12.db", "gauge_livesum_12.db", "notes.db", "counter_x.db"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "elsewhere").write_bytes(b"keep")
    (tmp_path / "counter_13.db").symlink_to(tmp_path / "elsewhere")
    # In a child: importing the module sets PROMETHEUS_MULTIPROC_DIR, which this process must not get.
    code = ("import os, sys, broker.gunicorn_conf as c; d = os.environ['PROMETHEUS_MULTIPROC_DIR']; "
            "print(oct(os.stat(d).st_mode & 0o777)); c.on_exit(None); print(os.path.exists(d)); "
            "print(c.wipe(sys.argv[1]))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["0o700", "False", "3"]   # private while it runs, removed at exit; 3 wiped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_13.db", "counter_x.db", "elsewhere", "notes.db"]
