"""Guest client pieces without a broker: configfs-tsm protocol, /dev/sev-guest struct packing,
JWE validation as the Trustee guest does it, the 0600 secret file, REPORT_DATA binding."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from guest import TeeKey, report_data_for, write_secret
from guest import sevguest, tsm
from guest.errors import BadResponse, EvidenceUnavailable, TsmRace
from guest.evidence import TsmSource, cert_chain, check_report, evidence_json
from broker.jwe import encrypt
from broker.runtime_data import expected_report_data
from verifier.abi.certtable import parse_cert_table
from verifier.evidence import evidence_from_json
from sim.platform import SimPlatform


# -- configfs-tsm ---------------------------------------------------------------------------
class FakeHost:
    """Enough of sim.host.SimSnpHost for SimTsmBackend without a VM directory."""

    def __init__(self) -> None:
        self.platform = SimPlatform("Milan", "VCEK")

    def report(self, report_data: bytes, *, vmpl: int = 0) -> bytes:
        return self.platform.sign_report(report_data=report_data.ljust(64, b"\0"), vmpl=vmpl)

    def cert_table(self) -> bytes:
        return self.platform.cert_table(pem=True)


@pytest.fixture()
def sim_tsm():  # type: ignore[no-untyped-def]
    from sim.host import SimTsmBackend
    return SimTsmBackend(FakeHost())  # type: ignore[arg-type]


def test_tsm_report_carries_inblob_and_entry_is_removed(sim_tsm) -> None:  # type: ignore[no-untyped-def]
    rd = bytes(range(64))
    r = tsm.get_report(rd, sim_tsm)
    assert len(r.outblob) == 1184 and r.outblob[0x50:0x90] == rd
    assert r.provider == "sev_guest" and r.generation == 1
    assert [e.kind for e in parse_cert_table(r.auxblob)] == ["ARK", "ASK", "VCEK"]
    assert sim_tsm.entries == {}


def test_tsm_race_detected_and_entry_removed(sim_tsm) -> None:  # type: ignore[no-untyped-def]
    sim_tsm.race_after_write = True
    with pytest.raises(TsmRace, match="written by someone else"):
        tsm.get_report(b"\1" * 64, sim_tsm)
    assert sim_tsm.entries == {}


def test_tsm_inblob_must_be_64_bytes(sim_tsm) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError):
        tsm.get_report(b"\1" * 65, sim_tsm)


def test_plain_directory_is_not_configfs(tmp_path: Path) -> None:
    """A directory that only looks like configfs: generation never moves, so the client refuses."""
    entry = tmp_path / "e"
    entry.mkdir()
    for name, data in (("generation", b"0\n"), ("outblob", b"x" * 1184), ("auxblob", b""),
                       ("provider", b"sev_guest\n"), ("inblob", b"")):
        (entry / name).write_bytes(data)
    backend = tsm.FsTsmBackend(tmp_path)
    backend.mkdir = lambda name: None  # type: ignore[method-assign]  # the entry exists already
    with pytest.raises(TsmRace):
        tsm.get_report(b"\2" * 64, backend, name="e")


def test_missing_configfs_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EvidenceUnavailable, match="cannot create configfs-tsm entry"):
        tsm.get_report(b"\0" * 64, tsm.FsTsmBackend(tmp_path / "absent"))


def test_report_must_carry_our_report_data(sim_tsm) -> None:  # type: ignore[no-untyped-def]
    report, _ = TsmSource(sim_tsm).get(b"\3" * 64)
    check_report(report, b"\3" * 64)
    with pytest.raises(EvidenceUnavailable, match="does not carry the REPORT_DATA"):
        check_report(report, b"\4" * 64)
    with pytest.raises(EvidenceUnavailable, match="1184"):
        check_report(report[:-1], b"\3" * 64)


def test_evidence_shapes_round_trip_through_the_verifier(sim_tsm) -> None:  # type: ignore[no-untyped-def]
    report, table = TsmSource(sim_tsm).get(b"\5" * 64)
    snp = evidence_json(report, table, "snp")
    assert [c["cert_type"] for c in snp["cert_chain"]] == ["ARK", "ASK", "VCEK"]  # PEM in auxblob -> DER
    for shape in ("snp", "firmgate"):
        ev = evidence_from_json(json.loads(json.dumps(evidence_json(report, table, shape))))
        assert ev.report.raw == report
        assert len(ev.certs) == 3
    assert cert_chain(b"") is None and cert_chain(b"\0" * 24) is None
    with pytest.raises(EvidenceUnavailable):
        cert_chain(b"\1" * 30)


# -- /dev/sev-guest (struct packing only: no SNP guest here) ---------------------------------------
def test_sev_guest_uapi_layout() -> None:
    assert sevguest.REPORT_REQ.size == 96          # snp_report_req
    assert sevguest.EXT_REPORT_REQ.size == 112     # snp_ext_report_req, 8-byte aligned
    assert sevguest.GUEST_REQUEST.size == 32       # snp_guest_request_ioctl
    assert sevguest.SNP_GET_EXT_REPORT == 0xC0205302
    req = sevguest.pack_ext_request(b"\xaa" * 64, 2, 0x1122334455667788, 0x4000)
    assert req[:64] == b"\xaa" * 64 and req[64:68] == b"\2\0\0\0" and req[68:96] == b"\0" * 28
    assert req[96:104] == (0x1122334455667788).to_bytes(8, "little") and req[104:108] == b"\0\x40\0\0"
    ioc = sevguest.pack_guest_request(0x1000, 0x2000)
    assert ioc[0] == 1 and ioc[1:8] == b"\0" * 7 and ioc[8:16] == (0x1000).to_bytes(8, "little")
    with pytest.raises(ValueError):
        sevguest.pack_ext_request(b"\0" * 63, 0, 0, 0)
    with pytest.raises(ValueError):
        sevguest.pack_ext_request(b"\0" * 64, 4, 0, 0)


def test_sev_guest_response_parsing() -> None:
    report = bytes(range(256)) * 4 + b"\7" * 160
    ok = (0).to_bytes(4, "little") + (1184).to_bytes(4, "little") + b"\0" * 24 + report + b"\0" * 2784
    assert sevguest.parse_response(ok) == report
    with pytest.raises(EvidenceUnavailable, match="status 0x16"):
        sevguest.parse_response((0x16).to_bytes(4, "little") + ok[4:])
    with pytest.raises(EvidenceUnavailable, match="report_size 1000"):
        sevguest.parse_response(ok[:4] + (1000).to_bytes(4, "little") + ok[8:])
    with pytest.raises(EvidenceUnavailable, match="too short"):
        sevguest.parse_response(ok[:100])


def test_sev_guest_absent_device(tmp_path: Path) -> None:
    with pytest.raises(EvidenceUnavailable, match="cannot open"):
        sevguest.get_ext_report(b"\0" * 64, device=str(tmp_path / "sev-guest"))


# -- keys and the resource JWE --------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["p256", "p384", "p521", "rsa"])
def test_decrypts_the_brokers_jwe(kind: str) -> None:
    key = TeeKey.generate(kind)
    assert set(key.jwk) == ({"kty", "crv", "alg", "x", "y"} if kind != "rsa" else {"kty", "alg", "n", "e"})
    assert key.decrypt(encrypt(b"the secret " + kind.encode(), key.jwk)) == b"the secret " + kind.encode()


def test_each_run_has_a_fresh_key() -> None:
    assert TeeKey.generate().jwk != TeeKey.generate().jwk


def _b64u(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _header(body: dict[str, str]) -> dict[str, object]:
    return json.loads(base64.urlsafe_b64decode(body["protected"] + "=="))  # type: ignore[no-any-return]


def _with_header(body: dict[str, str], text: str) -> dict[str, str]:
    return {**body, "protected": _b64u(text.encode())}


def test_jwe_refusals_name_the_rule() -> None:
    key = TeeKey.generate("p256")
    good = encrypt(b"s", key.jwk)
    h = _header(good)
    epk = h["epk"]
    assert isinstance(epk, dict)
    cases: list[tuple[dict[str, object], str]] = [
        ({k: v for k, v in good.items() if k != "tag"}, "no 'tag'"),
        ({**good, "iv": good["iv"] + "="}, "padded base64url"),
        ({**good, "iv": _b64u(b"\0" * 16)}, "iv must be 12 bytes"),
        ({**good, "ciphertext": "***"}, "not base64url"),
        (_with_header(good, json.dumps({**h, "alg": "RSA-OAEP-256"}, separators=(",", ":"))), "does not match"),
        (_with_header(good, json.dumps({**h, "enc": "A128GCM"}, separators=(",", ":"))), "enc is"),
        (_with_header(good, json.dumps({**h, "epk": {**epk, "crv": "P-521"}}, separators=(",", ":"))),
         "not this run's curve"),
        (_with_header(good, json.dumps({**h, "epk": {**epk, "x": _b64u(b"\1" * 31)}}, separators=(",", ":"))),
         "must be 32 bytes"),
        # Same members, other order: a Trustee guest's AAD would differ, so it must be refused.
        (_with_header(good, json.dumps({"enc": h["enc"], "alg": h["alg"], "epk": epk}, separators=(",", ":"))),
         "re-serialises"),
        (_with_header(good, json.dumps(h)), "re-serialises"),   # whitespace
        ("not an object", "not a JSON object"),  # type: ignore[list-item]
    ]
    for body, why in cases:
        with pytest.raises(BadResponse, match=why):
            key.decrypt(body)


def test_jwe_tampered_ciphertext_or_other_key_fails() -> None:
    key = TeeKey.generate("p256")
    body = encrypt(b"secret", key.jwk)
    ct = bytearray(base64.urlsafe_b64decode(body["ciphertext"] + "=="))
    ct[0] ^= 1
    with pytest.raises(BadResponse, match="does not decrypt"):
        key.decrypt({**body, "ciphertext": _b64u(bytes(ct))})
    with pytest.raises(BadResponse, match="does not decrypt"):
        TeeKey.generate("p256").decrypt(body)


def test_unknown_key_type() -> None:
    with pytest.raises(ValueError):
        TeeKey.generate("ed25519")


# -- REPORT_DATA and the secret file -----------------------------------------------------------------
def test_report_data_matches_the_brokers_binding() -> None:
    key = TeeKey.generate()
    for extra in ("", '{"firmgate-firmware":{"addon":"AAAA"}}'):
        rd = report_data_for("bm9uY2U=", key.jwk, extra)
        assert rd == expected_report_data("bm9uY2U=", key.jwk, extra)
        assert len(rd) == 64 and rd[48:] == b"\0" * 16


def test_report_data_known_answer() -> None:
    # The JCS/SHA-384 test vector from KBS-FACTS section 3 (Trustee attestation-service).
    import rfc8785
    assert hashlib.sha384(rfc8785.dumps({"b": 1, "a": "test", "c": {"d": "e"}})).hexdigest() == (
        "e71ce8e70d814ba6639c3612ebee0ff1f76f650f8dbb5e47157e0f3f525cd22c4597480a186427c813ca941da78870c3")


def test_secret_file_is_0600_even_with_a_lax_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        out = tmp_path / "key"
        out.write_bytes(b"old")
        os.chmod(out, 0o644)
        write_secret(out, b"new secret")
    finally:
        os.umask(old)
    assert out.read_bytes() == b"new secret"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["key"]   # no temporary left behind


def test_secret_file_in_missing_directory(tmp_path: Path) -> None:
    from guest.errors import GuestError
    with pytest.raises(GuestError, match="cannot write the secret"):
        write_secret(tmp_path / "no" / "key", b"x")
