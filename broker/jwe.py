"""The resource response: a flattened JWE to the guest's tee-pubkey (KBS-FACTS section 4).

Trustee guests recompute the AAD by re-serialising the protected header as
compact JSON with `alg`, `enc` first and the rest (here only `epk`, keys
sorted) after it, so the `protected` string is built in exactly that form.
joserfc recomputes the AAD from the parsed header in its key order, which gives
the same string, so joserfc decrypts it too (tests check both).

Key management uses the standard primitives: ECDH + Concat KDF (RFC 7518
4.6, empty apu/apv) + AES-256 key wrap (RFC 3394), or RSA-OAEP with SHA-256.
"""
from __future__ import annotations

import base64
import binascii
import json
import secrets
import struct
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from verifier.errors import EvidenceError

ECDH_ALG = "ECDH-ES+A256KW"
RSA_ALG = "RSA-OAEP-256"
ENC = "A256GCM"

# Curve name -> (cryptography curve, coordinate length in bytes). P-384 is firmgate's own
# client's; Trustee guests use P-256 (default) or P-521.
CURVES: dict[str, tuple[ec.EllipticCurve, int]] = {
    "P-256": (ec.SECP256R1(), 32),
    "P-384": (ec.SECP384R1(), 48),
    "P-521": (ec.SECP521R1(), 66),
}
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192


class TeeKeyError(EvidenceError):
    """The tee-pubkey in the runtime data is not a key firmgate can encrypt to."""


def b64url(data: bytes) -> str:
    """base64url without padding (the guest's URL_SAFE_NO_PAD rejects '=')."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    if not isinstance(text, str) or "=" in text:
        raise TeeKeyError("base64url value must be a string without padding")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise TeeKeyError("bad base64url value") from exc


def _int_field(jwk: dict[str, Any], name: str, max_len: int) -> bytes:
    val = jwk.get(name)
    if not isinstance(val, str) or not val or len(val) > max_len * 2:
        raise TeeKeyError(f"tee-pubkey field {name!r} is missing or too long")
    return b64url_decode(val)


def load_tee_pubkey(jwk: Any) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """Validate a guest JWK (only the forms KBS-FACTS section 4 lists) and load it."""
    if not isinstance(jwk, dict):
        raise TeeKeyError("tee-pubkey must be a JWK object")
    kty, alg = jwk.get("kty"), jwk.get("alg")
    if kty == "EC":
        if alg not in (None, ECDH_ALG):
            raise TeeKeyError(f"tee-pubkey alg {alg!r} is not {ECDH_ALG}")
        crv = jwk.get("crv")
        if not isinstance(crv, str) or crv not in CURVES:  # a JSON array/object is unhashable
            raise TeeKeyError(f"tee-pubkey curve {crv!r} is not one of {', '.join(CURVES)}")
        curve, size = CURVES[crv]
        x, y = _int_field(jwk, "x", size), _int_field(jwk, "y", size)
        if len(x) > size or len(y) > size:
            raise TeeKeyError(f"tee-pubkey coordinates are longer than {size} bytes")
        try:
            return ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"),
                                                 curve).public_key()
        except ValueError as exc:
            raise TeeKeyError("tee-pubkey is not a point on its curve") from exc
    if kty == "RSA":
        if alg not in (None, RSA_ALG):
            raise TeeKeyError(f"tee-pubkey alg {alg!r} is not {RSA_ALG}")
        n = int.from_bytes(_int_field(jwk, "n", MAX_RSA_BITS // 8), "big")
        e = int.from_bytes(_int_field(jwk, "e", 8), "big")
        if not MIN_RSA_BITS <= n.bit_length() <= MAX_RSA_BITS:
            raise TeeKeyError(f"tee-pubkey RSA modulus must be {MIN_RSA_BITS}..{MAX_RSA_BITS} bits")
        if e < 3 or e % 2 == 0:
            raise TeeKeyError("tee-pubkey RSA exponent is invalid")
        if n % 2 == 0:  # a product of two odd primes is odd; OpenSSL refuses to encrypt to an even one
            raise TeeKeyError("tee-pubkey RSA modulus is even: not an RSA key")
        try:
            key = rsa.RSAPublicNumbers(e, n).public_key()
            # One OAEP encryption now (a public-key operation: well under a millisecond at 4096 bits),
            # so that whatever else OpenSSL would refuse is refused here, at /attest, with a reason,
            # not as a failure at /resource (docs/security.md REVIEW-7).
            key.encrypt(b"\0" * 32, _OAEP)
        except ValueError as exc:
            raise TeeKeyError("tee-pubkey RSA key is invalid: OpenSSL cannot encrypt to it") from exc
        return key
    raise TeeKeyError(f"tee-pubkey kty {kty!r} is not supported (EC or RSA)")


def protected_header(alg: str, epk: dict[str, str] | None = None) -> str:
    """The exact header string: compact, `alg`, `enc`, then `epk` with sorted keys."""
    header: dict[str, Any] = {"alg": alg, "enc": ENC}
    if epk is not None:
        header["epk"] = {k: epk[k] for k in sorted(epk)}
    return json.dumps(header, separators=(",", ":"), ensure_ascii=True)


def concat_kdf(z: bytes) -> bytes:
    """The key-encryption key for ECDH-ES+A256KW from the shared secret `z` (the guest side uses it too)."""
    # RFC 7518 4.6.2: AlgorithmID = len32 || "ECDH-ES+A256KW", empty apu/apv, keydatalen 256.
    alg = ECDH_ALG.encode()
    other = struct.pack(">I", len(alg)) + alg + struct.pack(">I", 0) + struct.pack(">I", 0) + struct.pack(">I", 256)
    return ConcatKDFHash(algorithm=hashes.SHA256(), length=32, otherinfo=other).derive(z)


def encrypt(plaintext: bytes, jwk: dict[str, Any]) -> dict[str, str]:
    """Encrypt `plaintext` to the guest's key; returns the flattened JWE (no `aad`)."""
    key = load_tee_pubkey(jwk)
    cek = secrets.token_bytes(32)
    if isinstance(key, ec.EllipticCurvePublicKey):
        crv = jwk["crv"]
        curve, size = CURVES[crv]
        eph = ec.generate_private_key(curve)
        z = eph.exchange(ec.ECDH(), key)
        encrypted_key = aes_key_wrap(concat_kdf(z), cek)
        nums = eph.public_key().public_numbers()
        epk = {"crv": crv, "kty": "EC", "x": b64url(nums.x.to_bytes(size, "big")),
               "y": b64url(nums.y.to_bytes(size, "big"))}
        header = protected_header(ECDH_ALG, epk)
    else:
        encrypted_key = key.encrypt(cek, _OAEP)
        header = protected_header(RSA_ALG)
    protected = b64url(header.encode("ascii"))
    iv = secrets.token_bytes(12)
    sealed = AESGCM(cek).encrypt(iv, plaintext, protected.encode("ascii"))
    return {
        "protected": protected,
        "encrypted_key": b64url(encrypted_key),
        "iv": b64url(iv),
        "ciphertext": b64url(sealed[:-16]),
        "tag": b64url(sealed[-16:]),
    }
