"""Policy loading and appraisal costs: what a broker pays per policy change and per attestation.

Usage: python bench/appraise.py [--seconds S]. Uses the real OVMF builds in ../shared/firmware
(2025.02 and 2026.08) with 2 firmware x 24 shapes, and a simulated Milan report.
Prints a table. Per request the broker pays `store.get` (a refresh check) + `appraise`;
a policy change pays one load (measurements come from the on-disk cache after the first).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from sim.platform import SimPlatform  # noqa: E402
from verifier.appraise.appraise import appraise, release_allowed  # noqa: E402
from verifier.appraise.store import PolicyStore  # noqa: E402
from verifier.ear import ear_claims, issue_ear_cwt, issue_ear_jwt, public_jwk, verify_ear_cwt, verify_ear_jwt  # noqa: E402
from verifier.evidence import load_evidence  # noqa: E402
from verifier.options import default_options  # noqa: E402
from verifier.verify import verify_report  # noqa: E402

SHARED = Path(os.environ.get("FIRMGATE_SHARED", REPO.parent / "shared"))
FIRMWARE = [("v1", SHARED / "firmware" / "edk2-2025.02-OVMF.fd", 1),
            ("v2", SHARED / "firmware" / "edk2-2026.08-OVMF.amdsev.fd", 2)]


def per_call(fn: Callable[[], object], seconds: float) -> tuple[float, int]:
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return (time.perf_counter() - start) / n, n


def once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "policies"
        d.mkdir()
        entries = ""
        for fid, path, svn in FIRMWARE:
            shutil.copyfile(path, (d / f"{fid}.fd"))  # must live in the policy tree
            digest = hashlib.sha384(path.read_bytes()).hexdigest()
            entries += f'[[firmware.allowed]]\nid = "{fid}"\nsha384 = "{digest}"\nsvn = {svn}\nbytes = "{fid}.fd"\n'
        (d / "acme.toml").write_text(
            "version = 1\n[firmware]\nmin_svn = 1\n" + entries +
            '[[shapes]]\nvcpus = [1, 2, 4, 8, 16, 32, 64, 128]\nvcpu_types = ["EPYC-v4", "EPYC-Milan", "EPYC-Genoa"]\n'
            "[platform]\nallow_simulated_platform = true\n"
            '[[secrets]]\npath = "acme/key/disk"\nmin_svn = 2\nunsafe_unbound = true\n')
        cache = Path(tmp) / "cache"
        rows: list[tuple[str, str]] = []
        cold = once(lambda: PolicyStore(d, cache_dir=cache))
        rows.append(("policy load, 2 firmware x 24 shapes, cold cache", f"{cold * 1e3:9.1f} ms"))
        warm = once(lambda: PolicyStore(d, cache_dir=cache))
        rows.append(("policy load, same, warm cache", f"{warm * 1e3:9.1f} ms"))
        store = PolicyStore(d, cache_dir=cache, min_interval=0)
        lp = store.get("acme")
        meas = next(m for m, match in lp.table.entries() if match.firmware.id == "v2")
        s = SimPlatform("Milan")
        report = s.sign_report(measurement=meas)
        verified = verify_report(load_evidence(report), default_options(trust_root=s.ark, certs=(s.leaf, s.intermediate)))
        t, _ = per_call(lambda: store.refresh(force=True), args.seconds)
        rows.append(("store.refresh(force), nothing changed (stat + HEAD)", f"{t * 1e6:9.1f} us"))
        store2 = PolicyStore(d, cache_dir=cache)  # default 1 s interval: the request-path cost
        t, _ = per_call(lambda: store2.get("acme"), args.seconds)
        rows.append(("store.get (rate-limited refresh)", f"{t * 1e6:9.1f} us"))
        t, _ = per_call(lambda: appraise(verified, lp, expected_report_data=bytes(64)), args.seconds)
        rows.append(("appraise (18 rules, table lookup)", f"{t * 1e6:9.1f} us"))
        verdict = appraise(verified, lp)
        t, _ = per_call(lambda: release_allowed(lp, verdict, "acme/key/disk"), args.seconds)
        rows.append(("release_allowed", f"{t * 1e6:9.1f} us"))
        claims = ear_claims(verdict)
        for alg, curve in (("ES256", ec.SECP256R1()), ("ES384", ec.SECP384R1())):
            key = ec.generate_private_key(curve)
            jwk = public_jwk(key, alg)
            tok = issue_ear_jwt(claims, key, alg)
            cwt = issue_ear_cwt(claims, key, alg)
            t, _ = per_call(lambda: issue_ear_jwt(claims, key, alg), args.seconds)
            rows.append((f"issue_ear_jwt {alg}", f"{t * 1e6:9.1f} us"))
            t, _ = per_call(lambda: verify_ear_jwt(tok, jwk), args.seconds)
            rows.append((f"verify_ear_jwt {alg}", f"{t * 1e6:9.1f} us"))
            t, _ = per_call(lambda: issue_ear_cwt(claims, key, alg), args.seconds)
            rows.append((f"issue_ear_cwt {alg}", f"{t * 1e6:9.1f} us"))
            t, _ = per_call(lambda: verify_ear_cwt(cwt, jwk), args.seconds)
            rows.append((f"verify_ear_cwt {alg}", f"{t * 1e6:9.1f} us"))
        width = max(len(r[0]) for r in rows)
        print(f"{'operation':<{width}}  {'time':>12}")
        print(f"{'-' * width}  {'-' * 12}")
        for name, value in rows:
            print(f"{name:<{width}}  {value:>12}")


if __name__ == "__main__":
    main()
