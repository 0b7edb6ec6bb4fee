"""Hostile or odd policy text: parse_policy never raises, always answers with the policy or file:line errors."""
from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from verifier.appraise.lines import LineIndex
from verifier.appraise.policy import parse_policy

from test_policy_format import GOOD

PATH = Path("/nonexistent/acme.toml")   # firmware files are not read (all "uploaded")
LINES = GOOD.splitlines()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_random_bytes_never_raise(data: bytes) -> None:
    policy, errors = parse_policy(data, PATH)
    assert (policy is None) == bool(errors)
    assert all(e.path == str(PATH) for e in errors)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(LINES) - 1),
                          st.sampled_from(["", "x = 1", "[x]", "[[firmware.allowed]]", '"a" = "b"', "= 1",
                                           "vcpus = []", "min_svn = -1", "svn = 99999999999", 'id = ""',
                                           "products = [1]", "kernel = 3", '"""', "[platform.min_tcb.Turin]",
                                           "fmc = 300", "revoked = [[]]", "path = 'acme/a/b'"])),
                max_size=4))
def test_mutated_good_policy_never_raises_and_errors_have_lines(edits: list[tuple[int, str]]) -> None:
    lines = list(LINES)
    for i, text in edits:
        lines[i] = text
    src = "\n".join(lines) + "\n"
    policy, errors = parse_policy(src, PATH)
    assert (policy is None) == bool(errors)
    for e in errors:
        assert e.line is not None and 1 <= e.line <= len(lines) + 1, e.diagnostics()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_line_index_never_raises(src: str) -> None:
    idx = LineIndex(src)
    for path in idx.paths():
        line = idx.line(path)
        assert line is not None and 1 <= line <= src.count("\n") + 1


def test_unicode_line_separators_inside_strings_do_not_shift_lines() -> None:
    src = 'description = "a\u2028b\x85c"\r\n[guest]\r\nmin_abi = 3\n'
    _, errors = parse_policy(src, PATH)
    field = {e.field: e.line for e in errors}
    assert field["guest.min_abi"] == 3
    assert LineIndex("a = \"x\u2028y\"\nb = 1\n").line(("b",)) == 2
