"""Tenants, their admin API tokens, and their secrets (sealed with the master key).

Used by the admin API and by `firmgate tenant|secret` alike. A tenant only ever
reaches rows whose `tenant` column is its own name: every query filters on it.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, select
from sqlalchemy.engine import Connection, CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as OrmSession

from verifier.errors import UsageError

from .db import ApiToken, KeyMaterial, Secret, Tenant, now_ms
from .limits import legacy_name, valid_resource, valid_tenant
from .secretbox import SecretBox

TOKEN_PREFIX = "fgt_"
# The one limit on a secret value, for the admin API and `firmgate secret put` alike (docs/protocol.md).
MAX_SECRET_BYTES = 1024 * 1024


class VaultError(UsageError):
    pass


@dataclass(frozen=True)
class ResourcePath:
    repo: str
    type: str
    tag: str

    @classmethod
    def parse(cls, text: str, legacy: bool = False) -> ResourcePath:
        """`legacy`: also accept a name an older broker stored (to list or remove it, never to create)."""
        parts = text.split("/")
        ok = len(parts) == 3 and (valid_resource(*parts) or (legacy and all(legacy_name(p) for p in parts)))
        if not ok:
            raise VaultError(f"resource path {text!r} must be TENANT/TYPE/TAG: a tenant name (a-z 0-9 _ -) "
                             "and two parts of [A-Za-z0-9._-], each starting with a letter or digit")
        return cls(*parts)

    def __str__(self) -> str:
        return f"{self.repo}/{self.type}/{self.tag}"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add_tenant(orm: OrmSession, name: str) -> str:
    """Create tenant `name` and return its first API token (shown once, stored hashed)."""
    if not valid_tenant(name):
        raise VaultError(f"tenant name {name!r} must be 1-63 of a-z 0-9 _ -, starting with a letter or digit "
                         "(the policy file's rule)")
    try:
        orm.add(Tenant(name=name, created_at=now_ms()))
        orm.flush()
    except IntegrityError as exc:
        orm.rollback()
        raise VaultError(f"tenant {name} already exists") from exc
    token = new_token(orm, name, commit=False)
    orm.commit()
    return token


def new_token(orm: OrmSession, tenant: str, commit: bool = True) -> str:
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    orm.add(ApiToken(tenant=tenant, token_sha256=token_hash(token), created_at=now_ms()))
    if commit:
        orm.commit()
    return token


def tenant_exists(orm: OrmSession, name: str) -> bool:
    return orm.get(Tenant, name) is not None


def tenant_for_token(orm: OrmSession, token: str) -> str | None:
    """The tenant owning `token`, or None. The lookup is by hash; the final compare is constant time."""
    if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    digest = token_hash(token)
    row = orm.execute(select(ApiToken).where(ApiToken.token_sha256 == digest)).scalar_one_or_none()
    if row is None or not hmac.compare_digest(row.token_sha256, digest):
        return None
    return row.tenant


def put_secret(orm: OrmSession, box: SecretBox, tenant: str, path: ResourcePath, value: bytes) -> bool:
    """Store (or replace) a secret; returns True if it replaced one."""
    if path.repo != tenant:
        raise VaultError(f"resource repository {path.repo!r} is not tenant {tenant!r}")
    if len(value) > MAX_SECRET_BYTES:
        raise VaultError(f"secret value is {len(value)} bytes; at most {MAX_SECRET_BYTES} (1 MiB)")
    nonce, ct = box.seal(tenant, str(path), value)
    t = now_ms()
    row = orm.execute(select(Secret).where(Secret.tenant == tenant, Secret.path == str(path))).scalar_one_or_none()
    if row is None:
        orm.add(Secret(tenant=tenant, path=str(path), nonce=nonce, ciphertext=ct, created_at=t, updated_at=t))
    else:
        row.nonce, row.ciphertext, row.updated_at = nonce, ct, t
    orm.commit()
    return row is not None


# Built once from the table's columns: /resource runs it on every release (ORM attributes would
# send it through the ORM's compile path each time).
_S = cast(Table, Secret.__table__)
_GET_SECRET = select(_S.c.nonce, _S.c.ciphertext).where(_S.c.tenant == bindparam("tenant"), _S.c.path == bindparam("path"))


def get_secret(db: Connection | OrmSession, box: SecretBox, tenant: str, path: ResourcePath) -> bytes | None:
    """The secret's value (None if there is none); `db` is a Core Connection or an ORM Session."""
    if path.repo != tenant:
        return None
    row = db.execute(_GET_SECRET, {"tenant": tenant, "path": str(path)}).first()
    return None if row is None else box.open(tenant, str(path), row.nonce, row.ciphertext)


def open_secret(box: SecretBox, tenant: str, path: ResourcePath, nonce: bytes | None,
                ciphertext: bytes | None) -> bytes | None:
    """A sealed value read along with something else (/resource reads it with the session); None if absent."""
    if path.repo != tenant or nonce is None or ciphertext is None:
        return None
    return box.open(tenant, str(path), bytes(nonce), bytes(ciphertext))


def check_master_key(orm: OrmSession, box: SecretBox) -> None:
    """Raise SecretDecryptError unless `box` opens this database's sealed data: the token key if the
    broker ever ran on it, else one stored secret; a database with neither accepts any key. Every
    operator command that writes or removes sealed data calls it first, as `serve` does."""
    from .tokens import KEY_NAME
    key = orm.get(KeyMaterial, KEY_NAME)
    if key is not None:
        box.open("", "key:" + KEY_NAME, key.nonce, key.ciphertext)
        return
    one = orm.execute(select(Secret).order_by(Secret.tenant, Secret.path).limit(1)).scalar()
    if one is not None:
        box.open(one.tenant, one.path, one.nonce, one.ciphertext)


def list_secrets(orm: OrmSession, tenant: str) -> list[dict[str, object]]:
    rows = orm.execute(select(Secret).where(Secret.tenant == tenant).order_by(Secret.path)).scalars()
    return [{"path": r.path, "size": len(r.ciphertext) - 16, "updated_at_ms": r.updated_at} for r in rows]


def rm_secret(orm: OrmSession, tenant: str, path: ResourcePath) -> bool:
    res = orm.execute(delete(Secret).where(Secret.tenant == tenant, Secret.path == str(path)))
    orm.commit()
    return bool(cast("CursorResult[Any]", res).rowcount)  # a DELETE returns a CursorResult
