"""Bounded fuzzing of every hostile-input parser (fuzz/targets.py), inside `make test`.

Per target: the seeds and every kept regression input pass; then a short
coverage-guided atheris run (a subprocess: libFuzzer owns its process) when
atheris is installed, else a hypothesis run of random and mutated inputs. About
a minute in all; `make fuzz` runs the same harnesses for longer. A crash is a
bug: the failing input is printed and left in the artifact directory.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.targets import TARGETS, cached_seeds, regressions

REPO = Path(__file__).resolve().parent.parent
# FIRMGATE_FUZZ_ENGINE=hypothesis forces the fallback (what a machine without atheris runs).
HAVE_ATHERIS = (importlib.util.find_spec("atheris") is not None
                and os.environ.get("FIRMGATE_FUZZ_ENGINE", "atheris") != "hypothesis")
# Seconds of fuzzing per target in `make test` (11 targets, about a minute in all).
SECONDS = int(os.environ.get("FIRMGATE_FUZZ_SECONDS", "4"))
NAMES = sorted(TARGETS)

# Open bugs found by fuzzing: {"<target>/<regression file>": reason} for inputs that still crash,
# until the module is fixed (then the entry goes and the input keeps guarding the fix).
# None open: BUG-1, 8, 9, 11, 14, 16 (see docs/security.md) are fixed.
OPEN_BUGS: dict[str, str] = {}


def _run(name: str, data: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cryptography's warnings about odd certificates are not crashes
        TARGETS[name].run(data)


@pytest.mark.parametrize("name", NAMES)
def test_seeds_parse_without_crash(name: str) -> None:
    seeds = TARGETS[name].seeds()
    assert seeds, f"target {name} has no seeds"
    for data in seeds:
        _run(name, data)


_REGRESSION_CASES = [pytest.param(name, path, id=f"{name}/{path.name}",
                                  marks=[pytest.mark.xfail(reason=OPEN_BUGS[f"{name}/{path.name}"], strict=True)]
                                  if f"{name}/{path.name}" in OPEN_BUGS else [])
                     for name in NAMES for path in regressions(name)]


@pytest.mark.parametrize("name,path", _REGRESSION_CASES)
def test_regression_input(name: str, path: Path) -> None:
    """Every input that once crashed a parser now fails closed (or parses)."""
    _run(name, path.read_bytes())


def test_every_regression_dir_names_a_target() -> None:
    d = REPO / "fuzz" / "regressions"
    assert {p.name for p in d.iterdir() if p.is_dir()} <= set(TARGETS)


def _atheris(name: str, tmp: Path) -> tuple[int, str]:
    cached_seeds(name)  # built here once, so the subprocess spends its time fuzzing
    cmd = [sys.executable, "-m", "fuzz.run", name, str(tmp / "corpus"), f"-max_total_time={SECONDS}",
           "-print_final_stats=1", "-max_len=65536", "-timeout=10", f"-artifact_prefix={tmp}/", "-rss_limit_mb=2048"]
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=SECONDS + 120)
    return proc.returncode, proc.stdout + proc.stderr


# Targets whose open bug a short run may hit again (not strict: a run may also miss it).
OPEN_TARGETS: dict[str, str] = {}


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_ATHERIS, reason="atheris not installed (pip install '.[fuzz]'); hypothesis run instead")
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.xfail(reason=OPEN_TARGETS[n], strict=False)]
                                               if n in OPEN_TARGETS else []) for n in NAMES])
def test_atheris_bounded(name: str, tmp_path: Path) -> None:
    rc, out = _atheris(name, tmp_path)
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", out)
    assert rc == 0 and not crashes, f"atheris found a crash in {name} ({crashes}):\n{out[-4000:]}"
    assert m is not None and int(m[1]) > 0, f"no executions reported:\n{out[-2000:]}"


def _mutations(name: str) -> st.SearchStrategy[bytes]:
    seeds = cached_seeds(name)

    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        buf = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(1, 8))):
            if not buf:
                break
            i = draw(st.integers(0, len(buf) - 1))
            op = draw(st.integers(0, 3))
            if op == 0:
                buf[i] = draw(st.integers(0, 255))
            elif op == 1:
                del buf[i:i + draw(st.integers(1, 64))]
            elif op == 2:
                buf[i:i] = draw(st.binary(min_size=1, max_size=16))
            else:
                buf = buf[:i]
        return bytes(buf)
    return st.one_of(st.binary(max_size=2048), mutated())


@pytest.mark.slow
@pytest.mark.skipif(HAVE_ATHERIS, reason="atheris installed: the coverage-guided run covers this target")
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.xfail(reason=OPEN_TARGETS[n], strict=False)]
                                               if n in OPEN_TARGETS else []) for n in NAMES])
def test_hypothesis_bounded(name: str) -> None:
    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_mutations(name))
    def prop(data: bytes) -> None:
        _run(name, data)
    prop()
