"""The guest's ephemeral key pair (one per run) and decryption of the broker's resource JWE.

Key forms follow the Trustee guest (KBS-FACTS section 4): P-256 by default,
P-521 and RSA-OAEP-256 (2048 bits) as it offers; P-384 for firmgate's own broker.
Decryption validates the flattened JWE the way the real guest does (fields
present, base64url without padding, `alg` matching the key, `epk` on our curve
with exact-length coordinates, the `protected` string equal to the guest's
re-serialisation) and then lets joserfc do the JOSE work.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, cast

from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, RSAKey

from .errors import BadResponse

KEY_TYPES = {"p256": "P-256", "p384": "P-384", "p521": "P-521", "rsa": "RSA"}
COORD_SIZE = {"P-256": 32, "P-384": 48, "P-521": 66}
ECDH_ALG = "ECDH-ES+A256KW"
RSA_ALG = "RSA-OAEP-256"
ENC = "A256GCM"
JWE_FIELDS = ("protected", "encrypted_key", "iv", "ciphertext", "tag")
MAX_JWE_FIELD = 4 * 1024 * 1024   # a resource is a key or a small file; the broker caps secrets at 1 MiB


@dataclass(frozen=True)
class TeeKey:
    """One run's key pair; `jwk` is exactly what goes into runtime-data.tee-pubkey."""

    kind: str                      # "P-256" | "P-384" | "P-521" | "RSA"
    key: ECKey | RSAKey
    jwk: dict[str, str]

    @classmethod
    def generate(cls, key_type: str = "p256") -> TeeKey:
        kind = KEY_TYPES.get(key_type)
        if kind is None:
            raise ValueError(f"key type {key_type!r} is not one of {', '.join(KEY_TYPES)}")
        if kind == "RSA":
            rkey = RSAKey.generate_key(2048, private=True)
            pub = rkey.as_dict(private=False)
            return cls(kind, rkey, {"kty": "RSA", "alg": RSA_ALG, "n": cast(str, pub["n"]), "e": cast(str, pub["e"])})
        ekey = ECKey.generate_key(kind, private=True)
        pub = ekey.as_dict(private=False)
        # Only kty/crv/alg/x/y: the server re-serialises the typed key and hashes that (KBS-FACTS section 3).
        return cls(kind, ekey, {"kty": "EC", "crv": kind, "alg": ECDH_ALG, "x": cast(str, pub["x"]), "y": cast(str, pub["y"])})

    def decrypt(self, body: Any) -> bytes:
        """The plaintext of the broker's flattened JWE, after the checks the Trustee guest makes."""
        header = validate_jwe(body, self)
        alg = header["alg"]
        try:
            obj = jwe.decrypt_json(cast(jwe.FlattenedJSONSerialization, {k: body[k] for k in JWE_FIELDS}), self.key, algorithms=[alg, ENC])
        except (JoseError, ValueError, KeyError, TypeError) as exc:
            raise BadResponse(f"resource JWE does not decrypt with this run's key: {exc}") from None
        return bytes(obj.plaintext or b"")


def _b64url(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or len(value) > MAX_JWE_FIELD:
        raise BadResponse(f"resource JWE: {what} must be a base64url string")
    if "=" in value:  # the Rust guest decodes with URL_SAFE_NO_PAD, which refuses padding
        raise BadResponse(f"resource JWE: {what} is padded base64url (the protocol forbids '=')")
    try:
        return base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise BadResponse(f"resource JWE: {what} is not base64url") from None


def validate_jwe(body: Any, key: TeeKey) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadResponse("resource answer is not a JSON object (expected a flattened JWE)")
    for name in JWE_FIELDS:
        if name not in body:
            raise BadResponse(f"resource JWE has no {name!r} (the guest requires all of {', '.join(JWE_FIELDS)})")
    raw_header = _b64url(body["protected"], "protected")
    for name in JWE_FIELDS[1:]:
        _b64url(body[name], name)
    if len(_b64url(body["iv"], "iv")) != 12:
        raise BadResponse("resource JWE: iv must be 12 bytes (AES-GCM)")
    if len(_b64url(body["tag"], "tag")) != 16:
        raise BadResponse("resource JWE: tag must be 16 bytes (AES-GCM)")
    try:
        header = json.loads(raw_header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadResponse("resource JWE: protected header is not JSON") from None
    if not isinstance(header, dict):
        raise BadResponse("resource JWE: protected header is not a JSON object")
    alg, enc = header.get("alg"), header.get("enc")
    if enc != ENC:
        raise BadResponse(f"resource JWE: enc is {enc!r}; the guest decrypts only {ENC}")
    if key.kind == "RSA":
        if alg != RSA_ALG:
            raise BadResponse(f"resource JWE: alg {alg!r} does not match this run's RSA key ({RSA_ALG})")
    else:
        if alg != ECDH_ALG:
            raise BadResponse(f"resource JWE: alg {alg!r} does not match this run's EC key ({ECDH_ALG})")
        epk = header.get("epk")
        if not isinstance(epk, dict) or epk.get("kty") != "EC":
            raise BadResponse("resource JWE: epk must be an EC public key")
        if epk.get("crv") != key.kind:
            raise BadResponse(f"resource JWE: epk curve {epk.get('crv')!r} is not this run's curve {key.kind}")
        for c in ("x", "y"):
            if len(_b64url(epk.get(c), f"epk.{c}")) != COORD_SIZE[key.kind]:
                raise BadResponse(f"resource JWE: epk.{c} must be {COORD_SIZE[key.kind]} bytes on {key.kind}")
    # The guest recomputes the AAD from its own re-serialisation of the header: a different string fails there.
    if guest_reserialisation(header) != raw_header.decode("utf-8"):
        raise BadResponse("resource JWE: protected header is not serialised as the guest re-serialises it "
                          "(compact; alg, enc, then the rest sorted): a Trustee guest would fail its AAD check")
    return header


def _sorted_deep(v: Any) -> Any:
    return {k: _sorted_deep(v[k]) for k in sorted(v)} if isinstance(v, dict) else v


def guest_reserialisation(header: dict[str, Any]) -> str:
    """kbs-types ProtectedHeader re-serialised: compact, `alg`, `enc`, then the rest sorted (nested keys sorted)."""
    ordered: dict[str, Any] = {"alg": header.get("alg"), "enc": header.get("enc")}
    for k in sorted(header):
        if k not in ("alg", "enc"):
            ordered[k] = _sorted_deep(header[k])
    return json.dumps(ordered, separators=(",", ":"), ensure_ascii=False)
