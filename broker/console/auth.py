"""Console sign-in: a tenant's API token (or the operator token) buys a signed session cookie.

The cookie holds who signed in and the SHA-256 of the token used, signed with a
random key kept in the database (sealed under the master key, like the EAR
token key), so every replica accepts it. It never holds the token. Every
request re-checks that the token still exists (a deleted token ends its
sessions at once) and that the signature is younger than CONSOLE_SESSION_TTL.

Cookie: HttpOnly, SameSite=Strict, Path=/console, Secure when the request came
over TLS (or CONSOLE_COOKIE_SECURE = True behind a TLS-terminating proxy).
Every page is a GET that changes nothing, so a forged cross-site request
gains nothing (and Strict keeps the cookie off it anyway); the two POSTs
(sign in, sign out) refuse a request a browser marks as cross-site, so another
site cannot sign a visitor into an account of its choosing.
"""
from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from flask import current_app, request
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as OrmSession
from werkzeug.wrappers import Response

from ..db import ApiToken, KeyMaterial, now_ms
from ..state import get_orm, state
from ..vault import tenant_for_token, token_hash

COOKIE = "firmgate-console"
COOKIE_PATH = "/console"
KEY_NAME = "console-session"
SALT = "firmgate-console-session-v1"
MAX_TOKEN_LEN = 200
MAX_COOKIE_LEN = 512


@dataclass(frozen=True)
class Viewer:
    """Who is looking: a tenant (sees only its own data) or the operator (tenant list, health)."""

    tenant: str | None
    token_sha256: str

    @property
    def is_operator(self) -> bool:
        return self.tenant is None


def _signing_key(orm: OrmSession) -> bytes:
    """The console's cookie-signing key: created once, shared through the database by every replica."""
    cache = current_app.extensions.setdefault("firmgate_console", {})
    key = cache.get("key")
    if isinstance(key, bytes):
        return key
    box = state().box
    row = orm.get(KeyMaterial, KEY_NAME)
    if row is None:
        fresh = secrets.token_bytes(32)
        nonce, ct = box.seal("", "key:" + KEY_NAME, fresh)
        try:
            orm.add(KeyMaterial(name=KEY_NAME, nonce=nonce, ciphertext=ct, created_at=now_ms()))
            orm.commit()
            cache["key"] = fresh
            return fresh
        except IntegrityError:  # another replica created it first: use theirs
            orm.rollback()
            row = orm.execute(select(KeyMaterial).where(KeyMaterial.name == KEY_NAME)).scalar_one()
    key = box.open("", "key:" + KEY_NAME, row.nonce, row.ciphertext)
    cache["key"] = key
    return key


def _serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(_signing_key(get_orm()), salt=SALT)


def _operator_hash() -> str | None:
    op = current_app.config.get("OPERATOR_TOKEN")
    return token_hash(str(op)) if op else None


def authenticate(token: str) -> Viewer | None:
    """The viewer a token signs in as, or None. Same answer time for any wrong token."""
    token = token.strip()
    if not token or len(token) > MAX_TOKEN_LEN:
        return None
    digest = token_hash(token)
    op = _operator_hash()
    if op is not None and hmac.compare_digest(digest, op):
        return Viewer(None, digest)
    tenant = tenant_for_token(get_orm(), token)
    return Viewer(tenant, digest) if tenant is not None else None


def _ttl() -> int:
    return int(current_app.config.get("CONSOLE_SESSION_TTL", 8 * 3600))


def current_viewer() -> Viewer | None:
    """The signed-in viewer of this request, re-checked against the token store; None if not signed in."""
    raw = request.cookies.get(COOKIE)
    if not raw or len(raw) > MAX_COOKIE_LEN:
        return None
    try:
        data = _serializer().loads(raw, max_age=_ttl())
    except BadSignature:  # includes SignatureExpired
        return None
    if not isinstance(data, dict):
        return None
    tenant, digest = data.get("t"), data.get("h")
    if not isinstance(digest, str) or not (tenant is None or isinstance(tenant, str)):
        return None
    if tenant is None:
        op = _operator_hash()
        return Viewer(None, digest) if op is not None and hmac.compare_digest(digest, op) else None
    row = get_orm().execute(select(ApiToken.tenant).where(ApiToken.token_sha256 == digest)).scalar_one_or_none()
    return Viewer(tenant, digest) if row is not None and hmac.compare_digest(row, tenant) else None


def _secure() -> bool:
    forced = current_app.config.get("CONSOLE_COOKIE_SECURE")
    return bool(forced) if forced is not None else request.is_secure


def set_session(resp: Response, viewer: Viewer) -> None:
    value = _serializer().dumps({"t": viewer.tenant, "h": viewer.token_sha256})
    resp.set_cookie(COOKIE, value, max_age=_ttl(), path=COOKIE_PATH, secure=_secure(), httponly=True,
                    samesite="Strict")


def clear_session(resp: Response) -> None:
    resp.delete_cookie(COOKIE, path=COOKIE_PATH, secure=_secure(), httponly=True, samesite="Strict")


def cross_site_post() -> bool:
    """True when a browser says this POST comes from another site (Fetch Metadata, else Origin)."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site not in ("same-origin", "none")
    origin = request.headers.get("Origin")
    if origin is None:
        return False  # not sent by a browser form on another site (browsers send Origin on POST)
    return origin.rstrip("/") != request.host_url.rstrip("/")
