"""The rough edges a newcomer's trial found in `firmgate` and `host-install`: help grouped by role and in
step with the README, -v never changes an exit code, a closed pipe is not a traceback, `firmgate serve`
binds before it talks, and the secret commands answer alike."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SNP_VECTORS

from verifier import cli

REPO = Path(__file__).resolve().parent.parent
EXE = Path(sys.executable).parent


def _run(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EXE / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=60,
                          **kw)  # type: ignore[call-overload]


def _commands() -> list[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    return list(sub.choices)  # type: ignore[arg-type]


def test_help_lists_every_command_once_grouped_by_role() -> None:
    text = cli.build_parser().format_help()
    titles = [title for title, _ in cli.ROLES]
    positions = [text.index(f"\n  {t}\n") for t in titles]
    assert positions == sorted(positions)
    for cmd in _commands():
        assert len(re.findall(rf"^    {re.escape(cmd)} ", text, re.M)) == 1, cmd
    assert "other" not in text  # every command has a role
    assert text.index("    verify ") < text.index("    serve ") < text.index("    host-install ")


def test_readme_names_only_commands_that_exist() -> None:
    text = (REPO / "README.md").read_text()
    code = "\n".join(re.findall(r"```.*?```", text, re.S) + re.findall(r"`[^`\n]+`", text))
    readme = text
    named = set(re.findall(r"\bfirmgate ([a-z][a-z-]+)", code))
    assert named, "the README shows firmgate commands"
    assert named <= set(_commands()), named - set(_commands())
    assert "firmgate serve" in readme
    for sub in re.findall(r"(?:^|`)host-install ([a-z]+)", code, re.M):  # commands, not prose
        assert sub in {"install", "status", "rollback", "recover", "listen", "init"}, sub


@pytest.mark.parametrize("argv", [
    ["firmgate", "verify", "EMPTY"],
    ["firmgate", "measure", "/nonexistent"],
    ["host-install", "status", "--vm", "/nonexistent"],
])
def test_verbose_shows_the_traceback_but_keeps_the_exit_code(tmp_path: Path, argv: list[str]) -> None:
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    argv = [str(empty) if a == "EMPTY" else a for a in argv]
    quiet = _run(*argv)
    loud = _run(argv[0], "-v", *argv[1:])
    assert quiet.returncode == loud.returncode == 2
    assert "Traceback" not in quiet.stderr and "Traceback" in loud.stderr
    assert quiet.stderr.strip().splitlines()[-1] == loud.stderr.strip().splitlines()[-1]


def test_a_closed_pipe_ends_quietly() -> None:
    report = SNP_VECTORS / "virtee-milan-v2" / "report.bin"
    for _ in range(3):  # the race `| head` loses sometimes: here the reader is gone before any write
        r, w = os.pipe()
        os.close(r)
        try:
            proc = subprocess.run([str(EXE / "firmgate"), "report", "show", str(report)], stdout=w,
                                  stderr=subprocess.PIPE, text=True, timeout=60)
        finally:
            os.close(w)
        assert proc.returncode == cli.EXIT_BROKEN_PIPE
        assert proc.stderr == ""


def _serve(tmp_path: Path, port: int) -> subprocess.Popen[str]:
    env = {**os.environ, "FIRMGATE_MASTER_KEY": "00" * 32}
    return subprocess.Popen([str(EXE / "firmgate"), "serve", "--port", str(port), "--policies",
                             str(REPO / "policies"), "--db", f"sqlite:///{tmp_path / 'b.db'}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)


def test_serve_refuses_a_busy_port_in_one_line_and_before_any_banner(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _serve(tmp_path, port)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip().splitlines() == [f"error: cannot listen on 127.0.0.1:{port}: "
                                        "Address already in use"]
    assert not (tmp_path / "b.db").exists()  # nothing was created for a broker that could not listen


def test_serve_prints_its_banner_once_listening_and_logs_without_colour(tmp_path: Path) -> None:
    import urllib.request

    proc = _serve(tmp_path, 0)
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        banner = ""
        while "firmgate serve: key broker on" not in banner and time.monotonic() < deadline:
            banner = proc.stderr.readline()
        m = re.search(r"on http://127\.0\.0\.1:(\d+) ", banner)
        assert m and int(m[1]) > 0, banner
        with urllib.request.urlopen(f"http://127.0.0.1:{m[1]}/nope", timeout=10) as resp:  # noqa: S310
            pytest.fail(f"expected 404, got {resp.status}")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    access = [ln for ln in err.splitlines() if "GET /nope" in ln]
    assert access and "\x1b" not in err  # a 404 is yellow on a terminal; not in a redirected log


def test_secret_commands_share_one_size_limit_and_one_unknown_tenant_answer(tmp_path: Path) -> None:
    env = {**os.environ, "FIRMGATE_MASTER_KEY": "11" * 32, "FIRMGATE_DB": f"sqlite:///{tmp_path / 'b.db'}"}
    assert _run("firmgate", "tenant", "add", "acme", env=env).returncode == 0
    big = tmp_path / "big"
    big.write_bytes(b"x" * (1024 * 1024 + 1))
    r = _run("firmgate", "secret", "put", "acme/key/big", "--file", str(big), env=env)
    assert r.returncode == 2 and "at most 1048576" in r.stderr
    just = tmp_path / "just"
    just.write_bytes(b"x" * (1024 * 1024))
    assert _run("firmgate", "secret", "put", "acme/key/ok", "--file", str(just), env=env).returncode == 0
    put = _run("firmgate", "secret", "put", "nobody/key/x", "--value", "v", env=env)
    listed = _run("firmgate", "secret", "list", "nobody", env=env)
    assert put.returncode == listed.returncode == 2
    assert put.stderr == listed.stderr == "error: no tenant nobody: run `firmgate tenant add nobody` first\n"


def test_readme_vm_toml_example_parses_and_its_cpu_model_exists() -> None:
    import shutil

    from host_install.vm import parse_config

    blocks = re.findall(r"```toml\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert len(blocks) == 1
    cfg = parse_config(blocks[0], "README.md")
    assert cfg.snp and cfg.cpu
    qemu = shutil.which(cfg.qemu)
    if qemu is None:
        pytest.skip(f"{cfg.qemu} is not installed")
    models = subprocess.run([qemu, "-cpu", "help"], capture_output=True, text=True, timeout=60).stdout
    assert re.search(rf"^x86 {re.escape(cfg.cpu)}\s", models, re.M), f"this QEMU has no CPU model {cfg.cpu}"
