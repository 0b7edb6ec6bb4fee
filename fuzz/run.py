"""atheris (libFuzzer) driver: `python -m fuzz.run TARGET [CORPUS_DIR] [libFuzzer flags]`.

The corpus directory is seeded with the target's seeds and its regression
inputs before the run. A crash leaves `crash-<sha1>` at -artifact_prefix (copy
it to fuzz/regressions/<target>/ once fixed). `-print_final_stats=1` prints the
execution count (stat::number_of_executed_units) that docs/security.md quotes.
"""
from __future__ import annotations

import hashlib
import sys
import warnings
from pathlib import Path


def main(argv: list[str]) -> None:
    import atheris  # the `fuzz` extra; tests fall back to hypothesis without it

    if len(argv) < 2 or argv[1].startswith("-"):
        raise SystemExit("usage: python -m fuzz.run TARGET [CORPUS_DIR] [libFuzzer flags]")
    name = argv[1]
    warnings.simplefilter("ignore")  # cryptography warns on odd certificates; not a crash
    with atheris.instrument_imports(include=["verifier", "broker", "host_install", "fuzz"]):
        from fuzz import targets
        import verifier.abi.certtable, verifier.abi.report, verifier.certs, verifier.evidence  # noqa: E401,F401
        import verifier.kds, verifier.firmware.addon, verifier.firmware.image  # noqa: E401,F401
        import verifier.appraise.policy  # noqa: F401
        if name == "igvm":
            import verifier.firmware.igvm, verifier.firmware.igvm_build, verifier.measure.igvm  # noqa: E401,F401
        if name == "channel":
            import host_install.channel  # noqa: F401
        if name == "broker":
            import broker, broker.kbs, broker.admin, broker.limits  # noqa: E401,F401
    if name not in targets.TARGETS:
        raise SystemExit(f"unknown target {name!r}; one of {', '.join(targets.TARGETS)}")
    target = targets.TARGETS[name]
    corpus = [a for a in argv[2:] if not a.startswith("-")]
    if corpus:
        d = Path(corpus[0])
        d.mkdir(parents=True, exist_ok=True)
        inputs = targets.cached_seeds(name) + [p.read_bytes() for p in targets.regressions(name)]
        for data in inputs:
            (d / ("seed-" + hashlib.sha1(data).hexdigest())).write_bytes(data)
    if name == "broker":
        targets._broker()  # build the app before the first input
    atheris.Setup([argv[0]] + argv[2:], target.run)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
