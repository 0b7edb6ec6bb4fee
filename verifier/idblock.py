"""Owner-signed SEV-SNP ID blocks: the 96-byte ID block, the 4096-byte ID auth, and AMD's key format.

At SNP_LAUNCH_FINISH the host hands the PSP an ID block (SNP ABI rev 1.55,
Table 75: LD 48 bytes, FAMILY_ID 16, IMAGE_ID 16, VERSION u32 = 1, GUEST_SVN
u32, POLICY u64) and an ID auth structure (Table 76: ID_KEY_ALGO, AUTH_KEY_ALGO,
ID_BLOCK_SIG over the 96 bytes with the ID key, ID_KEY in AMD's 0x404-byte
public-key format (Table 138: CURVE u32 = 2 for P-384, QX and QY 72 bytes
little-endian), ID_KEY_SIG over that structure with the author key, AUTHOR_KEY).
Signatures are ECDSA P-384 with SHA-384, R and S 72 bytes little-endian (Table 136).
The PSP refuses the launch unless both signatures verify, LD equals the launch
digest and POLICY equals the guest policy; the report then carries
ID_KEY_DIGEST / AUTHOR_KEY_DIGEST = SHA-384 of the 0x404-byte key structures.

The ctypes layouts and the signing helpers are sevsnpmeasure.id_block's (pinned);
what it lacks (FAMILY_ID/IMAGE_ID/GUEST_SVN/POLICY inputs, parsing, verification)
is here. Every input is checked for size before it is sliced.
"""
from __future__ import annotations

import ctypes
import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from sevsnpmeasure import id_block as _sev

from .errors import FirmgateError

ID_BLOCK_SIZE = 0x60          # Table 75
ID_AUTH_SIZE = 0x1000         # Table 76
PUBKEY_SIZE = 0x404           # Table 138
SIG_SIZE = 0x200              # Table 136
ID_BLOCK_VERSION = 1
ALGO_ECDSA_P384_SHA384 = 1    # Table 76: ID_KEY_ALGO / AUTH_KEY_ALGO
CURVE_P384 = 2                # Table 138
_COORD = 0x48                 # QX / QY / R / S: 72 bytes little-endian
_P384_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973
# ID auth offsets (Table 76), from sevsnpmeasure's IdAuth layout
_OFF = {name: getattr(_sev.IdAuth, name).offset for name in
        ("id_key_algo", "auth_key_algo", "block_sig", "id_key", "id_key_sig", "author_key")}
if ctypes.sizeof(_sev.IdAuth) != ID_AUTH_SIZE or ctypes.sizeof(_sev.IdBlock) != ID_BLOCK_SIZE:
    raise ImportError("sevsnpmeasure.id_block's layouts are not SNP ABI Tables 75/76: check the pinned version")


class IdBlockError(FirmgateError):
    """An ID block whose signature, key or digest does not verify (exit 1: rejected)."""

    exit_code = 1


class IdBlockFormatError(IdBlockError):
    """An ID block, ID auth, key or ID-block set that is malformed (exit 2: bad input)."""

    exit_code = 2


@dataclass(frozen=True)
class IdBlock:
    """The 96-byte ID block (SNP ABI Table 75)."""

    launch_digest: bytes         # 48 bytes: the expected MEASUREMENT
    family_id: bytes = bytes(16)
    image_id: bytes = bytes(16)
    guest_svn: int = 0
    policy: int = 0x30000        # the guest policy the VM is launched with (must match exactly)
    version: int = ID_BLOCK_VERSION

    def pack(self) -> bytes:
        if len(self.launch_digest) != 48 or len(self.family_id) != 16 or len(self.image_id) != 16:
            raise IdBlockFormatError("ID block: launch digest is 48 bytes, FAMILY_ID and IMAGE_ID 16 bytes each")
        if not (0 <= self.guest_svn < 2**32 and 0 <= self.policy < 2**64 and 0 <= self.version < 2**32):
            raise IdBlockFormatError("ID block: GUEST_SVN and VERSION are u32, POLICY is u64")
        return (self.launch_digest + self.family_id + self.image_id
                + struct.pack("<IIQ", self.version, self.guest_svn, self.policy))

    @classmethod
    def from_bytes(cls, data: bytes) -> IdBlock:
        if len(data) != ID_BLOCK_SIZE:
            raise IdBlockFormatError(f"ID block is {len(data)} bytes; SNP ABI Table 75 says {ID_BLOCK_SIZE}")
        version, svn, policy = struct.unpack_from("<IIQ", data, 80)
        return cls(bytes(data[:48]), bytes(data[48:64]), bytes(data[64:80]), svn, policy, version)


def key_struct(pub: ec.EllipticCurvePublicKey) -> bytes:
    """AMD's 0x404-byte public-key structure for a P-384 key (Table 138)."""
    if not isinstance(pub.curve, ec.SECP384R1):
        raise IdBlockError(f"ID and author keys must be ECDSA P-384, not {pub.curve.name}")
    n = pub.public_numbers()
    return struct.pack("<I", CURVE_P384) + n.x.to_bytes(_COORD, "little") + n.y.to_bytes(_COORD, "little") \
        + bytes(PUBKEY_SIZE - 4 - 2 * _COORD)


def key_from_struct(data: bytes, what: str = "key") -> ec.EllipticCurvePublicKey:
    if len(data) != PUBKEY_SIZE:
        raise IdBlockFormatError(f"{what} is {len(data)} bytes; AMD's public-key structure is {PUBKEY_SIZE}")
    curve = struct.unpack_from("<I", data)[0]
    if curve != CURVE_P384:
        raise IdBlockFormatError(f"{what}: curve {curve} is not P-384 ({CURVE_P384})")
    if any(data[4 + 2 * _COORD:]):
        raise IdBlockFormatError(f"{what}: reserved bytes of the key structure are not zero")
    x = int.from_bytes(data[4:4 + _COORD], "little")
    y = int.from_bytes(data[4 + _COORD:4 + 2 * _COORD], "little")
    try:
        return ec.EllipticCurvePublicNumbers(x, y, ec.SECP384R1()).public_key()
    except ValueError as exc:
        raise IdBlockFormatError(f"{what} is not a point on P-384") from exc


def key_digest(pub: ec.EllipticCurvePublicKey) -> bytes:
    """SHA-384 of the key structure: what the report's ID_KEY_DIGEST / AUTHOR_KEY_DIGEST hold."""
    return hashlib.sha384(key_struct(pub)).digest()


def pem_key_digest(pem: str | bytes) -> bytes:
    """The digest of a P-384 public key (or the public half of a private key) given as PEM."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        if b"PRIVATE KEY" in data:
            priv = serialization.load_pem_private_key(data, password=None)
            pub = priv.public_key()
        else:
            pub = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise IdBlockFormatError("not a PEM EC public key") from exc
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise IdBlockFormatError("not an EC public key (ID and author keys are ECDSA P-384)")
    return key_digest(pub)


def load_private_key(pem: bytes, what: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise IdBlockFormatError(f"{what}: not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise IdBlockFormatError(f"{what}: ID and author keys must be ECDSA P-384")
    return key


def _verify(pub: ec.EllipticCurvePublicKey, sig: bytes, data: bytes) -> bool:
    r = int.from_bytes(sig[:_COORD], "little")
    s = int.from_bytes(sig[_COORD:2 * _COORD], "little")
    if not (0 < r < _P384_ORDER and 0 < s < _P384_ORDER) or any(sig[2 * _COORD:]):
        return False
    try:
        pub.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return False
    return True


def sign(block: IdBlock, id_key: ec.EllipticCurvePrivateKey,
         author_key: ec.EllipticCurvePrivateKey | None) -> tuple[bytes, bytes]:
    """(ID block, ID auth) as the owner hands them to the host. Without an author key the
    ID_KEY_SIG and AUTHOR_KEY fields stay zero (launch with author-key-enabled=off)."""
    raw = block.pack()
    auth = bytearray(ID_AUTH_SIZE)
    struct.pack_into("<II", auth, 0, ALGO_ECDSA_P384_SHA384, ALGO_ECDSA_P384_SHA384)
    id_struct = key_struct(id_key.public_key())
    auth[_OFF["block_sig"]:_OFF["block_sig"] + SIG_SIZE] = _sev.sign_in_snp_format(id_key, raw)
    auth[_OFF["id_key"]:_OFF["id_key"] + PUBKEY_SIZE] = id_struct
    if author_key is not None:
        auth[_OFF["id_key_sig"]:_OFF["id_key_sig"] + SIG_SIZE] = _sev.sign_in_snp_format(author_key, id_struct)
        auth[_OFF["author_key"]:_OFF["author_key"] + PUBKEY_SIZE] = key_struct(author_key.public_key())
    return raw, bytes(auth)


@dataclass(frozen=True)
class VerifiedIdBlock:
    block: IdBlock
    id_key_digest: bytes
    author_key_digest: bytes | None    # None: launched without an author key (AUTHOR_KEY_EN = 0)


def verify(block_bytes: bytes, auth_bytes: bytes, *, author_key_enabled: bool) -> VerifiedIdBlock:
    """What the PSP checks of the signatures at SNP_LAUNCH_FINISH; raises IdBlockError with the reason."""
    block = IdBlock.from_bytes(block_bytes)
    if block.version != ID_BLOCK_VERSION:
        raise IdBlockError(f"ID block VERSION is {block.version}; SNP ABI Table 75 requires {ID_BLOCK_VERSION}")
    if len(auth_bytes) != ID_AUTH_SIZE:
        raise IdBlockFormatError(f"ID auth is {len(auth_bytes)} bytes; SNP ABI Table 76 says {ID_AUTH_SIZE}")
    id_algo, auth_algo = struct.unpack_from("<II", auth_bytes, 0)
    if id_algo != ALGO_ECDSA_P384_SHA384:
        raise IdBlockError(f"ID_KEY_ALGO {id_algo} is not ECDSA P-384 with SHA-384 (1)")
    id_struct = auth_bytes[_OFF["id_key"]:_OFF["id_key"] + PUBKEY_SIZE]
    id_pub = key_from_struct(id_struct, "ID_KEY")
    if not _verify(id_pub, auth_bytes[_OFF["block_sig"]:_OFF["block_sig"] + SIG_SIZE], block_bytes):
        raise IdBlockError("ID_BLOCK_SIG does not verify with ID_KEY")
    author_digest: bytes | None = None
    if author_key_enabled:
        if auth_algo != ALGO_ECDSA_P384_SHA384:
            raise IdBlockError(f"AUTH_KEY_ALGO {auth_algo} is not ECDSA P-384 with SHA-384 (1)")
        author_struct = auth_bytes[_OFF["author_key"]:_OFF["author_key"] + PUBKEY_SIZE]
        author_pub = key_from_struct(author_struct, "AUTHOR_KEY")
        if not _verify(author_pub, auth_bytes[_OFF["id_key_sig"]:_OFF["id_key_sig"] + SIG_SIZE], id_struct):
            raise IdBlockError("ID_KEY_SIG does not verify with AUTHOR_KEY")
        author_digest = hashlib.sha384(author_struct).digest()
    return VerifiedIdBlock(block, hashlib.sha384(id_struct).digest(), author_digest)


def has_author_key(auth_bytes: bytes) -> bool:
    """Whether an ID auth carries an author key (then QEMU is told author-key-enabled=on)."""
    off = _OFF["author_key"]
    return len(auth_bytes) == ID_AUTH_SIZE and any(auth_bytes[off:off + PUBKEY_SIZE])
