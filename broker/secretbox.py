"""Secret values at rest: AES-256-GCM under the broker's master key.

The master key is 32 bytes, from a file (raw 32 bytes, or 64 hex / 44 base64
characters) or from FIRMGATE_MASTER_KEY (hex or base64). Each value gets a fresh
random 96-bit nonce; the AAD binds it to its tenant and path, so a ciphertext
moved to another row does not decrypt.
"""
from __future__ import annotations

import base64
import binascii
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from verifier.errors import FirmgateError, UsageError

KEY_SIZE = 32
NONCE_SIZE = 12


class MasterKeyError(UsageError):
    """The master key is missing or not 32 bytes."""


class SecretDecryptError(FirmgateError):
    """A stored value did not authenticate: wrong master key, or the row was tampered with."""

    exit_code = 1


def parse_key_text(raw: bytes) -> bytes:
    """32 raw bytes, or 64 hex characters, or base64 of 32 bytes (surrounding whitespace ignored)."""
    if len(raw) == KEY_SIZE:
        return raw
    txt = raw.strip()
    if len(txt) == 2 * KEY_SIZE:
        try:
            return binascii.unhexlify(txt)
        except (binascii.Error, ValueError):
            pass
    try:
        key = base64.b64decode(txt, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_SIZE:
        raise MasterKeyError("master key must be 32 bytes (raw, 64 hex characters or base64)")
    return key


def load_master_key(path: str | None = None, env: str | None = None) -> bytes:
    """From `path` if given, else from the FIRMGATE_MASTER_KEY value `env`."""
    if path:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise MasterKeyError(f"cannot read master key file {path}: {exc.strerror}") from exc
        return parse_key_text(raw)
    if env is None:
        env = os.environ.get("FIRMGATE_MASTER_KEY")
    if not env:
        raise MasterKeyError("no master key: pass --master-key-file or set FIRMGATE_MASTER_KEY")
    return parse_key_text(env.encode())


def new_master_key() -> bytes:
    return secrets.token_bytes(KEY_SIZE)


def _aad(tenant: str, path: str) -> bytes:
    # NUL cannot occur in a tenant name or path (both validated), so the pair is unambiguous.
    return b"firmgate-secret-v1\0" + tenant.encode() + b"\0" + path.encode()


class SecretBox:
    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != KEY_SIZE:
            raise MasterKeyError("master key must be 32 bytes")
        self._aead = AESGCM(master_key)

    def seal(self, tenant: str, path: str, value: bytes) -> tuple[bytes, bytes]:
        nonce = secrets.token_bytes(NONCE_SIZE)
        return nonce, self._aead.encrypt(nonce, value, _aad(tenant, path))

    def open(self, tenant: str, path: str, nonce: bytes, ciphertext: bytes) -> bytes:
        try:
            return self._aead.decrypt(nonce, ciphertext, _aad(tenant, path))
        except InvalidTag as exc:
            raise SecretDecryptError(f"stored value for {path} does not decrypt (wrong master key?)") from exc
