"""Run every fuzz target for a while and print the figures: `python -m fuzz.all [--seconds N] [TARGET...]`.

Each target runs in its own atheris process (fuzz.run) on a corpus kept under
fuzz/corpus/<target>/ (grown from run to run, not in git). A crash stops that
target and leaves its input in fuzz/corpus/crashes/; fix the bug, then copy the
input to fuzz/regressions/<target>/ so `make test` replays it forever.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def main() -> int:
    from fuzz.targets import TARGETS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS", "120")))
    ap.add_argument("targets", nargs="*", default=list(TARGETS))
    args = ap.parse_args()
    crashes = HERE / "corpus" / "crashes"
    crashes.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    rows, failed = [], 0
    for name in args.targets:
        before = set(crashes.iterdir())
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "fuzz.run", name, str(HERE / "corpus" / name),
                               f"-max_total_time={args.seconds}", "-print_final_stats=1", "-max_len=65536", "-timeout=10",
                               "-rss_limit_mb=4096", f"-artifact_prefix={crashes}/{name}-"],
                              cwd=REPO, env=env, capture_output=True, text=True)
        out = proc.stdout + proc.stderr
        m = re.search(r"stat::number_of_executed_units:\s*(\d+)", out)
        cov = re.findall(r"cov: (\d+)", out)
        new = sorted(p.name for p in set(crashes.iterdir()) - before)
        failed += int(proc.returncode != 0 or bool(new))
        rows.append((name, int(m[1]) if m else 0, int(cov[-1]) if cov else 0, time.monotonic() - t0,
                     ", ".join(new) or ("-" if proc.returncode == 0 else f"exit {proc.returncode}")))
        if proc.returncode != 0:
            print(out[-3000:], file=sys.stderr)
    print(f"{'target':<10} {'executions':>11} {'coverage':>9} {'seconds':>8}  crashes")
    for name, execs, cov, secs, crash in rows:
        print(f"{name:<10} {execs:>11,} {cov:>9} {secs:>8.0f}  {crash}")
    print(f"{'total':<10} {sum(r[1] for r in rows):>11,}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
