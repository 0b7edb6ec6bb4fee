"""Broker at scale (issue 21): start time, resident memory, server CPU and rows written per attestation
as the number of tenant policies grows, for the code before issue 21 and this tree, in one run.

    .venv/bin/python bench/broker.py --tenants 1,50,200,1000,10000 [--handshakes 20]
                                     [--before REV|none] [--before-max 1000] [--json]

(`bench/tenants.py` takes the same options.) For each N it writes N tenant policies (below), warms
the on-disk measurement cache (a restart, not a first start), seeds a fresh SQLite database with
the bench tenant's secret, starts gunicorn (1 worker, 4 threads) and measures:

- start: serving = first 200 from /healthz after the process was started; first secret = an
  unmodified guest's handshake (no tenant hint) started then ended with the stored secret; all
  loaded = /healthz no longer says "policies": "loading" (the code before loads everything first);
- RSS = VmRSS of the gunicorn master and worker after the load and the handshakes;
- server CPU per handshake = gunicorn tree CPU (bench/broker.py tree_cpu) over `--handshakes`
  sequential handshakes (after 2 warm-up ones) / handshakes;
- rows per attestation = new fg_session_verdicts rows and fg_audit rows of event "attest" / handshakes.

"before" runs the broker from `git archive REV` of this repository (default: the last commit before
issue 21), with PYTHONPATH pointing at it; its database is seeded by that tree's own code.
It is skipped above `--before-max` tenants (it appraises every tenant per handshake).

The policies: the bench tenant (firmware edk2-2025.02, 1 vCPU EPYC-v4, no kernel hashes: the
measurement the bench guest reports), 3 look-alike tenants with the same firmware and shape (they
share its MEASUREMENT, as owners of a stock OVMF do), then tenants i = 4.. of two kinds: 3 in 5 boot
directly with kernel hashes on edk2-2026.08 amdsev (one of 7 kernels, their own command line:
their own MEASUREMENT), 2 in 5 boot firmware-only on edk2-2025.02 or edk2-2022.11 in one of 6
other shapes (groups sharing a MEASUREMENT, growing with N, none the bench guest's). Every secret
says unsafe_unbound: the guest's report carries no owner ID block (binding is beside the point).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("FIRMGATE_SHARED", REPO.parent / "shared"))
BEFORE_REV = "b508f5d"  # the last commit before issue 21 (measurement index, shared tables)

BUILDS = {"direct": "edk2-2026.08-OVMF.amdsev.fd", "stock": "edk2-2025.02-OVMF.fd", "old": "edk2-2022.11-OVMF.fd"}
LOOKALIKES = 3
OTHER_SHAPES = [(2, "EPYC-v4"), (4, "EPYC-v4"), (1, "EPYC-Milan"), (2, "EPYC-Milan"), (8, "EPYC-v4"), (2, "EPYC")]

from bench import _loadgen as lg  # noqa: E402 - after the sys.path line
from bench.broker import free_port, tree_cpu  # noqa: E402

HEAD = """version = 1
[firmware]
[[firmware.allowed]]
id = "{fwid}"
sha384 = "{digest}"
svn = 1
bytes = "{loc}"
[[shapes]]
vmm = "qemu"
vcpus = [{vcpus}]
vcpu_types = ["{vtype}"]
{kernel}[platform]
allow_simulated_platform = true
allow_provisional_firmware = true
[guest]
[[secrets]]
path = "{secret}"
unsafe_unbound = true   # the bench guest's report has no owner ID block; binding is beside the point
"""


def _sha256(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def write_policies(pol: Path, n: int, digests: dict[str, str]) -> None:
    pol.mkdir()
    for kind, name in BUILDS.items():
        shutil.copyfile(SHARED / "firmware" / name, pol / f"{kind}.fd")  # must live in the policy tree
    repo, rtype, tag = lg.SECRET_PATH.split("/")

    def put(tenant: str, kind: str, vcpus: int, vtype: str, kernel: str = "") -> None:
        (pol / f"{tenant}.toml").write_text(HEAD.format(
            fwid=f"fw-{kind}", digest=digests[kind], loc=f"{kind}.fd", vcpus=vcpus, vtype=vtype, kernel=kernel,
            secret=f"{tenant}/{rtype}/{tag}"))
    put(repo, "stock", 1, "EPYC-v4")
    for i in range(1, n):
        tenant = f"t{i:05d}"
        if i <= LOOKALIKES:
            put(tenant, "stock", 1, "EPYC-v4")
        elif i % 5 < 3:
            kernel = (f'kernel = {{ kernel = "{_sha256(f"vmlinuz-{i % 7}")}", initrd = "{_sha256("")}", '
                      f'cmdline = "{_sha256(f"root=/dev/vda1 tenant={tenant}")}" }}\n')
            put(tenant, "direct", 2, "EPYC-v4", kernel)
        else:
            vcpus, vtype = OTHER_SHAPES[i % len(OTHER_SHAPES)]
            put(tenant, "stock" if i % 2 else "old", vcpus, vtype)


def warm_cache(pol: Path, cache: Path) -> None:
    """Every tenant's measurements into the on-disk cache, one firmware pass per build."""
    from verifier.appraise.policy import load_policy
    from verifier.appraise.reference import shapes_of
    from verifier.measure.cache import MeasurementCache
    from verifier.measure.launch import measurement_table
    shapes: dict[str, list[Any]] = {k: [] for k in BUILDS}
    for f in sorted(pol.glob("*.toml")):
        p = load_policy(f, check_files=False)
        shapes[p.firmware[0].location[:-3]].extend(shapes_of(p.shapes))
    mc = MeasurementCache(cache)
    for kind, name in BUILDS.items():
        if shapes[kind]:
            measurement_table((SHARED / "firmware" / name).read_bytes(), list(dict.fromkeys(shapes[kind])), cache=mc)


def bench_measurement(pol: Path, cache: Path) -> bytes:
    from verifier.appraise.policy import load_policy
    from verifier.appraise.reference import ReferenceTable
    from verifier.measure.cache import MeasurementCache
    table = ReferenceTable(load_policy(pol / f"{lg.SECRET_PATH.split('/')[0]}.toml"), MeasurementCache(cache))
    table.load_files()
    return table.entries()[0][0]


def before_tree(work: Path, rev: str) -> Path:
    """`git archive REV` of this repository, unpacked into work/before."""
    out = work / "before"
    out.mkdir()
    tar = work / "before.tar"
    with tar.open("wb") as fh:
        subprocess.run(["git", "-C", str(REPO), "archive", rev], stdout=fh, check=True)
    with tarfile.open(tar) as tf:
        tf.extractall(out, filter="data")
    return out


def _rss_mib(master: int) -> float:
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if pid == master or fields.get("PPid", "").strip() == str(master):
            total += int(fields.get("VmRSS", "0 kB").split()[0])
    return total / 1024


def _health(port: int) -> str | None:
    try:
        conn = lg.Connection(port, timeout=5)
        r = conn.request(b"GET", b"/healthz")
        conn.close()
    except (OSError, lg.HandshakeError):
        return None
    if r.status != 200:
        return None
    return "loading" if b'"loading"' in r.body else "ok"


def _rows(db: Path) -> tuple[int, int]:
    with sqlite3.connect(db) as conn:
        v = conn.execute("SELECT COUNT(*) FROM fg_session_verdicts").fetchone()[0]
        a = conn.execute("SELECT COUNT(*) FROM fg_audit WHERE event = 'attest'").fetchone()[0]
    return int(v), int(a)


@dataclass
class Row:
    tenants: int
    code: str
    serving_s: float
    first_secret_s: float
    loaded_s: float
    rss_mib: float
    cpu_ms: float
    verdict_rows: float
    audit_rows: float
    handshakes: int
    errors: int


def run_one(code: str, tree: Path, pol: Path, cache: Path, work: Path, n: int, guest: lg.Guest,
            handshakes: int, timeout: float) -> Row:
    db = work / f"{code}-{n}.db"
    key = work / "master.key"
    env = {**os.environ, "PYTHONPATH": str(tree), "FIRMGATE_DB": f"sqlite:///{db}", "FIRMGATE_POLICIES": str(pol),
           "FIRMGATE_TRUST_ROOT": str(work / "root.pem"), "FIRMGATE_MEASURE_CACHE": str(cache),
           "FIRMGATE_MASTER_KEY_FILE": str(key)}
    # The database is seeded by the code under test (its own schema and vault).
    subprocess.run([sys.executable, "-c", "import sys; from bench.broker import seed_db; seed_db(*sys.argv[1:])",
                    f"sqlite:///{db}", str(key)], env=env, cwd=str(tree), check=True)
    port = free_port()
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    t0 = time.monotonic()
    proc = subprocess.Popen([gunicorn, "-w", "1", "--threads", "4", "-b", f"127.0.0.1:{port}", "--log-level",
                             "warning", "broker:create_app()"], env=env, cwd=str(tree))
    errors = 0
    try:
        serving = first = loaded = float("nan")
        while time.monotonic() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"gunicorn ({code}, {n} tenants) exited with status {proc.returncode}")
            h = _health(port)
            if h is not None:
                serving = time.monotonic() - t0
                break
            time.sleep(0.02)
        else:
            raise RuntimeError(f"gunicorn ({code}, {n} tenants) did not serve within {timeout:.0f} s")
        conn = lg.Connection(port, timeout=timeout)
        guest.handshake(conn)  # an unmodified guest: no tenant hint
        first = time.monotonic() - t0
        while _health(port) != "ok":
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"{code}: policies still loading after {timeout:.0f} s")
            time.sleep(0.05)
        loaded = time.monotonic() - t0
        conn.close()  # idle past gunicorn's keep-alive (2 s) while the policies loaded: a fresh one
        conn = lg.Connection(port, timeout=timeout)
        guest.handshake(conn)  # warm-up
        guest.handshake(conn)
        cpu0, _ = tree_cpu(proc.pid)
        rows0 = _rows(db)
        for _ in range(handshakes):
            try:
                guest.handshake(conn)
            except (lg.HandshakeError, OSError) as exc:
                errors += 1
                print(f"{code} {n}: {type(exc).__name__}: {exc}", file=sys.stderr)
                conn.reopen_after_error()
        cpu1, _ = tree_cpu(proc.pid)
        rows1 = _rows(db)
        rss = _rss_mib(proc.pid)
        conn.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    h = max(handshakes, 1)
    return Row(n, code, round(serving, 2), round(first, 2), round(loaded, 2), round(rss, 1),
               round((cpu1 - cpu0) / h * 1000, 2), (rows1[0] - rows0[0]) / h, (rows1[1] - rows0[1]) / h,
               handshakes, errors)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tenants", default="1,50,200,1000,10000", help="comma-separated tenant counts")
    ap.add_argument("--handshakes", type=int, default=20, help="measured handshakes per run (default 20)")
    ap.add_argument("--before", default=BEFORE_REV, help=f"git revision of the code before (default {BEFORE_REV}); "
                                                         "'none' to skip")
    ap.add_argument("--before-max", type=int, default=1000, help="largest N the code before runs for (default 1000)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds a server may take to load (default 900)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        counts = [int(x) for x in args.tenants.split(",") if x.strip()]
    except ValueError:
        print("--tenants: comma-separated positive integers", file=sys.stderr)
        return 2
    if not counts or min(counts) < 1 or args.handshakes < 1:
        print("--tenants needs positive counts and --handshakes at least 1", file=sys.stderr)
        return 2
    missing = [n for n in BUILDS.values() if not (SHARED / "firmware" / n).is_file()]
    if missing:
        print(f"missing firmware {', '.join(missing)} under {SHARED / 'firmware'}", file=sys.stderr)
        return 2
    from sim.platform import SimPlatform
    digests = {k: hashlib.sha384((SHARED / "firmware" / n).read_bytes()).hexdigest() for k, n in BUILDS.items()}
    sim = SimPlatform("Milan", key_label="bench-tenants")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="fg-bench-tenants-") as tmp:
        work = Path(tmp)
        (work / "root.pem").write_bytes(sim.root_pem())
        (work / "master.key").write_bytes(secrets.token_bytes(32))
        trees = [("after", REPO)]
        if args.before.lower() != "none":
            trees.insert(0, ("before", before_tree(work, args.before)))
        cache = work / "mcache"
        for n in counts:
            pol = work / f"policies-{n}"
            write_policies(pol, n, digests)
            warm_cache(pol, cache)
            guest = lg.Guest(lg.EvidenceTemplate(sim, bench_measurement(pol, cache)))
            for code, tree in trees:
                if code == "before" and n > args.before_max:
                    continue
                try:
                    row = run_one(code, tree, pol, cache, work, n, guest, args.handshakes, args.timeout)
                except (RuntimeError, OSError, lg.HandshakeError, subprocess.CalledProcessError) as exc:
                    print(f"  {code:6s} {n:6d} tenants FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
                    nan = float("nan")
                    row = Row(n, code, nan, nan, nan, nan, nan, nan, nan, 0, 1)
                rows.append(row)
                print(f"  {code:6s} {n:6d} tenants: {asdict(row)}", file=sys.stderr)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=1))
    else:
        print_table(rows)
    return 1 if any(r.errors for r in rows) else 0


def print_table(rows: list[Row]) -> None:
    base = {r.code: r.cpu_ms for r in rows if r.tenants == min(x.tenants for x in rows)}
    print("| tenants | code | serving (s) | first secret (s) | all loaded (s) | RSS (MiB) "
          "| server CPU / handshake (ms) | vs fewest tenants | verdict + audit rows / attestation |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r.cpu_ms / base[r.code] if base.get(r.code) else float("nan")
        print(f"| {r.tenants} | {r.code} | {r.serving_s:.2f} | {r.first_secret_s:.2f} | {r.loaded_s:.2f} "
              f"| {r.rss_mib:.0f} | {r.cpu_ms:.1f} | {ratio:.2f}x | {r.verdict_rows:g} + {r.audit_rows:g} |")


if __name__ == "__main__":
    sys.exit(main())
