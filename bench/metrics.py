"""What /metrics bookkeeping costs a KBS handshake, in each prometheus_client mode.

A handshake is three requests (auth, attest, resource); the broker's metrics
do, per request, one counter increment and one histogram observation (the
after_request hook), and per handshake a few more (the attest latency by EAR
status, the protocol event, the release by tenant, which asks the appraiser
whether the tenant has a policy). This script times exactly those calls, in a
child process per mode (prometheus_client picks its mode at import), in CPU time
(time.process_time, so a busy machine does not inflate them):

    .venv/bin/python bench/metrics.py [--handshakes 20000]

"plain" is `firmgate serve`; "multiprocess" is gunicorn with
broker.gunicorn_conf (values in memory-mapped files). It also times a no-op
Flask route through the test client with and without the hooks, to put the
numbers next to a request's own cost. Compare with bench/broker.py's server
CPU per handshake (about 10 ms on the 2-core development machine).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _child(handshakes: int) -> dict[str, float]:
    sys.path.insert(0, str(REPO))
    from flask import Flask

    from broker import metrics
    from verifier.verdict import CheckResult, Outcome, Verdict

    class Appraiser:
        def policy_id(self, tenant: str) -> str | None:
            return f"{tenant}@1"

    class State:
        appraiser = Appraiser()

    app = Flask("bench")
    app.extensions["firmgate"] = State()
    verdict = Verdict(checks=(CheckResult("firmware.measurement", Outcome.PASS, "ok"),))
    routes = ("/kbs/v0/auth", "/kbs/v0/attest", "/kbs/v0/resource/<repo>/<rtype>/<tag>")
    with app.test_request_context("/kbs/v0/attest"):
        t0 = time.process_time()
        for _ in range(handshakes):
            for r in routes:
                metrics.HTTP_REQUESTS.labels("POST", r, "200").inc()
                metrics.HTTP_DURATION.labels(r).observe(0.002)
            metrics.count_event("auth", "ok")
            metrics.appraised("acme", verdict)
            metrics.attested("affirming")
            metrics.ATTEST_DURATION.labels("affirming").observe(0.004)
            metrics.released("acme")
        per_handshake_us = (time.process_time() - t0) / handshakes * 1e6

    def noop_app(hooks: bool) -> Flask:
        a = Flask("noop")
        a.extensions["firmgate"] = State()

        @a.get("/noop")
        def noop() -> str:
            return "ok"
        if hooks:
            metrics.init_app(a)
        return a

    out = {"metric calls per handshake (us)": per_handshake_us}
    n = max(2000, handshakes // 5)
    for hooks in (False, True):
        client = noop_app(hooks).test_client()
        for _ in range(200):
            client.get("/noop")
        t0 = time.process_time()
        for _ in range(n):
            client.get("/noop")
        out[f"no-op request via test client, hooks {'on' if hooks else 'off'} (us)"] = \
            (time.process_time() - t0) / n * 1e6
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--handshakes", type=int, default=20000)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.handshakes < 1:
        print("error: --handshakes must be at least 1", file=sys.stderr)
        return 2
    if args.child:
        print(json.dumps(_child(args.handshakes)))
        return 0
    results: dict[str, dict[str, float]] = {}
    for mode in ("plain", "multiprocess"):
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        with tempfile.TemporaryDirectory(prefix="fg-bench-metrics-") as d:
            if mode == "multiprocess":
                env["PROMETHEUS_MULTIPROC_DIR"] = d
            out = subprocess.run([sys.executable, __file__, "--child", "--handshakes", str(args.handshakes)],
                                 env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return 1
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    rows = list(results["plain"])
    print(f"\nfirmgate metrics cost, {args.handshakes} simulated handshakes, {os.cpu_count()} cores")
    print(f"{'':60s}{'plain':>12s}{'multiprocess':>14s}")
    for r in rows:
        print(f"{r:60s}{results['plain'][r]:12.1f}{results['multiprocess'][r]:14.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
