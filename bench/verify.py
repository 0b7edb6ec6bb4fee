"""Reports verified per second (chain validated once per leaf, then cached) next to the raw
ECDSA P-384 verify rate of `cryptography`, same machine, same run.

Usage: python bench/verify.py [--seconds S]. Uses the real Genoa report in ../shared
when present, else a simulated one. Prints a table; the target is verify_report >= 85%
of the raw rate.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature  # noqa: E402

from verifier.certs import load_certificates  # noqa: E402
from verifier.evidence import load_evidence  # noqa: E402
from verifier.options import VerifyOptions  # noqa: E402
from verifier.pipeline import verify_evidence  # noqa: E402
from verifier.verify import verify_report  # noqa: E402


def rates(fns: list[Callable[[], object]], seconds: float) -> list[float]:
    """Calls per CPU-second of each function (process CPU time, so that other processes on a
    shared machine do not count), measured in interleaved blocks so that cache and frequency
    effects hit every row alike."""
    for fn in fns:
        fn()  # warm up (fills the chain cache)
    spent = [0.0] * len(fns)
    calls = [0] * len(fns)
    deadline = time.process_time() + seconds * len(fns)
    while time.process_time() < deadline:
        for i, fn in enumerate(fns):
            t = time.process_time()
            for _ in range(20):
                fn()
            spent[i] += time.process_time() - t
            calls[i] += 20
    return [c / s for c, s in zip(calls, spent)]


def setup() -> tuple[str, bytes, VerifyOptions]:
    shared = REPO.parent / "shared" / "vectors" / "snp"
    case = shared / "tav-genoa-v3"
    if case.is_dir():
        certs = []
        for p in (case / "vcek.pem", shared / "roots/genoa/ark.pem", shared / "roots/genoa/ask.pem"):
            certs += load_certificates(p.read_bytes())
        return "real Genoa v3 (tav-genoa-v3)", (case / "report.bin").read_bytes(), VerifyOptions(certs=tuple(certs))
    from sim.platform import SimPlatform
    from verifier.trust import DEFAULT_TRUST_STORE
    p = SimPlatform("Genoa", "VCEK")
    return "simulated Genoa", p.sign_report(), VerifyOptions(
        trust_store=DEFAULT_TRUST_STORE.with_simulated_root(p.ark), certs=(p.leaf, p.intermediate, p.ark))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    label, raw, opts = setup()
    evidence = load_evidence(raw)
    verified = verify_report(evidence, opts)
    assert verified.accepted, "benchmark report must verify"
    key = verified.leaf.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    sig = encode_dss_signature(evidence.report.signature_r, evidence.report.signature_s)
    signed = raw[:0x2A0]
    algo = ec.ECDSA(hashes.SHA384())

    names = ["cryptography ECDSA P-384 verify (raw)", "verify_report(Evidence) chain cached",
             "verify_evidence(bytes): parse + verify"]
    measured = rates([lambda: key.verify(sig, signed, algo), lambda: verify_report(evidence, opts),
                      lambda: verify_evidence(raw, opts)], args.seconds)
    rows = list(zip(names, measured))
    raw_rate = measured[0]

    print(f"firmgate verify benchmark: {label}, ~{args.seconds:.0f} CPU s per row (interleaved), "
          f"Python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'what':<42} {'per CPU s':>12} {'vs raw':>8}")
    for name, r in rows:
        print(f"{name:<42} {r:>12,.0f} {r / raw_rate:>8.1%}")
    ok = rows[1][1] / raw_rate >= 0.85
    print(f"target verify_report >= 85% of raw: {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
