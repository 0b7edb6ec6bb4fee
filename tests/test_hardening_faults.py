"""Fault injection under load: SIGKILL the broker mid-attest/mid-release; stop PostgreSQL under load.

1. The broker runs under gunicorn (2 workers x 4 threads, a SQLite file in WAL
   mode, as a single-host deployment would). Six guest threads run the KBS
   protocol in a loop (auth -> attest -> resource, cookie and Bearer) and an
   admin thread keeps rewriting secrets, while the test SIGKILLs the whole
   broker process group every second or so and starts it again. Afterwards:
   - no secret lost: every secret holds its last acknowledged value (or a later
     write whose answer the kill swallowed), and a fresh guest gets it;
   - no nonce used twice: every nonce was issued once, no session answered two
     /attest with 200, and every attestation body replayed after the restarts
     is refused;
   - no partial records: the database passes its integrity check, every
     attested session has all its fields, every verdict and audit row is
     whole, every stored secret decrypts under the master key.
2. PostgreSQL (a throwaway cluster of our own: initdb + pg_ctl as user postgres
   on a free loopback port) is stopped and started under load. While it is
   down every request is answered 503 with a JSON reason (never a 500); when it
   is back the broker recovers by itself, without a restart.

The figures (faults injected, records lost, nonces reused) are printed with -s
and quoted in docs/security.md.
"""
from __future__ import annotations

import glob
import glob
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import Any, Iterator

import pytest
from sqlalchemy import create_engine, select, text
from test_broker_support import Guest, LiveServer, admin, http

from tests.conftest import FIRMWARE_DIR

REPO = Path(__file__).resolve().parent.parent
FW = "edk2-2025.02-OVMF.fd"
OP = "fault-operator"
TENANT = "acme"
SECRET_PATHS = [f"{TENANT}/key/s{i}" for i in range(4)]
KILLS = int(os.environ.get("FIRMGATE_FAULT_KILLS", "4"))
FIGURES: dict[str, Any] = {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _policy(digest: str) -> str:
    secrets_toml = "".join(f'[[secrets]]\npath = "{p}"\nfirmware = ["fw"]\nunsafe_unbound = true\n'
                           for p in SECRET_PATHS)   # binding is beside the point of these faults
    return f'''version = 1
[firmware]
[[firmware.allowed]]
id = "fw"
sha384 = "{digest}"
svn = 1
bytes = "{FW}"
[[shapes]]
vmm = "qemu"
vcpus = [1]
vcpu_types = ["EPYC-v4"]
[platform]
allow_simulated_platform = true
[guest]
{secrets_toml}'''


class Site:
    """Policies, sim platform, master key and measurement cache shared by both tests."""

    def __init__(self, root: Path) -> None:
        from sim.platform import SimPlatform
        from verifier.appraise.store import PolicyStore
        self.root = root
        self.sim = SimPlatform("Milan")
        self.root_pem = root / "sim-root.pem"
        self.root_pem.write_bytes(self.sim.root_pem())
        self.policies = root / "policies"
        self.policies.mkdir()
        shutil.copyfile(FIRMWARE_DIR / FW, (self.policies / FW))  # must live in the policy tree
        digest = hashlib.sha384((FIRMWARE_DIR / FW).read_bytes()).hexdigest()
        (self.policies / f"{TENANT}.toml").write_text(_policy(digest))
        self.cache = root / "measure-cache"
        table = PolicyStore(self.policies, cache_dir=self.cache).get(TENANT).table  # fills the cache
        self.measurement = table.entries()[0][0]
        self.master_key = secrets.token_bytes(32)
        self.key_file = root / "master.key"
        self.key_file.write_bytes(self.master_key)
        os.chmod(self.key_file, 0o600)

    def evidence(self, rd: bytes) -> Any:
        return self.sim.trustee_json(self.sim.sign_report(report_data=rd, measurement=self.measurement),
                                     include=("ARK", "ASK", "LEAF"))

    def env(self, db_url: str) -> dict[str, str]:
        return dict(os.environ, PYTHONPATH=str(REPO), FIRMGATE_DB=db_url, FIRMGATE_POLICIES=str(self.policies),
                    FIRMGATE_TRUST_ROOT=str(self.root_pem), FIRMGATE_MASTER_KEY_FILE=str(self.key_file),
                    FIRMGATE_OPERATOR_TOKEN=OP, FIRMGATE_MEASURE_CACHE=str(self.cache))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    if not (FIRMWARE_DIR / FW).is_file():
        pytest.fail(f"missing real firmware {FIRMWARE_DIR / FW}")
    return Site(tmp_path_factory.mktemp("faults"))


# -- a broker we can kill ---------------------------------------------------------------------
class Gunicorn:
    def __init__(self, site: Site, db_url: str, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = site.env(db_url)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [str(Path(sys.executable).parent / "gunicorn"), "-w", "2", "--threads", "4", "-b",
               f"127.0.0.1:{self.port}", "--timeout", "60", "broker:create_app()"]
        with open(self.log, "ab") as log:
            # Its own process group, so one SIGKILL takes the master and its workers at once.
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gunicorn exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if http("GET", self.url + "/healthz").status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"broker did not come up:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)  # the group we created for this child
        self.proc.wait(timeout=10)
        for _ in range(100):  # workers are reaped by init; wait until the port is free
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.1):
                    time.sleep(0.05)
            except OSError:
                return

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


class Load:
    """Guests and an admin writer hammering the broker; everything they saw is recorded."""

    def __init__(self, site: Site, url: str, token: str, guests: int = 6) -> None:
        self.site, self.url, self.token = site, url, token
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.nonces: list[str] = []
        self.attest_ok: dict[str, int] = {}            # session id -> 200 answers to /attest
        # Attestations sent: [guest, body, status or None when the kill swallowed the answer]
        self.bodies: list[list[Any]] = []
        self.releases = 0
        self.bad_values: list[str] = []
        self.errors = 0                                # connection refused/reset: the broker was dead
        self.cut: dict[str, int] = {"auth": 0, "attest": 0, "resource": 0, "write": 0}  # killed mid-request
        self.statuses: dict[int, int] = {}
        self.writes: dict[str, list[tuple[bytes, bool]]] = {p: [] for p in SECRET_PATHS}  # (value, acked)
        self.values_written: dict[str, set[bytes]] = {p: set() for p in SECRET_PATHS}
        self.threads = [threading.Thread(target=self._guest, daemon=True) for _ in range(guests)]
        self.threads.append(threading.Thread(target=self._writer, daemon=True))

    def _count(self, status: int) -> None:
        with self.lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1

    def _guest(self) -> None:
        while not self.stop.is_set():
            g = Guest(self.url, self.site.evidence)
            stage = "auth"
            try:
                r = g.auth()
                self._count(r.status)
                if r.status != 200:
                    continue
                sid = next(c.value for c in g.jar if c.name == "kbs-session-id")
                with self.lock:
                    self.nonces.append(r.body["nonce"])
                body = g.attestation()
                sent = [g, body, None]
                with self.lock:
                    self.bodies.append(sent)
                stage = "attest"
                r = g.attest(body)
                sent[2] = r.status
                self._count(r.status)
                if r.status != 200:
                    continue
                with self.lock:
                    self.attest_ok[sid] = self.attest_ok.get(sid, 0) + 1
                stage = "resource"
                for bearer in (False, True):
                    path = random.choice(SECRET_PATHS)
                    r = g.resource(path, bearer=bearer)
                    self._count(r.status)
                    if r.status == 200:
                        from test_broker_support import guest_decrypt
                        value = guest_decrypt(r.body, g.key)
                        with self.lock:
                            self.releases += 1
                            if value not in self.values_written[path]:
                                self.bad_values.append(path)
            except (OSError, urllib.error.URLError, HTTPException, ValueError) as exc:
                with self.lock:
                    self.errors += 1
                    # A refused connection never reached the broker; anything else was cut mid-request.
                    if not isinstance(getattr(exc, "reason", exc), ConnectionRefusedError):
                        self.cut[stage] += 1
                time.sleep(0.02)

    def _writer(self) -> None:
        while not self.stop.is_set():
            path = random.choice(SECRET_PATHS)
            value = secrets.token_bytes(16)
            with self.lock:
                self.values_written[path].add(value)
                self.writes[path].append((value, False))
                i = len(self.writes[path]) - 1
            try:
                r = admin(self.url, "PUT", f"/secrets/{path}", self.token, raw=value)
                self._count(r.status)
                if r.status in (200, 201):
                    with self.lock:
                        self.writes[path][i] = (value, True)
            except (OSError, urllib.error.URLError, HTTPException) as exc:
                with self.lock:
                    self.errors += 1
                    if not isinstance(getattr(exc, "reason", exc), ConnectionRefusedError):
                        self.cut["write"] += 1
                time.sleep(0.02)

    def allowed_final(self, path: str) -> set[bytes]:
        """The last acknowledged value, or any value sent after it (its answer may have been lost)."""
        w = self.writes[path]
        last = max((i for i, (_, acked) in enumerate(w) if acked), default=-1)
        return {v for v, _ in w[max(last, 0):]}


def _check_records(db_url: str, master_key: bytes) -> dict[str, int]:
    """Whole records only; returns counts. Raises AssertionError on any partial or broken record."""
    from broker.db import AuditRecord, Secret, Session, SessionVerdict
    from broker.secretbox import SecretBox
    engine = create_engine(db_url)
    box = SecretBox(master_key)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                assert conn.execute(text("PRAGMA integrity_check")).scalar_one() == "ok"
            sessions = conn.execute(select(Session)).mappings().all()
            assert all(s["state"] in ("new", "attesting", "attested", "failed") for s in sessions)
            for s in sessions:
                if s["state"] == "attested":
                    assert s["evidence_json"] and s["tee_pubkey_json"] and s["measurement"] and s["token_jti"], s
                    json.loads(s["evidence_json"]), json.loads(s["tee_pubkey_json"])
            nonces = [s["nonce"] for s in sessions]
            assert len(nonces) == len(set(nonces)), "a nonce was issued twice"
            ids = {s["id"] for s in sessions}
            for v in conn.execute(select(SessionVerdict)).mappings():
                assert v["session_id"] in ids and json.loads(v["verdict_json"])["checks"], v
            audits = conn.execute(select(AuditRecord)).mappings().all()
            assert all(a["event"] and a["outcome"] and a["reason"] is not None for a in audits)
            secrets_ = conn.execute(select(Secret)).mappings().all()
            for row in secrets_:
                # Decrypts (the AES-GCM tag verifies with tenant+path as AAD): the row is whole.
                box.open(row["tenant"], row["path"], row["nonce"], row["ciphertext"])
            return {"sessions": len(sessions), "attested": sum(s["state"] == "attested" for s in sessions),
                    "stuck_attesting": sum(s["state"] == "attesting" for s in sessions),
                    "audit": len(audits), "secrets": len(secrets_)}
    finally:
        engine.dispose()


@pytest.mark.slow
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_sigkill_during_attest_and_release(site: Site, tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'broker.db'}"
    srv = Gunicorn(site, db_url, tmp_path / "gunicorn.log")
    srv.start()
    try:
        token = admin(srv.url, "POST", "/tenants", OP, {"name": TENANT}).body["token"]
        load = Load(site, srv.url, token)
        for p in SECRET_PATHS:  # a first value everywhere, acknowledged
            v = secrets.token_bytes(16)
            load.values_written[p].add(v)
            load.writes[p].append((v, admin(srv.url, "PUT", f"/secrets/{p}", token, raw=v).status == 201))
        for t in load.threads:
            t.start()
        kills, in_flight = 0, []
        for _ in range(KILLS):
            time.sleep(random.uniform(0.8, 1.6))
            with load.lock:
                before = (len(load.bodies), sum(load.attest_ok.values()), load.releases)
            srv.kill()
            kills += 1
            in_flight.append(before)
            srv.start()
        time.sleep(1.0)
        load.stop.set()
        for t in load.threads:
            t.join(timeout=60)

        # No nonce used twice: every body ever sent is replayed twice now. A body whose first answer
        # the broker gave may never pass again; one whose answer the kill swallowed may pass at most
        # once in all (the killed broker may not have consumed its nonce yet).
        reused = unanswered = 0
        for g, body, status in load.bodies:
            accepted = int(status == 200) + sum(g.attest(body).status == 200 for _ in range(2))
            unanswered += int(status is None)
            reused += int(accepted > 1 or (status is not None and status != 200 and accepted > 0))
        assert reused == 0, f"{reused} nonces were accepted twice"
        assert all(n == 1 for n in load.attest_ok.values()), "a session answered /attest with 200 twice"
        assert len(load.nonces) == len(set(load.nonces)), "the broker issued a nonce twice"

        # No secret lost: each secret is its last acknowledged value (or a later unanswered write).
        lost = 0
        for p in SECRET_PATHS:
            g = Guest(srv.url, site.evidence)
            assert g.auth().status == 200 and g.attest().status == 200
            lost += int(g.fetch(p) not in load.allowed_final(p))
        assert lost == 0, f"{lost} secrets lost their acknowledged value"
        assert not load.bad_values, f"releases returned values never written: {load.bad_values}"
        assert 500 not in load.statuses, load.statuses
        srv.stop()
        counts = _check_records(db_url, site.master_key)
        assert load.releases > 0 and sum(load.attest_ok.values()) > 0, "the load never got through"
        FIGURES["sigkill"] = {"kills": kills, "secrets_lost": lost, "nonce_reuse": reused,
                              "attests_ok": sum(load.attest_ok.values()), "releases_ok": load.releases,
                              "writes": sum(len(w) for w in load.writes.values()),
                              "attests_sent": len(load.bodies), "attests_unanswered": unanswered, "conn_errors": load.errors, "cut_mid_request": dict(load.cut),
                              "statuses": dict(sorted(load.statuses.items())), **counts}
        print(f"\nSIGKILL fault figures: {FIGURES['sigkill']}")
    finally:
        srv.stop()


# -- PostgreSQL stopped and started under load ---------------------------------------------------
def _pg_bin() -> Path | None:
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]) if
                  d.split("/")[-2].isdigit() else 0)
    return Path(dirs[-1]) if dirs and (Path(dirs[-1]) / "pg_ctl").exists() else None


class PgCluster:
    """A throwaway cluster: initdb in a temp dir owned by user postgres, trust auth, loopback port."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix="fg-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")

    def _run(self, tool: str, *args: str) -> None:
        cmd = ["runuser", "-u", "postgres", "--", str(self.bin / tool), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.dir)
        if proc.returncode != 0:
            raise AssertionError(f"{tool} failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except AssertionError:
            pass  # already stopped
        shutil.rmtree(self.dir, ignore_errors=True)


def _pg_unavailable_reason() -> str | None:
    if _pg_bin() is None:
        return "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin"
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        return "needs root and runuser to run initdb/pg_ctl as user postgres"
    try:
        import pwd
        pwd.getpwnam("postgres")
    except KeyError:
        return "no 'postgres' system user"
    return None


@pytest.fixture
def pg() -> Iterator[PgCluster]:
    why = _pg_unavailable_reason()
    if why:
        pytest.skip(why)
    bin_dir = _pg_bin()
    assert bin_dir is not None
    cluster = PgCluster(bin_dir)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.mark.slow
@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_postgres_outage_gives_503_then_recovers(site: Site, pg: PgCluster) -> None:
    from broker import create_app
    app = create_app({"DATABASE_URL": pg.url, "MASTER_KEY": site.master_key, "OPERATOR_TOKEN": OP,
                      "POLICIES_DIR": str(site.policies), "TRUST_ROOT_PEM": str(site.root_pem),
                      "MEASURE_CACHE": str(site.cache)})
    srv = LiveServer(app)
    stop = threading.Event()
    phase = {"now": "up"}
    seen: dict[str, dict[int, int]] = {"up": {}, "down": {}, "back": {}}
    bad: list[str] = []
    lock = threading.Lock()
    try:
        token = admin(srv.url, "POST", "/tenants", OP, {"name": TENANT}).body["token"]
        assert admin(srv.url, "PUT", f"/secrets/{SECRET_PATHS[0]}", token, raw=b"pg-value").status == 201

        def client(kind: int) -> None:
            while not stop.is_set():
                ph0 = phase["now"]
                try:
                    if kind == 0:
                        r = http("POST", srv.url + "/kbs/v0/auth", {"version": "0.4.0", "tee": "snp"})
                    elif kind == 1:
                        r = admin(srv.url, "GET", "/secrets", token)
                    else:
                        g = Guest(srv.url, site.evidence)
                        r = g.auth()
                        if r.status == 200:
                            r = g.attest()
                except (OSError, urllib.error.URLError, HTTPException) as exc:
                    with lock:
                        bad.append(f"{ph0}: connection failed: {exc!r}")
                    continue
                # A request that began or ended while the database was down belongs to the outage.
                ph = ph0 if ph0 == phase["now"] else "down"
                with lock:
                    seen[ph][r.status] = seen[ph].get(r.status, 0) + 1
                    if r.status >= 500:
                        body = r.body if isinstance(r.body, dict) else {}
                        if r.status != 503 or not isinstance(body.get("detail"), str) or not body["detail"]:
                            bad.append(f"{ph}: {r.status} {str(r.body)[:200]}")
                time.sleep(0.01)

        threads = [threading.Thread(target=client, args=(k % 3,), daemon=True) for k in range(6)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        phase["now"] = "down"
        pg.stop()
        time.sleep(2.0)
        pg.start()
        phase["now"] = "back"
        # Recovers by itself: within a few seconds every kind of request succeeds again.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not all(
                (seen["back"].get(200, 0) > 3, admin(srv.url, "GET", "/secrets", token).status == 200)):
            time.sleep(0.2)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        FIGURES["postgres"] = {k: dict(sorted(v.items())) for k, v in seen.items()}
        print(f"\nPostgreSQL outage figures: {FIGURES['postgres']}")
        assert not bad, bad[:5]
        assert seen["up"].get(200, 0) > 0
        assert seen["down"].get(503, 0) > 0, f"no 503 while the database was down: {seen['down']}"
        assert 500 not in seen["down"]
        assert seen["back"].get(200, 0) > 0, f"no recovery after the database came back: {seen['back']}"
        g = Guest(srv.url, site.evidence)
        assert g.auth().status == 200 and g.attest().status == 200
        assert g.fetch(SECRET_PATHS[0]) == b"pg-value", "the secret did not survive the outage"
    finally:
        stop.set()
        srv.stop()
