"""The attestation token (EAR, draft-ietf-rats-ear, in Trustee's shape; KBS-FACTS section 5).

ES256 on P-256, header `{"typ":"JWT","alg":"ES256","jwk":{...}}` as Trustee
emits it; integer iat/exp; `jti` names the broker session so a resource request
that brings the token as `Authorization: Bearer` (no cookie) finds the evidence.
The signing key lives in the database, encrypted under the master key, so every
replica signs with and accepts the same key; its public half is the JWKS.

The claims are built here rather than by verifier.ear.ear_claims because one
token may stand for appraisals by several tenants' policies (an unmodified guest
names no tenant): the token carries the best status and the trust vector but no
tenant, policy or firmware names, so a VM learns nothing about other tenants.
"""
from __future__ import annotations

import time
from typing import Any, cast

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jws, jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as OrmSession

from verifier.ear import EAT_PROFILE, ISSUER
from verifier.errors import FirmgateError

from .db import KeyMaterial, now_ms
from .secretbox import SecretBox

KEY_NAME = "ear-es256"
TOKEN_MAX_LEN = 64 * 1024
# Where Trustee looks for the tee-pubkey in a token (api_server.rs), in order.
TEE_PUBKEY_PATHS: tuple[tuple[str, ...], ...] = (
    ("tdx", "attester_runtime_data", "tee-pubkey"),
    ("tdx", "attester_user_data", "tee-pubkey"),
    ("customized_claims", "runtime_data", "tee-pubkey"),
    ("submods", "cpu0", "ear.veraison.annotated-evidence", "runtime_data_claims", "tee-pubkey"),
    ("tee-pubkey",),
)


class TokenError(FirmgateError):
    """A bearer token that is malformed, not ours, or expired."""

    exit_code = 1


class TokenKey:
    """The broker's ES256 key, loaded from (or created once in) the shared database."""

    def __init__(self, private: ec.EllipticCurvePrivateKey) -> None:
        self._key = ECKey.import_key(private)
        pub = self._key.as_dict(private=False)
        self.kid = self._key.thumbprint()
        self.public_jwk: dict[str, str] = {"kty": "EC", "crv": "P-256", "x": cast(str, pub["x"]), "y": cast(str, pub["y"]),
                                           "alg": "ES256", "kid": self.kid}
        jwk = {k: v for k, v in self.public_jwk.items() if k != "kid"}
        self._header: dict[str, Any] = {"typ": "JWT", "alg": "ES256", "jwk": jwk, "kid": self.kid}

    @classmethod
    def load_or_create(cls, orm: OrmSession, box: SecretBox) -> TokenKey:
        row = orm.get(KeyMaterial, KEY_NAME)
        if row is None:
            private = ec.generate_private_key(ec.SECP256R1())
            der = private.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
            nonce, ct = box.seal("", "key:" + KEY_NAME, der)
            try:
                orm.add(KeyMaterial(name=KEY_NAME, nonce=nonce, ciphertext=ct, created_at=now_ms()))
                orm.commit()
                return cls(private)
            except IntegrityError:  # another replica created it first: use theirs
                orm.rollback()
                row = orm.execute(select(KeyMaterial).where(KeyMaterial.name == KEY_NAME)).scalar_one()
        der = box.open("", "key:" + KEY_NAME, row.nonce, row.ciphertext)
        stored = serialization.load_der_private_key(der, password=None)
        if not isinstance(stored, ec.EllipticCurvePrivateKey):
            raise TokenError("stored token key is not an EC key")
        return cls(stored)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [dict(self.public_jwk, use="sig")]}

    def sign(self, claims: dict[str, Any]) -> str:
        # A JWS over the claims' JSON: what jwt.encode writes, without its claims conversion
        # (a quarter of its cost per token; the claims here are built by ear_claims, plain JSON).
        return jws.serialize_compact(self._header, orjson.dumps(claims), self._key, algorithms=["ES256"])

    def verify(self, token: str, now: int | None = None) -> dict[str, Any]:
        """Claims of a token this broker signed and that has not expired; TokenError otherwise."""
        if not isinstance(token, str) or len(token) > TOKEN_MAX_LEN or token.count(".") != 2:
            raise TokenError("bearer token is not a JWT")
        try:
            decoded = jwt.decode(token, self._key, algorithms=["ES256"])
        except (JoseError, ValueError, TypeError) as exc:
            raise TokenError("bearer token signature does not verify with this broker's key") from exc
        claims = dict(decoded.claims)
        t = int(time.time()) if now is None else now
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if not isinstance(exp, int) or exp <= t:
            raise TokenError("bearer token has expired")
        if isinstance(nbf, int) and nbf > t:
            raise TokenError("bearer token is not valid yet")
        if claims.get("iss") != ISSUER or not isinstance(claims.get("jti"), str):
            raise TokenError("bearer token was not issued by this broker")
        return claims


def tee_pubkey_from_claims(claims: dict[str, Any]) -> dict[str, Any] | None:
    for path in TEE_PUBKEY_PATHS:
        node: Any = claims
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            return node
    return None


def ear_claims(*, session_id: str, status: str, trust_vector: dict[str, int], policy_id: str,
               runtime_data: dict[str, Any], report_data: bytes, init_data: Any, host_data: bytes,
               snp: dict[str, Any], ttl_s: int, developer: str = "firmgate") -> dict[str, Any]:
    iat = int(time.time())
    annotated: dict[str, Any] = {
        "init_data": host_data.hex() if init_data is not None else "",
        "init_data_claims": init_data if init_data is not None else {},
        "report_data": report_data.hex(),
        "runtime_data_claims": runtime_data,
        "snp": snp,
    }
    return {
        "eat_profile": EAT_PROFILE,
        "iat": iat,
        "exp": iat + ttl_s,
        "iss": ISSUER,
        "jti": session_id,
        "ear.verifier-id": {"developer": developer, "build": "firmgate-broker 0.1.0"},
        "submods": {"cpu0": {
            "ear.status": status,
            "ear.trustworthiness-vector": trust_vector,
            "ear.appraisal-policy-id": policy_id,
            "ear.veraison.annotated-evidence": annotated,
        }},
    }
