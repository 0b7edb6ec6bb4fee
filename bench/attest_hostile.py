"""What one unauthenticated hostile /attest costs the broker (docs/security.md, REVIEW-2). Prints a table.

The body of the outside review: 16 MiB (ATTEST_MAX_BYTES), `additional_evidence` made of as
many '"' as fit (8 million; each is 2 bytes in JSON and 2 in its RFC 8785 form), either with
`primary_evidence: {}` (the review's) or with a well-formed simulated report (so parsing passes
and the REPORT_DATA hash runs before the refusal). The broker runs under gunicorn (1 worker, 4
threads) on loopback; CPU is utime+stime of the worker from /proc/<pid>/stat, memory its VmRSS
before and VmHWM after each run (proc(5)); each row starts a fresh broker.

Run: .venv/bin/python bench/attest_hostile.py   (~1 minute)
"""
from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sim.platform import SimPlatform

BODY = 16 * 1024 * 1024
TICKS = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (proc(5) fields 14, 15)


def _status_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _jwk() -> dict[str, str]:
    import base64

    from cryptography.hazmat.primitives.asymmetric import ec
    nums = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()
    return {"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW", "x": b64(nums.x), "y": b64(nums.y)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _hostile(base: str, sim: SimPlatform, shaped: bool) -> int:
    jar = CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    auth = json.dumps({"version": "0.4.0", "tee": "snp"}).encode()
    with opener.open(urllib.request.Request(base + "/kbs/v0/auth", auth, {"Content-Type": "application/json"})) as r:
        nonce = json.loads(r.read())["nonce"]
    jwk = _jwk()  # a valid key: a bad one is refused before any hashing, by the old code too
    primary: Any = sim.trustee_json(sim.sign_report(report_data=b"\x01" * 64)) if shaped else {}
    head = json.dumps({"init-data": None, "runtime-data": {"nonce": nonce, "tee-pubkey": jwk},
                       "tee-evidence": {"primary_evidence": primary, "additional_evidence": ""}})
    quotes, pad = divmod(BODY - len(head), 2)
    body = (" " * pad + head[:-3] + '\\"' * quotes + head[-3:]).encode()
    req = urllib.request.Request(base + "/kbs/v0/attest", body, {"Content-Type": "application/json"})
    try:
        with opener.open(req, timeout=300) as r:
            return int(r.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def run(concurrent: int, shaped: bool, sim: SimPlatform, root: Path) -> tuple[float, float, float, list[int]]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "FIRMGATE_DB": f"sqlite:///{root / f'b{port}.db'}",
           "FIRMGATE_MASTER_KEY": secrets.token_hex(32), "FIRMGATE_POLICIES": str(root / "policies"),
           "FIRMGATE_TRUST_ROOT": str(root / "root.pem")}
    gun = Path(sys.executable).parent / "gunicorn"
    proc = subprocess.Popen([str(gun), "-w", "1", "--threads", "4", "-b", f"127.0.0.1:{port}", "--timeout", "300",
                             "broker:create_app()"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(base + "/healthz", timeout=2).close()
                break
            except OSError:
                time.sleep(0.1)
        worker = _children(proc.pid)[0]
        rss0, cpu0 = _status_mib(worker, "VmRSS"), _proc_cpu(worker)
        statuses: list[int] = []
        threads = [threading.Thread(target=lambda: statuses.append(_hostile(base, sim, shaped)))
                   for _ in range(concurrent)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return _proc_cpu(worker) - cpu0, rss0, _status_mib(worker, "VmHWM"), statuses
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    sim = SimPlatform("Milan")
    with tempfile.TemporaryDirectory(prefix="fg-hostile-") as d:
        root = Path(d)
        (root / "policies").mkdir()
        (root / "root.pem").write_bytes(sim.root_pem())
        print("hostile /attest, 16 MiB body, additional_evidence = 8 million '\"'; gunicorn 1 worker x 4 threads")
        print(f"{'primary_evidence':<28} {'at once':>7} {'worker CPU s':>12} {'RSS before MiB':>14} "
              f"{'peak RSS MiB':>12}  answers")
        for shaped in (False, True):
            for n in (1, 4):
                cpu, rss0, peak, statuses = run(n, shaped, sim, root)
                label = "a well-formed sim report" if shaped else "{} (the review's)"
                print(f"{label:<28} {n:>7} {cpu:>12.2f} {rss0:>14.0f} {peak:>12.0f}  {sorted(statuses)}")


if __name__ == "__main__":
    main()
