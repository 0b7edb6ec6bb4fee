"""The shipped systemd units run the commands this package installs, with settings the broker knows."""
from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from broker.config import ENV

UNITS = Path(__file__).resolve().parent.parent / "contrib" / "systemd"


def _unit(name: str) -> configparser.RawConfigParser:
    p = configparser.RawConfigParser(strict=False, interpolation=None)
    p.optionxform = str  # type: ignore[assignment,method-assign]
    p.read_string((UNITS / name).read_text())
    return p


def test_broker_unit_runs_gunicorn_on_the_app_factory_with_the_key_as_a_credential() -> None:
    u = _unit("firmgate-broker.service")
    assert u["Service"]["ExecStart"].endswith("'broker:create_app()'")
    assert "--bind 127.0.0.1:" in u["Service"]["ExecStart"]  # TLS terminates in front of it
    assert u["Service"]["User"] == "firmgate" and u["Service"]["NoNewPrivileges"] == "yes"
    assert u["Service"]["LoadCredential"] == "master.key:/etc/firmgate/master.key"
    assert u["Service"]["Environment"] == "FIRMGATE_MASTER_KEY_FILE=%d/master.key"


def test_broker_env_example_sets_only_known_settings() -> None:
    keys = [line.split("=", 1)[0] for line in (UNITS / "broker.env.example").read_text().splitlines()
            if line and not line.startswith("#")]
    assert keys and set(keys) <= set(ENV), set(keys) - set(ENV)
    assert "FIRMGATE_TRUST_ROOT" not in keys  # a simulated root has no place on a production broker
    assert "FIRMGATE_MASTER_KEY" not in keys  # the key is a credential file, not an environment variable


def test_listen_unit_serves_the_escaped_vm_directory_and_leaves_qemu_running() -> None:
    u = _unit("host-install-listen@.service")
    assert re.fullmatch(r"\S+/host-install listen --vm /%I", u["Service"]["ExecStart"])
    assert u["Service"]["KillMode"] == "process"  # the daemonized QEMU outlives a listener restart
    assert u["Service"]["ReadWritePaths"] == "/%I" and u["Service"]["ProtectSystem"] == "strict"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("name", ["firmgate-broker.service", "host-install-listen@.service"])
def test_systemd_accepts_the_units(tmp_path: Path, name: str) -> None:
    unit = tmp_path / name.replace("@.", "@srv-vms-a.")
    unit.write_text((UNITS / name).read_text())
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                       timeout=60)
    complaints = [ln for ln in (r.stdout + r.stderr).splitlines()
                  if ln.strip() and "is not executable" not in ln]  # /opt/firmgate is not installed here
    assert complaints == []
