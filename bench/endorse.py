"""What a publisher's endorsement costs an attestation, and what admitting one costs once.

Usage: python bench/endorse.py [--seconds S]. Uses the real 2 MiB OVMF build in ../shared/firmware
and a simulated Milan report. Prints a table:

- appraise, listed build / endorsed build: `appraise()` of a verified report whose firmware bytes are
  already measured (the per-attestation path). The difference is what an endorsement adds: the
  re-check of the admission under the policy in force (validity, revocation, publisher constraints).
- admit (cold): parsing the COSE_Sign1, the signature check and reading the CoRIM, once per build
  when its bytes and endorsement arrive (before measuring, which is not counted here), ES256 and ES384.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sim.platform import SimPlatform
from verifier.appraise.appraise import appraise
from verifier.appraise.store import load_for_cli
from verifier.endorse.admit import PublisherRule, admit
from verifier.endorse.corim import Endorsement, Provenance, new_id, sign_endorsement
from verifier.endorse.cose import key_id
from verifier.evidence import load_evidence
from verifier.measure.launch import Shape, measurement_table
from verifier.options import default_options
from verifier.verify import verify_report

SHARED = Path(os.environ.get("FIRMGATE_SHARED", REPO.parent / "shared"))
FIRMWARE = SHARED / "firmware" / "edk2-2022.11-OVMF.fd"
SHAPE = Shape(vcpus=1, vcpu_type="EPYC-v4")


def per_call(fn: Callable[[], object], seconds: float) -> tuple[float, int]:
    fn()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return (time.perf_counter() - start) / n, n


def _endorsement(key: ec.EllipticCurvePrivateKey, digest: str) -> bytes:
    now = int(time.time())
    return sign_endorsement(Endorsement(new_id(), "edk2-2022.11-acme.1", digest, 2, "acme", now - 60, now + 86400,
                                        Provenance("https://example.com/edk2.git", "0123abcd", "make")), key)


def _policy(d: Path, digest: str, listed: bool, key: ec.EllipticCurvePrivateKey) -> Path:
    (d / "acme.pem").write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                               serialization.PublicFormat.SubjectPublicKeyInfo))
    fw = (f'[[firmware.allowed]]\nid = "fw"\nsha384 = "{digest}"\nsvn = 2\nbytes = "uploaded"\n' if listed else
          '[[firmware.publishers]]\nname = "acme"\nkey = "acme.pem"\nfwid = "edk2-*-acme.*"\nmin_svn = 2\n')
    p = d / "acme.toml"
    p.write_text(f'version = 1\n[firmware]\n{fw}\n[[shapes]]\nvcpus = [1]\nvcpu_types = ["EPYC-v4"]\n'
                 '[platform]\nallow_simulated_platform = true\n')
    return p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per row (default 2)")
    args = ap.parse_args()
    image = FIRMWARE.read_bytes()
    digest = hashlib.sha384(image).hexdigest()
    m = measurement_table(image, [SHAPE])[SHAPE]
    platform = SimPlatform("Milan", "VCEK")
    report = platform.sign_report(measurement=m)
    verified = verify_report(load_evidence(report), default_options(trust_root=platform.ark,
                                                                    certs=(platform.leaf, platform.intermediate)))
    key = ec.generate_private_key(ec.SECP384R1())
    rows: list[tuple[str, float, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for listed in (True, False):
            d = Path(tmp) / ("listed" if listed else "endorsed")
            d.mkdir()
            loaded = load_for_cli(_policy(d, digest, listed, key))
            if listed:
                loaded.add_firmware_bytes(image)
            else:
                loaded.table.add_endorsed(image, (_endorsement(key, digest),))
            v = appraise(verified, loaded)
            assert v.accepted, [c.message for c in v.checks if c.outcome.value == "fail"]
            t, n = per_call(functools.partial(appraise, verified, loaded), args.seconds)
            rows.append((f"appraise, {'listed' if listed else 'endorsed'} build (bytes measured)", t, n))
    for curve, alg in ((ec.SECP256R1(), "ES256"), (ec.SECP384R1(), "ES384")):
        k = ec.generate_private_key(curve)
        raw = _endorsement(k, digest)
        rule = PublisherRule("acme", key_id(k.public_key()).hex(), key=k.public_key())
        t, n = per_call(functools.partial(admit, [rule], raw, digest), args.seconds)
        rows.append((f"admit (cold, once per build): {alg}, {len(raw)} bytes", t, n))
    print(f"{'operation':58} {'per call':>12} {'calls':>8}")
    for name, t, n in rows:
        print(f"{name:58} {t * 1e3:9.3f} ms {n:8d}")
    added = rows[1][1] - rows[0][1]
    print(f"{'added per attestation by an endorsement':58} {added * 1e3:9.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
