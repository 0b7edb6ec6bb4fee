"""`firmgate endorse sign|verify|revoke` on the command line: exit codes 0 / 1 / 2 and one-line reasons."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.endorse_helpers import new_key, pem_private, pem_public
from verifier.cli import main
from verifier.endorse.corim import (
    parse_revocations,
    parse_signed,
    read_payload,
    read_revocations,
)
from verifier.firmware.addon import build_addon

FW = "edk2-2022.11-OVMF.fd"


@pytest.fixture()
def files(tmp_path: Path, firmware_dir: Path) -> Path:
    key, other = new_key(), new_key(ec.SECP256R1())
    (tmp_path / "pub.key").write_bytes(pem_private(key))
    (tmp_path / "pub.pem").write_bytes(pem_public(key))
    (tmp_path / "other.pem").write_bytes(pem_public(other))
    (tmp_path / "fw.fd").write_bytes((firmware_dir / FW).read_bytes())
    return tmp_path


def _sign(d: Path, *extra: str, out: str = "e.corim") -> int:
    return main(["endorse", "sign", "--firmware", str(d / "fw.fd"), "--fwid", "edk2-2022.11-acme.1", "--svn", "3",
                 "--key", str(d / "pub.key"), "--publisher", "acme", "--source-repo", "https://example.com/e.git",
                 "--source-commit", "0123abcd", "--build-recipe", "make", *extra, "-o", str(d / out)])


def test_sign_then_verify_with_the_bytes_and_claimed_measurements(files: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert _sign(files, "--shapes", "1,2:EPYC-v4", "--id", "acme-1") == 0
    e = read_payload(parse_signed((files / "e.corim").read_bytes())).endorsement
    assert (e.id, e.fwid, e.svn, e.publisher, e.sha384) == (
        "acme-1", "edk2-2022.11-acme.1", 3, "acme", hashlib.sha384((files / "fw.fd").read_bytes()).hexdigest())
    assert e.provenance.source_commit == "0123abcd" and len(e.measurements) == 2
    capsys.readouterr()
    assert main(["endorse", "verify", str(files / "e.corim"), "--key", str(files / "pub.pem"),
                 "--firmware", str(files / "fw.fd"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["alg"] == "ES384" and all(m["ok"] for m in out["measurements_checked"])
    assert len(out["measurements_checked"]) == 2


def test_sign_from_an_addon_takes_its_fwid(files: Path) -> None:
    (files / "fw.efi").write_bytes(build_addon([("edk2-2022.11-acme.7", (files / "fw.fd").read_bytes())]))
    assert main(["endorse", "sign", "--firmware", str(files / "fw.efi"), "--svn", "7", "--key", str(files / "pub.key"),
                 "-o", str(files / "a.corim")]) == 0
    e = read_payload(parse_signed((files / "a.corim").read_bytes())).endorsement
    assert e.fwid == "edk2-2022.11-acme.7" and e.publisher.startswith("sha256:")


def test_verify_rejections_exit_1_with_the_reason(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _sign(files) == 0
    capsys.readouterr()
    assert main(["endorse", "verify", str(files / "e.corim"), "--key", str(files / "other.pem")]) == 1
    assert "no trusted publisher" in capsys.readouterr().out
    (files / "other.fd").write_bytes(b"\0" * 4096)
    assert main(["endorse", "verify", str(files / "e.corim"), "--key", str(files / "pub.pem"),
                 "--firmware", str(files / "other.fd")]) == 1
    assert "the endorsement is for" in capsys.readouterr().out
    assert main(["endorse", "verify", str(files / "e.corim"), "--key", str(files / "pub.pem"),
                 "--at", "2100-01-01T00:00:00Z"]) == 1
    assert "expired at" in capsys.readouterr().out


def test_bad_input_exits_2_in_one_line(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (files / "rsa.key").write_bytes(rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    (files / "junk.corim").write_bytes(b"\xd2\x84junk")
    cases = [
        ["endorse", "sign", "--firmware", str(files / "fw.fd"), "--svn", "1", "--key", str(files / "pub.key"),
         "-o", str(files / "x")],                                                       # raw image without --fwid
        ["endorse", "sign", "--firmware", str(files / "fw.fd"), "--fwid", "a", "--svn", "1", "--key",
         str(files / "rsa.key"), "-o", str(files / "x")],                               # not an EC key
        ["endorse", "sign", "--firmware", str(files / "fw.fd"), "--fwid", "bad fwid", "--svn", "1", "--key",
         str(files / "pub.key"), "-o", str(files / "x")],                               # fwid the reader refuses
        ["endorse", "verify", str(files / "junk.corim"), "--key", str(files / "pub.pem")],   # not an endorsement
        ["endorse", "revoke", "--key", str(files / "pub.key"), "--publisher", "acme", "-o", str(files / "r")],
    ]
    for argv in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err


def test_revoke_writes_a_signed_list(files: Path) -> None:
    assert _sign(files, "--id", "acme-1") == 0
    assert main(["endorse", "revoke", "--key", str(files / "pub.key"), "--publisher", "acme",
                 "--endorsement", str(files / "e.corim"), "--sha384", "ab" * 48, "-o", str(files / "r")]) == 0
    s1 = parse_revocations((files / "r").read_bytes())
    s1.verify(serialization.load_pem_public_key((files / "pub.pem").read_bytes()))  # type: ignore[arg-type]
    r = read_revocations(s1)
    assert r.ids == {"acme-1"} and r.digests == {"ab" * 48} and r.publisher == "acme"
