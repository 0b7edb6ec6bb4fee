"""Hostile evidence reaching the broker fails closed (401), never a 500; the CLI says one line, exit 2.

The inputs are the regression files under fuzz/regressions/ that crashed a
parser, travelling inside an otherwise well-formed, correctly bound KBS
attestation the way a malicious host or guest would send them; and random
structural damage (hypothesis) to such an attestation, with the nonce and
REPORT_DATA left right so that parsing and verification really run.
"""
from __future__ import annotations

import copy
import json
import os
import secrets
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_broker_support import KBS_ERR, guest_report_data, new_tee_key

from broker import create_app

REGRESSIONS = Path(__file__).resolve().parent.parent / "fuzz" / "regressions"


@pytest.fixture(scope="module")
def sim() -> Any:
    from sim.platform import SimPlatform
    return SimPlatform("Milan")


@pytest.fixture
def client(tmp_path: Path, sim: Any) -> Any:
    (tmp_path / "policies").mkdir()
    (tmp_path / "root.pem").write_bytes(sim.root_pem())
    app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'b.db'}", "MASTER_KEY": secrets.token_bytes(32),
                      "POLICIES_DIR": str(tmp_path / "policies"), "TRUST_ROOT_PEM": str(tmp_path / "root.pem")})
    yield app.test_client()
    app.extensions["firmgate"].engine.dispose()


def _attest_with_leaf(client: Any, sim: Any, leaf_der: bytes) -> Any:
    r = client.post("/kbs/v0/auth", json={"version": "0.4.0", "tee": "snp"})
    assert r.status_code == 200
    nonce = r.get_json()["nonce"]
    _key, jwk = new_tee_key()
    report = sim.sign_report(report_data=guest_report_data(nonce, jwk))
    ev = sim.trustee_json(report, include=("ARK", "ASK", "LEAF"))
    ev["cert_chain"] = [c if c["cert_type"] != "VCEK" else {"cert_type": "VCEK", "data": list(leaf_der)}
                        for c in ev["cert_chain"]]
    body = {"init-data": None, "runtime-data": {"nonce": nonce, "tee-pubkey": jwk},
            "tee-evidence": {"primary_evidence": ev, "additional_evidence": ""}}
    return client.post("/kbs/v0/attest", data=json.dumps(body), content_type="application/json")


def test_control_good_leaf_is_accepted_by_the_verifier(client: Any, sim: Any) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding
    r = _attest_with_leaf(client, sim, sim.leaf.public_bytes(Encoding.DER))
    assert r.status_code == 200, r.get_json()  # no tenant policy: a contraindicated token, but verified


# Open until the verifier is fixed (BUG-1 in docs/security.md): strict, so the fix shows up here.
OPEN: dict[str, str] = {}  # BUG-1 (duplicate-extension.der) fixed in 1bb9cc4


@pytest.mark.parametrize("path", [pytest.param(p, id=p.name, marks=[pytest.mark.xfail(reason=OPEN[p.name], strict=True)]
                                               if p.name in OPEN else [])
                                  for p in sorted((REGRESSIONS / "cert").glob("*"))])
def test_crashing_certificate_inside_evidence_is_a_401(client: Any, sim: Any, path: Path) -> None:
    r = _attest_with_leaf(client, sim, path.read_bytes())
    assert r.status_code == 401, (r.status_code, r.get_json())
    assert r.get_json()["type"] == KBS_ERR + "AttestationError"
    assert r.get_json()["detail"].startswith("evidence rejected"), r.get_json()


@pytest.mark.parametrize("name", [
    pytest.param("invalid-version.der"),
    pytest.param("bad-issuer-name.der"),
])
def test_cli_verify_with_malformed_certificate_is_exit_2(tmp_path: Path, sim: Any, name: str) -> None:
    """The CLI, like the broker, answers a malformed certificate with one `error:` line and exit 2."""
    import subprocess
    import sys
    report = tmp_path / "report.bin"
    report.write_bytes(sim.sign_report(report_data=b"\0" * 64))
    certs = tmp_path / "vcek.der"
    certs.write_bytes((REGRESSIONS / "cert" / name).read_bytes())
    root = tmp_path / "root.pem"
    root.write_bytes(sim.root_pem())
    proc = subprocess.run([sys.executable, "-m", "verifier.cli", "verify", str(report), "--certs", str(certs),
                           "--trust-root", str(root)],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-500:])
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error:"), proc.stderr[-500:]


# -- structure-aware: a correctly bound attestation with one to three JSON nodes replaced --------
_ODD = [None, True, False, 0, -1, 2**64, 2**70, -2**63, 1.5, 1e308, "", "x" * 300, "00" * 40, [], {},
        [0] * 100, [255] * 72, [256], [-1], ["a"], {"a": 1}, "AAAA", 2, 3, 4, 5, 6]


# Nodes whose damage is a known open bug (pinned by its own strict xfail test below); kept out of the
# property so that it keeps looking for new ones.
OPEN_PATHS: set[tuple[str, str]] = set()  # BUG-10 fixed


def _paths(obj: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, path + (k,))
    elif isinstance(obj, list) and len(obj) < 80:  # byte arrays are leaves: one value stands for all
        for i, v in enumerate(obj):
            out += _paths(v, path + (i,))
    return out


@pytest.mark.slow
@settings(max_examples=int(os.environ.get("FIRMGATE_ATTEST_EXAMPLES", "200")), deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data(), shape=st.sampled_from(["trustee", "firmgate", "tsm"]))
def test_bound_attestation_with_odd_json_nodes_never_500(client: Any, sim: Any, data: st.DataObject,
                                                          shape: str) -> None:
    """The nonce and REPORT_DATA are right, so parsing and verification run for real on the odd values."""
    nonce = client.post("/kbs/v0/auth", json={"version": "0.4.0", "tee": "snp"}).get_json()["nonce"]
    _key, jwk = new_tee_key()
    report = sim.sign_report(report_data=guest_report_data(nonce, jwk))
    ev = {"trustee": lambda: sim.trustee_json(report, include=("ARK", "ASK", "LEAF")),
          "firmgate": lambda: sim.firmgate_json(report), "tsm": lambda: sim.tsm_json(report)}[shape]()
    body = {"init-data": None, "runtime-data": {"nonce": nonce, "tee-pubkey": jwk},
            "tee-evidence": {"primary_evidence": ev, "additional_evidence": ""}}
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(body) if p and "report_data" not in p and p != ("runtime-data", "nonce")
                 and p[-2:] not in OPEN_PATHS]
        path = data.draw(st.sampled_from(paths))
        node = body
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = copy.deepcopy(data.draw(st.sampled_from(_ODD)))
    r = client.post("/kbs/v0/attest", data=json.dumps(body), content_type="application/json")
    assert r.status_code in (200, 401, 413), (r.status_code, r.get_data()[:300])
    err = r.get_json()
    assert "token" in err if r.status_code == 200 else isinstance(err.get("detail"), str), err


@pytest.mark.parametrize("crv", [[], {}, [1, 2]], ids=["list", "object", "list2"])
def test_tee_pubkey_with_unhashable_crv_is_a_401(client: Any, sim: Any, crv: Any) -> None:
    nonce = client.post("/kbs/v0/auth", json={"version": "0.4.0", "tee": "snp"}).get_json()["nonce"]
    _key, jwk = new_tee_key()
    jwk = dict(jwk, crv=crv)
    report = sim.sign_report(report_data=guest_report_data(nonce, jwk))
    body = {"init-data": None, "runtime-data": {"nonce": nonce, "tee-pubkey": jwk},
            "tee-evidence": {"primary_evidence": sim.firmgate_json(report), "additional_evidence": ""}}
    r = client.post("/kbs/v0/attest", data=json.dumps(body), content_type="application/json")
    assert r.status_code == 401, (r.status_code, r.get_json())
    assert "tee-pubkey" in r.get_json()["detail"]


# -- the host's update listener, fed by a malicious guest ------------------------------------------
def test_listener_answers_a_deeply_nested_header_and_keeps_serving(tmp_path: Path) -> None:
    import socket
    import threading

    from host_install.channel import ANSWER_MAGIC, Listener, read_frame
    from host_install.vm import VmDir
    vm = VmDir.create(tmp_path / "vm", snp=True)
    listener = Listener(vm, launch=False)
    outcome: dict[str, Any] = {}

    def serve_two() -> None:
        try:
            outcome["answers"] = [listener.serve_one(), listener.serve_one()]
        except BaseException as exc:  # noqa: BLE001 - what escapes is the finding
            outcome["escaped"] = exc

    t = threading.Thread(target=serve_two, daemon=True)
    t.start()
    try:
        for _ in range(2):  # the hostile frame, then a second guest that must still get an answer
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(str(vm.channel_path))
                s.sendall((REGRESSIONS / "channel" / "nested-json-header.bin").read_bytes())
                s.shutdown(socket.SHUT_WR)
                try:
                    header, _ = read_frame(s, ANSWER_MAGIC)
                except Exception as exc:  # noqa: BLE001
                    raise AssertionError(f"no answer frame: {exc!r}; listener: {outcome.get('escaped')!r}")
                assert header["exit_code"] == 2 and header["ok"] is False, header
        t.join(10)
        assert "escaped" not in outcome, outcome.get("escaped")
    finally:
        listener.close()


def test_deeply_nested_additional_evidence_is_a_401(client: Any, sim: Any) -> None:
    nonce = client.post("/kbs/v0/auth", json={"version": "0.4.0", "tee": "snp"}).get_json()["nonce"]
    _key, jwk = new_tee_key()
    additional = "[" * 5000  # a string field; the guest binds it into REPORT_DATA, the broker parses it
    report = sim.sign_report(report_data=guest_report_data(nonce, jwk, additional))
    body = {"init-data": None, "runtime-data": {"nonce": nonce, "tee-pubkey": jwk},
            "tee-evidence": {"primary_evidence": sim.firmgate_json(report), "additional_evidence": additional}}
    r = client.post("/kbs/v0/attest", data=json.dumps(body), content_type="application/json")
    assert r.status_code in (200, 401), (r.status_code, r.get_json())  # device evidence of another shape: not ours


@pytest.mark.parametrize("toml_body", [
    pytest.param("algorithm = " + "[" * 3000 + "]" * 3000, id="nested"),
    pytest.param("algorithm = []", id="array"),
    pytest.param("algorithm = {a = 1}", id="table"),
])
def test_hostile_init_data_is_a_401(client: Any, sim: Any, toml_body: str) -> None:
    nonce = client.post("/kbs/v0/auth", json={"version": "0.4.0", "tee": "snp"}).get_json()["nonce"]
    _key, jwk = new_tee_key()
    report = sim.sign_report(report_data=guest_report_data(nonce, jwk))
    body = {"init-data": {"format": "toml", "body": toml_body}, "runtime-data": {"nonce": nonce, "tee-pubkey": jwk},
            "tee-evidence": {"primary_evidence": sim.firmgate_json(report), "additional_evidence": ""}}
    r = client.post("/kbs/v0/attest", data=json.dumps(body), content_type="application/json")
    assert r.status_code == 401, (r.status_code, r.get_json())
    assert "init-data" in r.get_json()["detail"]


def test_cli_policy_check_on_deeply_nested_policy_is_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys
    f = tmp_path / "acme.toml"
    f.write_bytes((REGRESSIONS / "policy" / "nested-arrays.toml").read_bytes())
    proc = subprocess.run([sys.executable, "-m", "verifier.cli", "policy", "check", str(f)], capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode in (1, 2), (proc.returncode, proc.stderr[-300:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-500:]


# -- firmgate's own guest, facing a malicious broker or a network attacker -----------------------------
@pytest.mark.parametrize("status", [200, 401])
def test_guest_client_refuses_deeply_nested_answers(status: int) -> None:
    import http.server
    import threading

    from guest.client import auth
    from guest.http import KbsSession
    from verifier.errors import FirmgateError

    class Evil(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            body = b"[" * 50_000
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Evil)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(FirmgateError):
            auth(KbsSession(f"http://127.0.0.1:{srv.server_port}/kbs/v0"))
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("name", ["crl-bad-issuer.bin", "crl-bad-name-attribute.bin", "crl-invalid-version.bin"])
def test_cli_verify_with_malformed_crl_in_evidence_is_one_line(tmp_path: Path, sim: Any, name: str) -> None:
    import subprocess
    import sys
    crl = (REGRESSIONS / "chain" / name).read_bytes()[1:]  # the chain target's selector byte, then the CRL
    ev = sim.trustee_json(sim.sign_report(report_data=b"\0" * 64), include=("ARK", "ASK", "LEAF"))
    ev["cert_chain"].append({"cert_type": "CRL", "data": list(crl)})
    f = tmp_path / "evidence.json"
    f.write_text(json.dumps(ev))
    root = tmp_path / "root.pem"
    root.write_bytes(sim.root_pem())
    proc = subprocess.run([sys.executable, "-m", "verifier.cli", "verify", str(f), "--trust-root", str(root)],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert "Traceback" not in proc.stderr, proc.stderr[-500:]
    assert proc.returncode in (1, 2) and proc.stderr.startswith("error:"), (proc.returncode, proc.stderr[-300:])
