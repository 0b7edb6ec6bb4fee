"""Owner-bound release: what ID blocks and the binding rules cost.

Rows (calls per CPU-second, interleaved, this machine, this run):
- sign one ID block (ID key + author key, `verifier.idblock.sign`): `firmgate idblock sign` per table entry;
- verify one ID block (both signatures): what host-install and `idblock verify` do per block read;
- appraise a signed report without and with the [id_block] rules and the binding check
  (the broker's per-tenant cost; the target is that the rules cost under 5%).

Usage: python bench/idblock.py [--seconds S]. Uses the real OVMF in ../shared/firmware.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sim.owner import BOOT_CHAIN_REASON, Owner
from sim.platform import SimPlatform
from verifier.appraise.appraise import appraise
from verifier.appraise.policy import load_policy
from verifier.appraise.reference import ReferenceTable
from verifier.appraise.store import LoadedPolicy
from verifier.evidence import load_evidence
from verifier.idblock import IdBlock, sign, verify
from verifier.options import default_options
from verifier.verify import verify_report

FW = REPO.parent / "shared" / "firmware" / "edk2-2022.11-OVMF.fd"


def rates(fns: list[Callable[[], object]], seconds: float) -> list[float]:
    counts, spent = [0] * len(fns), [0.0] * len(fns)
    end = time.process_time() + seconds
    while time.process_time() < end:
        for i, fn in enumerate(fns):
            t0 = time.process_time()
            for _ in range(20):
                fn()
            spent[i] += time.process_time() - t0
            counts[i] += 20
    return [c / s for c, s in zip(counts, spent)]


def policy(d: Path, digest: str, bound: Owner | None) -> LoadedPolicy:
    text = (f'version = 1\n[firmware]\n[[firmware.allowed]]\nid = "v"\nsha384 = "{digest}"\nsvn = 1\n'
            f'bytes = "fw.fd"\n' + (f'enforces_boot_chain = "{BOOT_CHAIN_REASON}"\n' if bound else "") +
            '[[shapes]]\nvcpus = [1]\nvcpu_types = ["EPYC-v4"]\n[platform]\nallow_simulated_platform = true\n'
            + (bound.id_block_toml() + "require_id_block = true\nrequire_author_key = true\n" if bound else "")
            + '[[secrets]]\npath = "acme/key/a"\n' + ("" if bound else "unsafe_unbound = true\n"))
    sub = d / ("bound" if bound else "plain")
    sub.mkdir()
    (sub / "fw.fd").symlink_to(FW)
    (sub / "acme.toml").write_text(text)
    pol = load_policy(sub / "acme.toml")
    table = ReferenceTable(pol)
    table.load_files()
    return LoadedPolicy(pol, "0" * 40, False, table)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    owner, plat = Owner("bench"), SimPlatform("Milan")
    digest = hashlib.sha384(FW.read_bytes()).hexdigest()
    with tempfile.TemporaryDirectory() as td:
        plain, bound = policy(Path(td), digest, None), policy(Path(td), digest, owner)
        m = plain.table.entries()[0][0]
        block = IdBlock(m)
        raw, auth = sign(block, owner.id_key, owner.author_key)
        report = plat.sign_report(**owner.launch_fields(plat, m))
        verified = verify_report(load_evidence(report), default_options(trust_root=plat.ark,
                                                                         certs=(plat.leaf, plat.intermediate)))
        assert appraise(verified, bound).accepted
        r = rates([lambda: sign(block, owner.id_key, owner.author_key),
                   lambda: verify(raw, auth, author_key_enabled=True),
                   lambda: appraise(verified, plain), lambda: appraise(verified, bound)], args.seconds)
    print(f"{'operation':<52} {'per CPU-s':>10}")
    for name, v in zip(("sign one ID block (ID + author signatures)", "verify one ID block (2 ECDSA P-384 verifies)",
                        "appraise, no [id_block] rules (unsafe_unbound)", "appraise, [id_block] rules + binding"), r):
        print(f"{name:<52} {v:10.0f}")
    print(f"{'binding rules cost (appraise rate ratio)':<52} {r[3] / r[2]:10.1%}")


if __name__ == "__main__":
    main()
