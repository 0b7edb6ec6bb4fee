"""What one unauthenticated hostile /attest costs the broker (docs/security.md, REVIEW-2, BUG-19).
Prints a table: each row once against a baseline checkout and once against this tree, in the same run.

Each body is the largest the broker takes (its ATTEST_MAX_BYTES) and of one shape: the outside
review's (`additional_evidence` made of as many escaped '"' as fit, with `primary_evidence: {}` or
a well-formed simulated report, so parsing passes and the REPORT_DATA hash runs before the refusal),
or BUG-19's (primary_evidence an array of as many integers, empty arrays or empty objects as fit;
arrays nested a thousand deep; one string over the additional_evidence cap). The broker runs under
gunicorn (1 worker, 4 threads) on loopback; CPU is utime+stime of the worker from /proc/<pid>/stat
(the /auth before included), memory its VmRSS before and VmHWM after each run (proc(5)); each row
starts a fresh broker.

Run: .venv/bin/python bench/attest_hostile.py [--baseline REV]   (~2 minutes; REV defaults to
e162b04, the tree before the raw counts; --baseline none runs this tree only)
"""
from __future__ import annotations

import argparse
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
from collections.abc import Callable
from http.cookiejar import CookieJar
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sim.platform import SimPlatform

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


def _body(size: int, head: bytes, primary: bytes | None, additional: bytes) -> bytes:
    """head's JSON with these raw members, space-padded to exactly size bytes."""
    body = head[:-1] + b', "tee-evidence": {"primary_evidence": ' + (primary or b"{}") + \
        b', "additional_evidence": ' + additional + b"}}"
    return b" " * (size - len(body)) + body


def _fill(unit: bytes, where: str) -> Callable[[int, bytes, bytes], bytes]:
    """A shape: primary_evidence an array of unit (comma-separated), or additional_evidence a string of unit."""
    def make(size: int, head: bytes, shaped: bytes) -> bytes:
        room = size - len(_body(0, head, shaped, b'""')) - 2
        if where == "array":
            return _body(size, head, b"[" + b",".join([unit] * (room // (len(unit) + 1))) + b"]", b'""')
        return _body(size, head, shaped or None, b'"' + unit * (room // len(unit)) + b'"')
    return make


NEST = b"[" * 1000 + b"]" * 1000
# name, body maker, with a well-formed simulated report as primary_evidence?
SHAPES: list[tuple[str, Callable[[int, bytes, bytes], bytes], bool]] = [
    ("escaped quotes, {} (the review's)", _fill(b'\\"', "string"), False),
    ("escaped quotes, a sim report", _fill(b'\\"', "string"), True),
    ("integers", _fill(b"0", "array"), False),
    ("empty arrays", _fill(b"[]", "array"), False),
    ("empty objects", _fill(b"{}", "array"), False),
    ("arrays 1000 deep", _fill(NEST, "array"), False),
    ("one string over the cap", _fill(b"x", "string"), False),
]


def _hostile(base: str, size: int, sim: SimPlatform, make: Callable[[int, bytes, bytes], bytes],
             shaped: bool) -> str:
    jar = CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    auth = json.dumps({"version": "0.4.0", "tee": "snp"}).encode()
    with opener.open(urllib.request.Request(base + "/kbs/v0/auth", auth, {"Content-Type": "application/json"})) as r:
        nonce = json.loads(r.read())["nonce"]
    jwk = _jwk()  # a valid key: a bad one is refused before any hashing, by the old code too
    head = json.dumps({"init-data": None, "runtime-data": {"nonce": nonce, "tee-pubkey": jwk}}).encode()
    report = json.dumps(sim.trustee_json(sim.sign_report(report_data=b"\x01" * 64))).encode() if shaped else b""
    req = urllib.request.Request(base + "/kbs/v0/attest", make(size, head, report), {"Content-Type": "application/json"})
    try:
        with opener.open(req, timeout=300) as r:
            return str(r.status)
    except urllib.error.HTTPError as err:
        detail = json.loads(err.read()).get("detail", "")
        return f"{err.code} {detail[:38]}"


def _max_body(tree: Path) -> int:
    out = subprocess.run([sys.executable, "-c", "from broker.config import DEFAULTS; print(DEFAULTS['ATTEST_MAX_BYTES'])"],
                         cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True, check=True)
    return int(out.stdout)


def run(tree: Path, concurrent: int, make: Callable[[int, bytes, bytes], bytes], shaped: bool, sim: SimPlatform,
        root: Path) -> tuple[float, float, list[str]]:
    """(worker CPU s, peak RSS growth MiB, answers) of concurrent hostile bodies against a fresh broker."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(tree), "FIRMGATE_DB": f"sqlite:///{root / f'b{port}.db'}",
           "FIRMGATE_MASTER_KEY": secrets.token_hex(32), "FIRMGATE_POLICIES": str(root / "policies"),
           "FIRMGATE_TRUST_ROOT": str(root / "root.pem")}
    gun = Path(sys.executable).parent / "gunicorn"
    proc = subprocess.Popen([str(gun), "-w", "1", "--threads", "4", "-b", f"127.0.0.1:{port}", "--timeout", "300",
                             "broker:create_app()"], cwd=tree, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    size = _max_body(tree)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(base + "/healthz", timeout=2).close()
                break
            except OSError:
                time.sleep(0.1)
        worker = _children(proc.pid)[0]
        rss0, cpu0 = _status_mib(worker, "VmRSS"), _proc_cpu(worker)
        answers: list[str] = []
        threads = [threading.Thread(target=lambda: answers.append(_hostile(base, size, sim, make, shaped)))
                   for _ in range(concurrent)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return _proc_cpu(worker) - cpu0, _status_mib(worker, "VmHWM") - rss0, answers
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default="e162b04", help="a git revision to compare with, or 'none'")
    args = ap.parse_args()
    sim = SimPlatform("Milan")
    with tempfile.TemporaryDirectory(prefix="fg-hostile-") as d:
        root = Path(d)
        (root / "policies").mkdir()
        (root / "root.pem").write_bytes(sim.root_pem())
        trees = [("this tree", REPO)]
        if args.baseline != "none":
            base_tree = root / "baseline"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(base_tree), args.baseline],
                           check=True)
            trees.insert(0, (args.baseline, base_tree))
        try:
            sizes = ", ".join(f"{name} {_max_body(tree) / 2**20:.0f} MiB" for name, tree in trees)
            print(f"hostile /attest, maximal bodies ({sizes}); gunicorn 1 worker x 4 threads")
            print(f"{'body':<36} {'at once':>7} {'tree':<10} {'worker CPU s':>12} {'peak RSS +MiB':>13}  answers")
            rows = [(name, make, shaped, 1) for name, make, shaped in SHAPES] + [(*SHAPES[0], 4)]
            for name, make, shaped, n in rows:
                for label, tree in trees:
                    cpu, grew, answers = run(tree, n, make, shaped, sim, root)
                    shown = sorted(set(answers)) if len(set(answers)) == 1 else sorted(answers)
                    print(f"{name:<36} {n:>7} {label:<10} {cpu:>12.2f} {grew:>13.0f}  {shown}", flush=True)
        finally:
            if args.baseline != "none":
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(root / "baseline")],
                               check=False)


if __name__ == "__main__":
    main()
