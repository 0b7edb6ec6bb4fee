"""EAR attestation results: JWT (ES256/ES384, joserfc) and CWT (COSE_Sign1), verify and tamper."""
from __future__ import annotations

import base64
import json
import time

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from verifier.ear import (EAT_PROFILE, ISSUER, EarError, ear_claims, issue_ear_cwt, issue_ear_jwt, public_jwk,
                          verify_ear_cwt, verify_ear_jwt)
from verifier.verdict import CheckResult, Outcome, Verdict

NOW = 1_800_000_000


def verdict(status: str = "affirming") -> Verdict:
    outcome = Outcome.PASS if status == "affirming" else Outcome.FAIL
    return Verdict(
        checks=(CheckResult("firmware.measurement", outcome, "m"),),
        evidence_sha384="ee" * 48, policy_id="acme@" + "c" * 40,
        facts={"status": status,
               "trust_vector": {"instance-identity": 2, "configuration": 2, "executables": 2 if outcome is
                                Outcome.PASS else 96, "file-system": 0, "hardware": 2, "runtime-opaque": 2,
                                "storage-opaque": 0, "sourced-data": 0},
               "firmware": {"id": "v2", "svn": 2, "sha384": "ab" * 48}, "shape": "vcpus=1,vcpu_type=EPYC-v4",
               "product": "Milan", "signer": "VCEK", "simulated": True, "policy": {"commit": "c" * 40},
               "report_data": "01" * 64, "host_data": "02" * 32,
               "snp": {"measurement": "aa" * 48, "policy_debug_allowed": False, "reported_tcb_snp": 23}})


@pytest.fixture(scope="module")
def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def p384() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def b64json(part: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def test_claims_follow_trustee_ear_shape() -> None:
    jwk = {"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW", "x": "x", "y": "y"}
    c = ear_claims(verdict(), now=NOW, runtime_data={"nonce": "n", "tee-pubkey": jwk}, init_data={"a": "b"},
                   jti="0" * 32)
    assert c["eat_profile"] == EAT_PROFILE and c["iss"] == ISSUER and c["jti"] == "0" * 32
    assert c["iat"] == NOW and c["exp"] == NOW + 300 and all(type(c[k]) is int for k in ("iat", "exp"))
    assert c["ear.verifier-id"] == {"developer": "firmgate", "build": "firmgate 0.1.0"}
    cpu0 = c["submods"]["cpu0"]
    assert cpu0["ear.status"] == "affirming" and cpu0["ear.appraisal-policy-id"] == "acme@" + "c" * 40
    assert list(cpu0["ear.trustworthiness-vector"]) == ["instance-identity", "configuration", "executables",
                                                        "file-system", "hardware", "runtime-opaque",
                                                        "storage-opaque", "sourced-data"]
    ae = cpu0["ear.veraison.annotated-evidence"]
    assert ae["runtime_data_claims"]["tee-pubkey"] == jwk and ae["init_data"] == "02" * 32
    assert ae["init_data_claims"] == {"a": "b"} and ae["report_data"] == "01" * 64
    assert ae["snp"]["reported_tcb_snp"] == 23
    assert ae["firmgate"]["simulated"] is True and ae["firmgate"]["firmware"]["id"] == "v2"
    no_init = ear_claims(verdict(), now=NOW)["submods"]["cpu0"]["ear.veraison.annotated-evidence"]
    assert no_init["init_data"] == "" and no_init["init_data_claims"] == {}


@pytest.mark.parametrize("alg,keyname", [("ES256", "p256"), ("ES384", "p384")])
def test_jwt_round_trip_and_header(alg: str, keyname: str, request: pytest.FixtureRequest) -> None:
    key = request.getfixturevalue(keyname)
    claims = ear_claims(verdict(), now=int(time.time()))
    token = issue_ear_jwt(claims, key, alg)
    header = b64json(token.split(".")[0])
    assert header["typ"] == "JWT" and header["alg"] == alg and header["jwk"] == public_jwk(key, alg)
    assert "d" not in header["jwk"]
    assert verify_ear_jwt(token, public_jwk(key, alg)) == claims
    assert verify_ear_jwt(token, key.public_key()) == claims


def test_jwt_from_a_verdict_directly(p256: ec.EllipticCurvePrivateKey) -> None:
    out = verify_ear_jwt(issue_ear_jwt(verdict("contraindicated"), p256), public_jwk(p256))
    assert out["submods"]["cpu0"]["ear.status"] == "contraindicated"


def test_jwt_fails_when_any_one_byte_changes(p256: ec.EllipticCurvePrivateKey) -> None:
    token = issue_ear_jwt(ear_claims(verdict(), now=int(time.time())), p256)
    jwk = public_jwk(p256)
    flips = 0
    for i in range(len(token)):
        if token[i] == ".":
            continue
        c = "A" if token[i] != "A" else "B"
        bad = token[:i] + c + token[i + 1:]
        try:
            verify_ear_jwt(bad, jwk)
        except EarError:
            flips += 1
            continue
        # base64url's last character may carry unused low bits: the decoded bytes must then be identical.
        part = bad.split(".")
        orig = token.split(".")
        assert [base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)) for p in part] == \
            [base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)) for p in orig], i
    assert flips >= len(token) - 5


def test_jwt_wrong_key_expired_and_alg_mismatch(p256: ec.EllipticCurvePrivateKey,
                                                 p384: ec.EllipticCurvePrivateKey) -> None:
    claims = ear_claims(verdict(), now=NOW)
    token = issue_ear_jwt(claims, p256)
    with pytest.raises(EarError, match="does not verify"):
        verify_ear_jwt(token, public_jwk(ec.generate_private_key(ec.SECP256R1())), now=NOW)
    with pytest.raises(EarError, match="expired"):
        verify_ear_jwt(token, public_jwk(p256), now=NOW + 301)
    assert verify_ear_jwt(token, public_jwk(p256), now=NOW + 299) == claims
    with pytest.raises(EarError):
        verify_ear_jwt(token, public_jwk(p384), now=NOW)
    with pytest.raises(ValueError, match="ES384 needs a P-384 key"):
        issue_ear_jwt(claims, p256, "ES384")
    with pytest.raises(EarError, match="not a compact JWT"):
        verify_ear_jwt("a.b", public_jwk(p256))


@pytest.mark.parametrize("alg,keyname,cose_alg", [("ES256", "p256", -7), ("ES384", "p384", -35)])
def test_cwt_round_trip_same_claims(alg: str, keyname: str, cose_alg: int, request: pytest.FixtureRequest) -> None:
    key = request.getfixturevalue(keyname)
    claims = ear_claims(verdict("warning"), now=int(time.time()))
    token = issue_ear_cwt(claims, key, alg)
    obj = cbor2.loads(token)
    assert obj.tag == 18 and cbor2.loads(obj.value[0]) == {1: cose_alg}
    payload = cbor2.loads(obj.value[2])
    assert payload[265] == EAT_PROFILE and payload[1] == ISSUER and isinstance(payload[6], int)
    cpu0 = payload[266]["cpu0"]
    assert cpu0[1000] == 32 and cpu0[1001][2] == 96 and cpu0[1003] == "acme@" + "c" * 40
    assert payload[1004] == {0: "firmgate", 1: "firmgate 0.1.0"}
    assert verify_ear_cwt(token, public_jwk(key, alg)) == claims
    assert verify_ear_cwt(cbor2.dumps(cbor2.CBORTag(61, obj)), key.public_key()) == claims


def test_cwt_fails_when_any_one_byte_changes(p256: ec.EllipticCurvePrivateKey) -> None:
    token = issue_ear_cwt(ear_claims(verdict(), now=int(time.time())), p256)
    jwk = public_jwk(p256)
    for i in range(len(token)):
        bad = bytearray(token)
        bad[i] ^= 0x01
        with pytest.raises(EarError):
            verify_ear_cwt(bytes(bad), jwk)


def test_cwt_rejects_wrong_key_shape_and_expiry(p256: ec.EllipticCurvePrivateKey,
                                                p384: ec.EllipticCurvePrivateKey) -> None:
    token = issue_ear_cwt(ear_claims(verdict(), now=NOW), p256)
    with pytest.raises(EarError, match="alg is not ES384"):
        verify_ear_cwt(token, p384.public_key(), now=NOW)
    with pytest.raises(EarError, match="expired"):
        verify_ear_cwt(token, p256.public_key(), now=NOW + 300)
    with pytest.raises(EarError, match="COSE_Sign1"):
        verify_ear_cwt(cbor2.dumps([1, 2, 3]), p256.public_key())
    with pytest.raises(EarError, match="CBOR"):
        verify_ear_cwt(b"\xff\xff", p256.public_key())
    with pytest.raises(EarError, match="at most 64 KiB"):
        verify_ear_cwt(b"\0" * 70000, p256.public_key())


def test_ear_from_a_real_appraisal_says_simulated_and_names_the_firmware(tmp_path, p256) -> None:  # type: ignore[no-untyped-def]
    from test_appraise_rules import FW, make_policy, verified
    from verifier.measure.launch import Shape, measurement_table
    m = measurement_table(FW.read_bytes(), [Shape(1, "EPYC-v4")])[Shape(1, "EPYC-v4")]
    lp = make_policy(tmp_path)
    v = verified(m)
    from verifier.appraise.appraise import appraise
    verdict = appraise(v, lp, expected_report_data=v.report.report_data)
    tee = {"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW", "x": "AA", "y": "BB"}
    claims = ear_claims(verdict, runtime_data={"nonce": "bm9uY2U", "tee-pubkey": tee})
    out = verify_ear_jwt(issue_ear_jwt(claims, p256), public_jwk(p256))
    cpu0 = out["submods"]["cpu0"]
    assert cpu0["ear.status"] == "warning" and cpu0["ear.trustworthiness-vector"]["hardware"] == 32
    ae = cpu0["ear.veraison.annotated-evidence"]
    assert ae["firmgate"]["simulated"] is True and ae["firmgate"]["firmware"]["id"] == "v2"
    assert ae["runtime_data_claims"]["tee-pubkey"] == tee and ae["snp"]["measurement"] == m.hex()
    assert cpu0["ear.appraisal-policy-id"] == lp.policy_id
    assert verify_ear_cwt(issue_ear_cwt(claims, p256), p256.public_key()) == out
