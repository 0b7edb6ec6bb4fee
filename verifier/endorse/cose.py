"""COSE_Sign1 (RFC 9052 section 4) with ECDSA: ES256 (P-256, SHA-256) and ES384 (P-384, SHA-384).

Why not a COSE library: the two maintained Python ones (pycose, cose) either pull
in a second crypto stack or are unmaintained; a Sign1 is four array elements and
one Sig_structure, written here over `cryptography` and `cbor2` (both already in
use) in under a hundred lines, with the checks a verifier owes made explicit:
- the algorithm comes from the PROTECTED header only, and must match the key's
  curve (no ES256 signature checked with a P-384 key, no algorithm confusion);
- the signature is the fixed-length r||s form (RFC 9053 2.1), not DER;
- `kid` is the SHA-256 of the signer's SubjectPublicKeyInfo DER, so a policy can
  pin a publisher by fingerprint alone.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from ..errors import SignatureError, UsageError
from .cbor import EndorsementFormatError, dumps, loads

COSE_SIGN1_TAG = 18          # RFC 9052 Table 1
HDR_ALG, HDR_CONTENT_TYPE, HDR_KID = 1, 3, 4   # RFC 9052 Table 3
ES256, ES384 = -7, -35       # RFC 9053 Table 1
ALGS: dict[int, tuple[str, type[ec.EllipticCurve], hashes.HashAlgorithm, int]] = {
    ES256: ("ES256", ec.SECP256R1, hashes.SHA256(), 32),
    ES384: ("ES384", ec.SECP384R1, hashes.SHA384(), 48),
}


def alg_for(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> int:
    for alg, (_, curve, _, _) in ALGS.items():
        if isinstance(key.curve, curve):
            return alg
    raise UsageError(f"key curve {key.curve.name} is not P-256 (ES256) or P-384 (ES384)")


def spki_der(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(key: ec.EllipticCurvePublicKey) -> bytes:
    """SHA-256 of the SubjectPublicKeyInfo DER: the COSE kid and the policy fingerprint."""
    return hashlib.sha256(spki_der(key)).digest()


def load_public_key(data: bytes, what: str) -> ec.EllipticCurvePublicKey:
    """A P-256 or P-384 public key from PEM (a PUBLIC KEY or a CERTIFICATE) or SPKI DER."""
    try:
        if b"-----BEGIN CERTIFICATE" in data:
            from cryptography import x509
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        elif data.lstrip().startswith(b"-----"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_der_public_key(data)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{what} is not a PEM/DER public key or certificate") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise UsageError(f"{what} is not an EC public key (ES256/ES384 need P-256 or P-384)")
    alg_for(key)
    return key


def load_private_key(data: bytes, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{what} is not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UsageError(f"{what} is not an EC private key (ES256/ES384 need P-256 or P-384)")
    alg_for(key)
    return key


def _sig_structure(protected: bytes, payload: bytes) -> bytes:
    # RFC 9052 4.4: ["Signature1", body_protected, external_aad, payload]
    return dumps(["Signature1", protected, b"", payload])


def sign1(key: ec.EllipticCurvePrivateKey, protected: dict[Any, Any], payload: bytes) -> bytes:
    """Tagged COSE_Sign1 over `payload`; alg and kid are added to the protected header."""
    alg = alg_for(key)
    _, _, digest, size = ALGS[alg]
    header = dict(protected)
    header[HDR_ALG] = alg
    header[HDR_KID] = key_id(key.public_key())
    prot = dumps(header)
    der = key.sign(_sig_structure(prot, payload), ec.ECDSA(digest))
    r, s = decode_dss_signature(der)
    sig = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    from cbor2 import CBORTag
    return dumps(CBORTag(COSE_SIGN1_TAG, [prot, {}, payload, sig]))


@dataclass(frozen=True)
class Sign1:
    """A COSE_Sign1 that parsed; its signature NOT yet checked."""

    protected: dict[Any, Any]
    protected_raw: bytes
    payload: bytes
    signature: bytes
    alg: int
    kid: bytes

    @property
    def alg_name(self) -> str:
        return ALGS[self.alg][0]

    def verify(self, key: ec.EllipticCurvePublicKey) -> None:
        """SignatureError unless `key` (whose curve must match the protected alg) made the signature."""
        _, curve, digest, size = ALGS[self.alg]
        if not isinstance(key.curve, curve):
            raise SignatureError(f"the endorsement says {self.alg_name}, but the publisher key is {key.curve.name}")
        if len(self.signature) != 2 * size:
            raise SignatureError(f"{self.alg_name} signature must be {2 * size} bytes, not {len(self.signature)}")
        r = int.from_bytes(self.signature[:size], "big")
        s = int.from_bytes(self.signature[size:], "big")
        try:
            key.verify(encode_dss_signature(r, s), _sig_structure(self.protected_raw, self.payload), ec.ECDSA(digest))
        except InvalidSignature:
            raise SignatureError("the endorsement's signature does not verify with the publisher key") from None


def parse_sign1(data: bytes, what: str, limit: int) -> Sign1:
    """Parse a tagged COSE_Sign1 (layout only: the signature is checked by Sign1.verify)."""
    from cbor2 import CBORTag
    item = loads(data, what, limit)
    if not isinstance(item, CBORTag) or item.tag != COSE_SIGN1_TAG:
        raise EndorsementFormatError(f"{what} is not a tagged COSE_Sign1 (CBOR tag 18)")
    v = item.value
    if not isinstance(v, list) or len(v) != 4:
        raise EndorsementFormatError(f"{what}: COSE_Sign1 must be an array of 4")
    prot_raw, unprot, payload, sig = v
    if not isinstance(prot_raw, bytes) or not isinstance(unprot, dict) or not isinstance(payload, bytes) \
            or not isinstance(sig, bytes):
        raise EndorsementFormatError(f"{what}: COSE_Sign1 must be [bstr, map, bstr, bstr] (detached payloads "
                                     "are not accepted)")
    prot = loads(prot_raw, f"{what} protected header", limit)
    if not isinstance(prot, dict):
        raise EndorsementFormatError(f"{what}: the protected header is not a map")
    alg, kid = prot.get(HDR_ALG), prot.get(HDR_KID)
    if isinstance(alg, bool) or alg not in ALGS:
        raise EndorsementFormatError(f"{what}: protected alg {alg!r} is not ES256 (-7) or ES384 (-35)")
    if not isinstance(kid, bytes) or len(kid) != 32:
        raise EndorsementFormatError(f"{what}: protected kid must be the 32-byte SHA-256 of the signer's key")
    # Nothing outside the signature may change the meaning: the unprotected header must be empty.
    if unprot:
        raise EndorsementFormatError(f"{what}: the unprotected header must be empty")
    return Sign1(prot, prot_raw, payload, sig, int(alg), kid)
