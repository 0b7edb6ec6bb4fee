"""Attestation result tokens: EAR (draft-ietf-rats-ear) as a JWT (joserfc) or a CWT (COSE_Sign1, cbor2).

The claims follow Trustee's EAR (KBS-FACTS section 5) because real CoCo guests
parse them: `eat_profile` = Trustee's profile, integer `iat`/`exp` (exp = iat +
5 minutes by default), string `iss`, `ear.verifier-id` {developer, build}, and
`submods.cpu0` with `ear.status`, `ear.trustworthiness-vector` (AR4SI claim
names -> integer codes), `ear.appraisal-policy-id` and
`ear.veraison.annotated-evidence` {init_data, init_data_claims, report_data,
runtime_data_claims, snp}. firmgate adds `firmgate` inside the annotated
evidence (matched firmware, shape, policy commit, simulated flag): a result
from a simulated platform always says so.

JWT header: {"typ":"JWT","alg":ES256|ES384,"jwk":{public key}} as Trustee emits
it. CWT: COSE_Sign1 (RFC 9052, tag 18) with protected {1: alg} (-7 ES256,
-35 ES384) and the claims keyed by the CBOR labels the EAR draft and RFC 8392
assign (iss 1, exp 4, iat 6, jti 7, eat_profile 265, submods 266, ear.status
1000, ear.trustworthiness-vector 1001, ear.appraisal-policy-id 1003,
ear.verifier-id 1004); other keys stay text. The status in CBOR is its AR4SI
tier integer (2 affirming, 32 warning, 96 contraindicated, 0 none).
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, cast

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey

from .errors import TrustError
from .verdict import Verdict

EAT_PROFILE = "tag:github.com,2024:confidential-containers/Trustee"
ISSUER = "CoCo-Attestation-Service"      # what Trustee guests and tools expect in `iss`
DEFAULT_TTL_S = 5 * 60
MAX_TOKEN_SIZE = 64 * 1024
TRUST_CLAIMS = ("instance-identity", "configuration", "executables", "file-system", "hardware",
                "runtime-opaque", "storage-opaque", "sourced-data")
_ALGS: dict[str, tuple[type[ec.EllipticCurve], str, int, Any]] = {
    # alg: (curve, JWK crv, COSE alg, hash)
    "ES256": (ec.SECP256R1, "P-256", -7, hashes.SHA256),
    "ES384": (ec.SECP384R1, "P-384", -35, hashes.SHA384),
}
_STATUS_TIER = {"none": 0, "affirming": 2, "warning": 32, "contraindicated": 96}


class EarError(TrustError):
    """An attestation result token that does not verify, is malformed or has expired."""


# -- claims ------------------------------------------------------------------------------
def ear_claims(verdict: Verdict, *, now: int | None = None, ttl_s: int = DEFAULT_TTL_S,
               developer: str = "firmgate", build: str = "firmgate 0.1.0",
               runtime_data: Mapping[str, Any] | None = None, init_data: Any = None,
               jti: str | None = None) -> dict[str, Any]:
    """EAR claims for a verdict of `verifier.appraise.appraise` (its facts carry status, vector, snp...)."""
    facts = verdict.facts or {}
    iat = int(time.time()) if now is None else int(now)
    status = facts.get("status") or ("affirming" if verdict.accepted else "contraindicated")
    vector = {k: int((facts.get("trust_vector") or {}).get(k, 0)) for k in TRUST_CLAIMS}
    policy = facts.get("policy") or {}
    annotated: dict[str, Any] = {
        "init_data": facts.get("host_data", "") if init_data is not None else "",
        "init_data_claims": init_data if init_data is not None else {},
        "report_data": facts.get("report_data", ""),
        "runtime_data_claims": dict(runtime_data) if runtime_data is not None else {},
        "snp": dict(facts.get("snp") or {}),
        "firmgate": {
            "firmware": facts.get("firmware"),
            "shape": facts.get("shape"),
            "product": facts.get("product"),
            "signer": facts.get("signer"),
            "simulated": bool(facts.get("simulated", False)),
            "policy_commit": policy.get("commit"),
            "evidence_sha384": verdict.evidence_sha384,
            "failed": [c.name for c in verdict.failures],
        },
    }
    claims: dict[str, Any] = {
        "eat_profile": EAT_PROFILE,
        "iat": iat,
        "exp": iat + int(ttl_s),
        "iss": ISSUER,
        "ear.verifier-id": {"developer": developer, "build": build},
        "submods": {"cpu0": {
            "ear.status": status,
            "ear.trustworthiness-vector": vector,
            "ear.appraisal-policy-id": verdict.policy_id,
            "ear.veraison.annotated-evidence": annotated,
        }},
    }
    if jti is not None:
        claims["jti"] = jti
    return claims


def _claims_of(claims_or_verdict: Mapping[str, Any] | Verdict) -> dict[str, Any]:
    if isinstance(claims_or_verdict, Verdict):
        return ear_claims(claims_or_verdict)
    return dict(claims_or_verdict)


def _check_time(claims: Mapping[str, Any], now: int | None) -> None:
    t = int(time.time()) if now is None else now
    exp, iat, nbf = claims.get("exp"), claims.get("iat"), claims.get("nbf")
    if isinstance(exp, bool) or not isinstance(exp, int) or isinstance(iat, bool) or not isinstance(iat, int):
        raise EarError("token has no integer iat/exp")
    if exp <= t:
        raise EarError("token has expired")
    if isinstance(nbf, int) and not isinstance(nbf, bool) and nbf > t:
        raise EarError("token is not valid yet")


def _private(key: Any, alg: str) -> ec.EllipticCurvePrivateKey:
    if alg not in _ALGS:
        raise ValueError(f"alg must be one of {', '.join(_ALGS)}, not {alg!r}")
    if isinstance(key, ECKey):
        key = key.private_key
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("an EAR is signed with an EC private key")
    if not isinstance(key.curve, _ALGS[alg][0]):
        raise ValueError(f"{alg} needs a {_ALGS[alg][1]} key, not {key.curve.name}")
    return key


def public_jwk(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey, alg: str = "ES256") -> dict[str, str]:
    """The public JWK a relying party verifies tokens with (what the broker publishes)."""
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    d = ECKey.import_key(pub).as_dict(private=False)
    return {"kty": "EC", "crv": cast(str, d["crv"]), "x": cast(str, d["x"]), "y": cast(str, d["y"]), "alg": alg}


# -- JWT ------------------------------------------------------------------------------------
def issue_ear_jwt(claims_or_verdict: Mapping[str, Any] | Verdict, key: Any, alg: str = "ES256") -> str:
    priv = _private(key, alg)
    header = {"typ": "JWT", "alg": alg, "jwk": public_jwk(priv, alg)}
    return jwt.encode(header, _claims_of(claims_or_verdict), ECKey.import_key(priv), algorithms=[alg])


def verify_ear_jwt(token: str, public: Mapping[str, Any] | ec.EllipticCurvePublicKey, *,
                   now: int | None = None, check_time: bool = True) -> dict[str, Any]:
    """Claims of `token` if it verifies with `public` (a JWK or key); EarError otherwise.

    The algorithm comes from the key's curve, never from the token's header alone
    (a header cannot pick a weaker check).
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_SIZE or token.count(".") != 2:
        raise EarError("not a compact JWT")
    try:
        k = ECKey.import_key(dict(public) if isinstance(public, Mapping) else public)
        crv = k.as_dict(private=False)["crv"]
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise EarError(f"the verification key is not an EC JWK: {exc}") from exc
    alg = next((a for a, v in _ALGS.items() if v[1] == crv), None)
    if alg is None:
        raise EarError(f"no EAR algorithm for curve {crv}")
    try:
        decoded = jwt.decode(token, k, algorithms=[alg])
    except (JoseError, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise EarError(f"EAR JWT does not verify with the given key ({type(exc).__name__})") from exc
    if decoded.header.get("alg") != alg:
        raise EarError(f"token alg {decoded.header.get('alg')!r} does not match the key ({alg})")
    claims = dict(decoded.claims)
    if check_time:
        _check_time(claims, now)
    return claims


# -- CWT (COSE_Sign1) -------------------------------------------------------------------------
COSE_SIGN1_TAG = 18
CWT_TAG = 61
_TOP = {"iss": 1, "exp": 4, "iat": 6, "jti": 7, "eat_profile": 265, "submods": 266,
        "ear.status": 1000, "ear.trustworthiness-vector": 1001, "ear.appraisal-policy-id": 1003,
        "ear.verifier-id": 1004}
_VERIFIER_ID = {"developer": 0, "build": 1}
_VECTOR = {name: i for i, name in enumerate(TRUST_CLAIMS)}


def _to_cbor_claims(obj: Mapping[str, Any]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for k, v in obj.items():
        label = _TOP.get(k, k)
        if k == "ear.verifier-id" and isinstance(v, Mapping):
            v = {_VERIFIER_ID.get(a, a): b for a, b in v.items()}
        elif k == "ear.trustworthiness-vector" and isinstance(v, Mapping):
            v = {_VECTOR.get(a, a): b for a, b in v.items()}
        elif k == "ear.status" and isinstance(v, str) and v in _STATUS_TIER:
            v = _STATUS_TIER[v]
        elif k == "submods" and isinstance(v, Mapping):
            v = {name: _to_cbor_claims(sub) for name, sub in v.items()}
        out[label] = v
    return out


def _from_cbor_claims(obj: Mapping[Any, Any]) -> dict[str, Any]:
    rev_top = {v: k for k, v in _TOP.items()}
    rev_vid = {v: k for k, v in _VERIFIER_ID.items()}
    rev_vec = {v: k for k, v in _VECTOR.items()}
    rev_status = {v: k for k, v in _STATUS_TIER.items()}
    out: dict[str, Any] = {}
    for k, v in obj.items():
        name = rev_top.get(k, k)
        if not isinstance(name, str):
            raise EarError(f"unknown CWT claim label {k!r}")
        if name == "ear.verifier-id" and isinstance(v, dict):
            v = {rev_vid.get(a, a): b for a, b in v.items()}
        elif name == "ear.trustworthiness-vector" and isinstance(v, dict):
            v = {rev_vec.get(a, a): b for a, b in v.items()}
        elif name == "ear.status" and isinstance(v, int):
            v = rev_status.get(v, v)
        elif name == "submods" and isinstance(v, dict):
            v = {sub: _from_cbor_claims(val) if isinstance(val, dict) else val for sub, val in v.items()}
        out[name] = v
    return out


def _thaw(obj: Any, depth: int = 0) -> Any:
    """cbor2 decodes maps as frozendict and arrays as tuples: back to the dicts and lists JSON gives."""
    if depth > 32:
        raise ValueError("CWT claims nest too deeply")
    if isinstance(obj, Mapping):
        return {k: _thaw(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_thaw(v, depth + 1) for v in obj]
    return obj


def _sig_structure(protected: bytes, payload: bytes) -> bytes:
    # RFC 9052 section 4.4: Sig_structure for COSE_Sign1, empty external_aad.
    return cbor2.dumps(["Signature1", protected, b"", payload])


def issue_ear_cwt(claims_or_verdict: Mapping[str, Any] | Verdict, key: Any, alg: str = "ES256") -> bytes:
    priv = _private(key, alg)
    _, _, cose_alg, h = _ALGS[alg]
    protected = cbor2.dumps({1: cose_alg})
    payload = cbor2.dumps(_to_cbor_claims(_claims_of(claims_or_verdict)), canonical=True)
    der = priv.sign(_sig_structure(protected, payload), ec.ECDSA(h()))
    r, s = decode_dss_signature(der)
    n = (priv.curve.key_size + 7) // 8
    # RFC 9053 section 2.1: the signature is r || s, each left-padded to the curve size.
    sig = r.to_bytes(n, "big") + s.to_bytes(n, "big")
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [protected, {}, payload, sig]))


def verify_ear_cwt(token: bytes, public: Mapping[str, Any] | ec.EllipticCurvePublicKey, *,
                   now: int | None = None, check_time: bool = True) -> dict[str, Any]:
    """The JSON-shaped claims of a COSE_Sign1 EAR if it verifies with `public`; EarError otherwise."""
    if not isinstance(token, (bytes, bytearray)) or len(token) > MAX_TOKEN_SIZE:
        raise EarError("not a CWT (bytes, at most 64 KiB)")
    try:
        pub = (ECKey.import_key(dict(public)).public_key if isinstance(public, Mapping) else public)
    except (JoseError, ValueError, TypeError) as exc:
        raise EarError(f"the verification key is not an EC JWK: {exc}") from exc
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise EarError("the verification key is not an EC public key")
    alg = next((a for a, v in _ALGS.items() if isinstance(pub.curve, v[0])), None)
    if alg is None:
        raise EarError(f"no EAR algorithm for curve {pub.curve.name}")
    _, _, cose_alg, h = _ALGS[alg]
    try:
        obj = cbor2.loads(bytes(token))
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError, OverflowError) as exc:
        raise EarError(f"CWT does not decode as CBOR ({type(exc).__name__})") from exc
    if isinstance(obj, cbor2.CBORTag) and obj.tag == CWT_TAG:
        obj = obj.value
    if not (isinstance(obj, cbor2.CBORTag) and obj.tag == COSE_SIGN1_TAG and isinstance(obj.value, (list, tuple))
            and len(obj.value) == 4):
        raise EarError("not a COSE_Sign1 (tag 18, four elements)")
    protected, unprotected, payload, sig = obj.value
    if not (isinstance(protected, bytes) and isinstance(unprotected, Mapping) and isinstance(payload, bytes)
            and isinstance(sig, bytes)):
        raise EarError("COSE_Sign1 elements have the wrong types")
    try:
        header = cbor2.loads(protected) if protected else {}
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise EarError("protected header does not decode") from exc
    if not isinstance(header, Mapping) or header.get(1) != cose_alg:
        raise EarError(f"protected header alg is not {alg} ({cose_alg}), as the key requires")
    n = (pub.curve.key_size + 7) // 8
    if len(sig) != 2 * n:
        raise EarError(f"signature is {len(sig)} bytes; {alg} signatures are {2 * n}")
    der = encode_dss_signature(int.from_bytes(sig[:n], "big"), int.from_bytes(sig[n:], "big"))
    try:
        pub.verify(der, _sig_structure(protected, payload), ec.ECDSA(h()))
    except InvalidSignature:
        raise EarError("EAR CWT signature does not verify with the given key") from None
    try:
        raw = _thaw(cbor2.loads(payload))
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise EarError("CWT payload does not decode") from exc
    if not isinstance(raw, dict):
        raise EarError("CWT payload is not a claims map")
    claims = _from_cbor_claims(raw)
    if check_time:
        _check_time(claims, now)
    return claims
