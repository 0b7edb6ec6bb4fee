"""Full KBS handshakes (auth, attest, resource) against gunicorn on loopback, with concurrent clients.

Prints handshakes per second and p50/p99 latency, next to the verify-only rate
(verify_report on the same kind of evidence) and the raw ECDSA P-384 verify
rate, measured in the same run on the same machine.

    .venv/bin/python bench/broker.py [--clients 8] [--seconds 10] [--workers 2] [--threads 4] [--db URL]

The evidence is from the `sim` platform (its root passed with --trust-root),
the firmware is a real OVMF build from ../shared/firmware, and each client
signs a fresh report per handshake (the guest's PSP does that in real life, here
it costs client CPU on the same machine: the "client CPU" column says how much).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import http.client
import json
import multiprocessing as mp
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("FIRMGATE_SHARED", REPO.parent / "shared"))
FIRMWARE = SHARED / "firmware" / "edk2-2025.02-OVMF.fd"

POLICY = """version = 1
[firmware]
[[firmware.allowed]]
id = "edk2-2025.02"
sha384 = "{digest}"
svn = 1
bytes = "ovmf.fd"
[[shapes]]
vmm = "qemu"
vcpus = [1]
vcpu_types = ["EPYC-v4"]
[platform]
allow_simulated_platform = true
allow_provisional_firmware = true
[guest]
[[secrets]]
path = "bench/key/disk"
"""


SIM: Any = None


def b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup(work: Path) -> dict[str, Any]:
    from sim.platform import SimPlatform
    from verifier.appraise.store import PolicyStore
    pol = work / "policies"
    pol.mkdir()
    (pol / "ovmf.fd").symlink_to(FIRMWARE)
    digest = hashlib.sha384(FIRMWARE.read_bytes()).hexdigest()
    (pol / "bench.toml").write_text(POLICY.format(digest=digest))
    cache = work / "mcache"
    meas = PolicyStore(pol, cache_dir=cache).get("bench").table.entries()[0][0]
    global SIM
    sim = SIM = SimPlatform("Milan", key_label="bench")  # forked clients sign with this chain
    (work / "root.pem").write_bytes(sim.root_pem())
    (work / "master.key").write_bytes(secrets.token_bytes(32))
    return {"policies": str(pol), "cache": str(cache), "measurement": meas.hex(),
            "root": str(work / "root.pem"), "key": str(work / "master.key")}


# -- the client (one process each) ----------------------------------------------------------
def _client(args: tuple[int, float, str, int]) -> tuple[list[float], float, int]:
    port, seconds, meas_hex, seed = args
    from joserfc import jwe
    from joserfc.jwk import ECKey

    sim = SIM
    meas = bytes.fromhex(meas_hex)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    lat: list[float] = []
    errors = 0
    cpu0 = time.process_time()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        try:
            key = ECKey.generate_key("P-256")
            pub = key.as_dict(private=False)
            jwk = {"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW", "x": pub["x"], "y": pub["y"]}
            conn.request("POST", "/kbs/v0/auth", json.dumps({"version": "0.4.0", "tee": "snp", "extra-params": {}}),
                         {"Content-Type": "application/json"})
            r = conn.getresponse()
            body = json.loads(r.read())
            cookie = r.getheader("Set-Cookie").split(";")[0]
            nonce = body["nonce"]
            canon = json.dumps({"additional-evidence": "", "nonce": nonce, "tee-pubkey": jwk},
                               separators=(",", ":"), sort_keys=True).encode()
            rd = hashlib.sha384(canon).digest() + b"\0" * 16
            report = sim.sign_report(report_data=rd, measurement=meas)
            att = {"init-data": None, "runtime-data": {"nonce": nonce, "tee-pubkey": jwk},
                   "tee-evidence": {"primary_evidence": sim.trustee_json(report, include=("ARK", "ASK", "LEAF")),
                                    "additional_evidence": ""}}
            conn.request("POST", "/kbs/v0/attest", json.dumps(att),
                         {"Content-Type": "application/json", "Cookie": cookie})
            r = conn.getresponse()
            body = r.read()
            if r.status != 200:
                raise RuntimeError(f"attest {r.status} {body[:300]!r}")
            conn.request("GET", "/kbs/v0/resource/bench/key/disk", headers={"Cookie": cookie})
            r = conn.getresponse()
            res = json.loads(r.read())
            if r.status != 200:
                raise RuntimeError(f"resource {r.status} {res}")
            plain = jwe.decrypt_json(res, key, algorithms=["ECDH-ES+A256KW", "A256GCM"]).plaintext
            if plain != b"bench-secret":
                raise RuntimeError("wrong secret")
            lat.append(time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - count and go on; printed in the summary
            errors += 1
            if errors < 3:
                print(f"client error: {exc}", file=sys.stderr)
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    return lat, time.process_time() - cpu0, errors


# -- the reference rates ---------------------------------------------------------------------
def rate(fn: Any, seconds: float = 2.0) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0)


def reference_rates(meas_hex: str, root_pem: str) -> tuple[float, float]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from verifier.evidence import evidence_from_json
    from verifier.options import default_options
    from verifier.verify import verify_report
    key = ec.generate_private_key(ec.SECP384R1())
    msg = secrets.token_bytes(0x2A0)
    sig = key.sign(msg, ec.ECDSA(hashes.SHA384()))
    pub = key.public_key()
    raw = rate(lambda: pub.verify(sig, msg, ec.ECDSA(hashes.SHA384())))
    sim = SIM
    report = sim.sign_report(report_data=b"\1" * 64, measurement=bytes.fromhex(meas_hex))
    ev_json = sim.trustee_json(report, include=("ARK", "ASK", "LEAF"))
    opts = default_options(trust_root=x509.load_pem_x509_certificate(Path(root_pem).read_bytes()))
    try:
        from bench.verify import verify_rate  # type: ignore[import-not-found]
        vrate = float(verify_rate())
    except ImportError:
        vrate = rate(lambda: verify_report(evidence_from_json(ev_json), opts))
    return raw, vrate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--db", help="database URL (default: a fresh SQLite file)")
    args = ap.parse_args()
    if not FIRMWARE.is_file():
        print(f"missing {FIRMWARE}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="fg-bench-"))
    cfg = setup(work)
    db = args.db or f"sqlite:///{work / 'broker.db'}"
    env = dict(os.environ, FIRMGATE_DB=db, FIRMGATE_POLICIES=cfg["policies"], FIRMGATE_TRUST_ROOT=cfg["root"],
               FIRMGATE_MASTER_KEY_FILE=cfg["key"], FIRMGATE_MEASURE_CACHE=cfg["cache"], PYTHONPATH=str(REPO))
    # Create the schema, the tenant and its secret before the workers start.
    from sqlalchemy.orm import sessionmaker

    from broker import vault
    from broker.db import make_engine, migrate
    from broker.secretbox import SecretBox, load_master_key
    engine = make_engine(db)
    migrate(engine)
    with sessionmaker(engine)() as orm:
        vault.add_tenant(orm, "bench")
        vault.put_secret(orm, SecretBox(load_master_key(cfg["key"])), "bench",
                         vault.ResourcePath("bench", "key", "disk"), b"bench-secret")
    engine.dispose()

    port = free_port()
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    proc = subprocess.Popen([gunicorn, "-w", str(args.workers), "--threads", str(args.threads), "-b",
                             f"127.0.0.1:{port}", "--log-level", "warning", "broker:create_app()"],
                            env=env, cwd=str(work))
    try:
        for _ in range(200):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/healthz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        else:
            print("gunicorn did not come up", file=sys.stderr)
            return 1
        # Warm up every worker (policy load, measurement cache, chain cache).
        _client((port, 1.0, cfg["measurement"], 0))
        t0 = time.perf_counter()
        with mp.get_context("fork").Pool(args.clients) as pool:
            results = pool.map(_client, [(port, args.seconds, cfg["measurement"], i) for i in range(args.clients)])
        wall = time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    lat = sorted(x for r in results for x in r[0])
    errors = sum(r[2] for r in results)
    client_cpu = sum(r[1] for r in results)
    raw, vrate = reference_rates(cfg["measurement"], cfg["root"])
    n = len(lat)
    hs = n / args.seconds
    p50 = statistics.median(lat) * 1000 if lat else float("nan")
    p99 = lat[min(n - 1, int(n * 0.99))] * 1000 if lat else float("nan")
    cores = os.cpu_count() or 1
    print(f"\nfirmgate broker benchmark: {cores} cores, gunicorn {args.workers} workers x {args.threads} threads, "
          f"{args.clients} client processes, {args.seconds:.0f} s, db {db.split(':')[0]}")
    print(f"{'measure':44} {'value':>12}")
    print(f"{'-' * 44} {'-' * 12}")
    print(f"{'full handshakes (auth+attest+resource) /s':44} {hs:12.1f}")
    print(f"{'handshake latency p50 (ms)':44} {p50:12.1f}")
    print(f"{'handshake latency p99 (ms)':44} {p99:12.1f}")
    print(f"{'handshakes completed / errors':44} {f'{n} / {errors}':>12}")
    print(f"{'client CPU per handshake (ms, same machine)':44} {client_cpu / max(n, 1) * 1000:12.1f}")
    print(f"{'verify-only (verify_report) /s, 1 core':44} {vrate:12.1f}")
    print(f"{'raw ECDSA P-384 verify /s, 1 core':44} {raw:12.1f}")
    print(f"{'handshakes / raw ECDSA verify rate':44} {hs / raw * 100:11.1f}%")
    print(f"(wall {wall:.1f} s; target: handshakes >= 50% of the raw ECDSA P-384 verify rate)")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
