"""The newcomer's set-up: make deps, make test's throwaway PostgreSQL, the skip summary, missing ../shared."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _fake_path(tmp_path: Path, uid: int, with_apt: bool) -> tuple[dict[str, str], Path]:
    """A PATH with python3 and the shell tools but no qemu or git; `id` says uid; apt-get only records calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "ls", "cat", "env"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    (bin_dir / "python3").symlink_to(sys.executable)
    (bin_dir / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    calls = tmp_path / "apt-calls"
    if with_apt:
        (bin_dir / "apt-get").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    for f in bin_dir.iterdir():
        if not f.is_symlink():
            f.chmod(0o755)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    return env, calls


def test_deps_as_a_user_prints_the_exact_command_and_fails(tmp_path: Path) -> None:
    env, calls = _fake_path(tmp_path, 1000, with_apt=True)
    r = subprocess.run(["bash", str(REPO / "scripts" / "deps.sh")], env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1
    assert "sudo apt-get update && sudo apt-get install -y qemu-system-x86" in r.stderr
    assert " git" in r.stderr.splitlines()[1]
    assert not calls.exists()  # nothing was installed


def test_deps_as_root_installs_the_missing_packages(tmp_path: Path) -> None:
    env, calls = _fake_path(tmp_path, 0, with_apt=True)
    r = subprocess.run(["bash", str(REPO / "scripts" / "deps.sh")], env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    lines = calls.read_text().splitlines()
    assert lines[0] == "update -qq"
    assert lines[1].startswith("install -y -qq qemu-system-x86") and lines[1].endswith("git chromium chromium-driver binutils")


def test_deps_without_apt_names_what_is_missing(tmp_path: Path) -> None:
    env, _ = _fake_path(tmp_path, 0, with_apt=False)
    r = subprocess.run(["bash", str(REPO / "scripts" / "deps.sh")], env=env, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1
    assert "missing qemu-system-x86" in r.stderr and "FIRMGATE_SKIP_DEPS=1" in r.stderr


def test_deps_can_be_skipped(tmp_path: Path) -> None:
    env, calls = _fake_path(tmp_path, 0, with_apt=True)
    r = subprocess.run(["bash", str(REPO / "scripts" / "deps.sh")], env={**env, "FIRMGATE_SKIP_DEPS": "1"},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and not calls.exists()


def _pytest(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", *args],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_missing_shared_is_one_clear_message(tmp_path: Path) -> None:
    env = {**os.environ, "FIRMGATE_SHARED": str(tmp_path / "no-shared")}
    r = _pytest(["-q", "tests/test_cli_skeleton.py"], env, REPO)
    assert r.returncode == 4  # pytest's usage error: nothing ran
    out = r.stdout + r.stderr
    assert "test data directory is missing" in out and str(tmp_path / "no-shared" / "firmware") in out
    assert "FileNotFoundError" not in out and "Traceback" not in out
    assert len(out.strip().splitlines()) <= 2


def test_the_run_ends_with_one_line_on_what_was_skipped(tmp_path: Path) -> None:
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "@pytest.mark.skip(reason='no frobnicator here')\ndef test_a(): pass\n"
        "@pytest.mark.skip(reason='no frobnicator here')\ndef test_b(): pass\n"
        "def test_c(): pytest.skip('FIRMGATE_TEST_PG_URL not set')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "FIRMGATE_TEST_PG_SKIP": "no PostgreSQL server installed"}
    r = _pytest(["-q", "-p", "tests.conftest", "--rootdir", str(tmp_path), str(tmp_path)], env, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last == ("SKIPPED 3 tests: 2 x no frobnicator here; "
                    "1 x FIRMGATE_TEST_PG_URL not set (no PostgreSQL server installed)")
    assert "SKIPPED [" not in r.stdout  # no per-test skip listing (-ra)


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@pytest.mark.skipif(_pg_bin() is None, reason="no PostgreSQL server binaries (make deps installs them)")
def test_make_test_runs_its_own_postgres_and_removes_it() -> None:
    # Not tmp_path: as root the server runs as user postgres, which must reach its directory.
    tmp = Path(tempfile.mkdtemp(prefix="fg-setup-"))
    try:
        tmp.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if k != "FIRMGATE_TEST_PG_URL"}
        env["TMPDIR"] = str(tmp)
        probe = ("import os, sqlalchemy as sa; e = sa.create_engine(os.environ['FIRMGATE_TEST_PG_URL']); "
                 "print(e.connect().execute(sa.text('select 6*7')).scalar()); raise SystemExit(5)")
        r = subprocess.run([str(REPO / "scripts" / "with-test-postgres.sh"), sys.executable, "-c", probe],
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 5, r.stderr  # the command's own status
        assert r.stdout.splitlines()[-1] == "42"
        assert list(tmp.iterdir()) == []  # cluster stopped, its directory deleted
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
