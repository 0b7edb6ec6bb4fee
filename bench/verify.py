"""Reports verified per second (chain validated once per leaf, then cached) next to the raw
ECDSA P-384 verify rate of `cryptography`, same machine, same run.

Usage: python bench/verify.py [--seconds S]. Uses the real Genoa report and chain in ../shared
when present, else a simulated one. Prints a table; the targets are verify_report >= 85% of
the raw rate, verify_report followed by every rule of a policy's [report] section (all
enabled: go-sev-guest validate.Options parity) >= 85%, and the broker's per-handshake path
(Trustee SnpEvidence JSON with ARK, ASK and VCEK as byte arrays -> evidence_from_json ->
verify_report) >= 70%.

The Trustee row cycles through many separately built JSON objects (new lists, new ints: what
json.loads hands the broker on each request), so that nothing keyed on object identity of
the input can help it; the chain bytes are the same in each, as they are from one chip.
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

from verifier.abi.flags import PLATFORM_INFO
from verifier.appraise.report_rules import BitRules, ReportRules, run_report_rules
from verifier.certs import load_certificates  # noqa: E402
from verifier.evidence import evidence_from_json, load_evidence, snp_evidence_json  # noqa: E402
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


JSON_COPIES = 64   # distinct Trustee JSON objects the Trustee row cycles through


def setup() -> tuple[str, bytes, VerifyOptions, list[tuple[str, bytes]]]:
    """(label, raw report, options with the chain, the chain as (cert_type, DER) for Trustee JSON)."""
    from cryptography.hazmat.primitives.serialization import Encoding
    shared = REPO.parent / "shared" / "vectors" / "snp"
    case = shared / "tav-genoa-v3"
    if case.is_dir():
        certs = []
        for p in (case / "vcek.pem", shared / "roots/genoa/ark.pem", shared / "roots/genoa/ask.pem"):
            certs += load_certificates(p.read_bytes())
        chain = [(kind, c.public_bytes(Encoding.DER)) for kind, c in zip(("VCEK", "ARK", "ASK"), certs)]
        return ("real Genoa v3 (tav-genoa-v3)", (case / "report.bin").read_bytes(), VerifyOptions(certs=tuple(certs)),
                [chain[1], chain[2], chain[0]])
    from sim.platform import SimPlatform
    from verifier.trust import DEFAULT_TRUST_STORE
    p = SimPlatform("Genoa", "VCEK")
    chain = [("ARK", p.ark.public_bytes(Encoding.DER)), ("ASK", p.intermediate.public_bytes(Encoding.DER)),
             ("VCEK", p.leaf.public_bytes(Encoding.DER))]
    return "simulated Genoa", p.sign_report(), VerifyOptions(
        trust_store=DEFAULT_TRUST_STORE.with_simulated_root(p.ark), certs=(p.leaf, p.intermediate, p.ark)), chain


def every_report_rule(report: object) -> ReportRules:
    """A [report] section with every rule enabled, each set to what this report holds (so all pass,
    except the mitigation rule on a report below version 5, which has no vectors and fails)."""
    from verifier.abi.report import AttestationReport
    assert isinstance(report, AttestationReport)
    cur, com = report.current_build, report.committed_build
    return ReportRules(
        family_ids=(b"\xee" * 16, report.family_id), image_ids=(report.image_id,), migration_agent=report.report_id_ma,
        chip_ids=(bytes(64), report.chip_id), min_current_firmware=(cur.major, cur.minor, cur.build),
        min_committed_firmware=(com.major, com.minor, com.build),
        platform_info=BitRules(required=PLATFORM_INFO.set_names(report.platform_info.raw), forbidden=("tio_en",),
                               forbid_unknown=True),
        guest_policy=BitRules(forbidden=("cxl_allow", "page_swap_disable"), forbid_unknown=True),
        key_info=BitRules(forbidden=("mask_chip_key",), forbid_unknown=True),
        mitigations_current=(0,), mitigations_launch=(0,))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    label, raw, opts, chain = setup()
    evidence = load_evidence(raw)
    verified = verify_report(evidence, opts)
    assert verified.accepted, "benchmark report must verify"
    key = verified.leaf.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    sig = encode_dss_signature(evidence.report.signature_r, evidence.report.signature_s)
    signed = raw[:0x2A0]
    algo = ec.ECDSA(hashes.SHA384())

    # The broker's options carry no certificates: the chain comes in the evidence's cert_chain.
    json_opts = VerifyOptions(trust_store=opts.trust_store)
    copies = [snp_evidence_json(raw, chain) for _ in range(JSON_COPIES)]
    assert verify_report(evidence_from_json(copies[0]), json_opts).accepted, "Trustee JSON must verify"
    turn = iter(range(1 << 62))

    def trustee() -> object:
        return verify_report(evidence_from_json(copies[next(turn) % JSON_COPIES]), json_opts)

    rules = every_report_rule(evidence.report)
    ran = run_report_rules(verified.report, rules)
    assert all(c.outcome.value != "skip" for c in ran), "every [report] rule must be enabled"

    def with_rules() -> object:
        return run_report_rules(verify_report(evidence, opts).report, rules)

    names = ["cryptography ECDSA P-384 verify (raw)", "verify_report(Evidence) chain cached",
             "verify_report + every [report] policy rule",
             "verify_evidence(bytes): parse + verify",
             "verify from Trustee JSON (fresh report, same chain): parse + verify"]
    measured = rates([lambda: key.verify(sig, signed, algo), lambda: verify_report(evidence, opts), with_rules,
                      lambda: verify_evidence(raw, opts), trustee], args.seconds)
    rows = list(zip(names, measured))
    raw_rate = measured[0]

    print(f"firmgate verify benchmark: {label}, ~{args.seconds:.0f} CPU s per row (interleaved), "
          f"Python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f}")
    width = max(len(n) for n in names)
    print(f"{'what':<{width}} {'per CPU s':>12} {'vs raw':>8}")
    for name, r in rows:
        print(f"{name:<{width}} {r:>12,.0f} {r / raw_rate:>8.1%}")
    ok = rows[1][1] / raw_rate >= 0.85
    print(f"target verify_report >= 85% of raw: {'met' if ok else 'NOT met'}")
    ok = rows[2][1] / raw_rate >= 0.85
    print(f"target verify_report + every [report] rule >= 85% of raw: {'met' if ok else 'NOT met'}")
    ok = rows[4][1] / raw_rate >= 0.70
    print(f"target verify from Trustee JSON >= 70% of raw: {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
