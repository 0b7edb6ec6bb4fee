"""Property tests: hostile report files make `firmgate verify`/`report show` exit 2 with one clean line."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from verifier.cli import build_parser, run

PARSER = build_parser()   # built once: entry-point loading would dominate the run time


def main(argv: list[str]) -> int:
    """Like verifier.cli.main, minus logging setup: parse, then run under the one error contract."""
    args = PARSER.parse_args(argv)
    return run(args.func, args)
from verifier.errors import EvidenceError
from verifier.evidence import evidence_from_json

from conftest import SNP_VECTORS

REAL = (SNP_VECTORS / "tav-genoa-v3" / "report.bin").read_bytes() if SNP_VECTORS.is_dir() else b""
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _run(data: bytes, *cmd: str) -> tuple[int, str]:
    import contextlib
    import io
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "report"
        path.write_bytes(data)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main([*cmd, str(path), "--offline"] if cmd[0] == "verify" else [*cmd, str(path)])
        return code, err.getvalue()


def _clean(err: str) -> bool:
    return err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


@SETTINGS
@given(n=st.integers(min_value=0, max_value=len(REAL) - 1))
def test_truncated(n: int) -> None:
    code, err = _run(REAL[:n], "verify")
    assert code == 2 and _clean(err)


@SETTINGS
@given(extra=st.binary(min_size=1, max_size=4096))
def test_oversized(extra: bytes) -> None:
    code, err = _run(REAL + extra, "verify")
    assert code == 2 and _clean(err)


@SETTINGS
@given(data=st.binary(max_size=3000).filter(lambda b: b.lstrip()[:1] != b"{"))
def test_random_bytes(data: bytes) -> None:
    for cmd in (("verify",), ("report", "show")):
        code, err = _run(data, *cmd)
        assert code == 2 and _clean(err)


@SETTINGS
@given(data=st.binary(min_size=1184, max_size=1184).filter(lambda b: b[:1] != b"{"))
def test_random_1184_bytes(data: bytes) -> None:
    code, err = _run(data, "verify")
    assert code == 2 and _clean(err)


@SETTINGS
@given(version=st.integers(min_value=0, max_value=2**32 - 1).filter(lambda v: not 2 <= v <= 5))
@example(version=0x7B)          # first byte '{': still a raw report, not JSON
@example(version=0x7B20)        # ' {'
def test_wrong_version(version: int) -> None:
    code, err = _run(version.to_bytes(4, "little") + REAL[4:], "verify")
    assert code == 2 and _clean(err) and "VERSION" in err


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                                       max_size=5), max_leaves=20)
shaped = st.fixed_dictionaries({}, optional={"attestation_report": json_values, "cert_chain": json_values,
                                             "report": json_values, "cert_table": json_values,
                                             "outblob": json_values, "auxblob": json_values})


@SETTINGS
@given(obj=st.one_of(json_values, shaped))
def test_random_json_is_refused_cleanly(obj: object) -> None:
    with pytest.raises(EvidenceError):
        evidence_from_json(obj)
    code, err = _run(json.dumps(obj).encode(), "verify")
    assert code == 2 and _clean(err)


@SETTINGS
@given(key=st.sampled_from(["version", "policy", "vmpl", "report_data", "current_tcb", "signature", "chip_id"]),
       value=json_values)
def test_mutated_trustee_json_never_crashes(key: str, value: object) -> None:
    from conftest import KBS_VECTORS
    doc = json.loads((KBS_VECTORS / "trustee-e2e-snp-evidence.json").read_text())
    doc["attestation_report"][key] = value
    code, err = _run(json.dumps(doc).encode(), "verify")
    assert code in (1, 2, 3) and "Traceback" not in err
