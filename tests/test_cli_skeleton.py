import subprocess
import sys

from verifier.cli import main


def test_no_command_is_usage_error(capsys):
    try:
        rc = main([])
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
    assert "error" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "verifier.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "firmgate" in out.stdout
