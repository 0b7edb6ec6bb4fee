"""Admin API under /admin/v0: per-tenant bearer tokens; the operator token creates tenants.

A tenant token reaches only its own tenant's secrets and audit records; a
request naming another tenant's resource gets the same 404 as a missing one.
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from verifier.errors import FirmgateError, FirmwareError, TrustError

from . import audit, vault
from .errors import ApiError
from .firmware_store import store_firmware
from .limits import json_body, legacy_name, valid_resource, valid_tenant
from .state import get_orm, state

bp = Blueprint("admin", __name__, url_prefix="/admin/v0")


MAX_AUDIT_ID = 2**63 - 1


def _bearer() -> str:
    h = request.headers.get("Authorization", "")
    if h[:7].lower() != "bearer " or not h[7:].strip():
        raise ApiError("Unauthorized", "an API token is required (Authorization: Bearer ...)", 401)
    return h[7:].strip()


def _is_operator(token: str) -> bool:
    op = current_app.config.get("OPERATOR_TOKEN")
    if not op:
        return False
    # Hash both sides so the comparison is constant time regardless of length.
    return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), hashlib.sha256(str(op).encode()).digest())


def _tenant() -> str:
    tenant = vault.tenant_for_token(get_orm(), _bearer())
    if tenant is None:
        raise ApiError("Unauthorized", "invalid API token", 401)
    return tenant


def _caller() -> str | None:
    """The calling tenant, or None for the operator."""
    token = _bearer()
    if _is_operator(token):
        return None
    tenant = vault.tenant_for_token(get_orm(), token)
    if tenant is None:
        raise ApiError("Unauthorized", "invalid API token", 401)
    return tenant


@bp.post("/tenants")
def add_tenant() -> tuple[Response, int]:
    if not _is_operator(_bearer()):
        raise ApiError("Forbidden", "only the operator token may create tenants", 403)
    body = json_body("BadRequest", 400)
    name = body.get("name")
    if not valid_tenant(name):
        raise ApiError("BadRequest", "name must be 1-63 of a-z 0-9 _ -, starting with a letter or digit "
                       "(the policy file's rule)", 400)
    orm = get_orm()
    try:
        token = vault.add_tenant(orm, name)
    except vault.VaultError as exc:
        raise ApiError("Conflict", exc.diagnostics(), 409) from None
    audit.record(orm, event="admin", outcome="ok", reason="tenant created", tenant=name)
    return jsonify({"tenant": name, "token": token}), 201


def _path(repo: str, rtype: str, tag: str, tenant: str, legacy: bool = False) -> vault.ResourcePath:
    """The caller's resource path; `legacy`: also a name an older broker stored (removal only)."""
    ok = valid_resource(repo, rtype, tag) or (legacy and all(legacy_name(p) for p in (repo, rtype, tag)))
    if not ok or repo != tenant:
        raise ApiError("NotFound", "no such resource", 404)
    return vault.ResourcePath(repo, rtype, tag)


@bp.put("/secrets/<repo>/<rtype>/<tag>")
def put_secret(repo: str, rtype: str, tag: str) -> tuple[Response, int]:
    tenant = _tenant()
    path = _path(repo, rtype, tag, tenant)
    request.max_content_length = vault.MAX_SECRET_BYTES
    value = request.get_data(cache=False)
    if not value:
        raise ApiError("BadRequest", "the request body (the secret value) is empty", 400)
    orm = get_orm()
    replaced = vault.put_secret(orm, state().box, tenant, path, value)
    audit.record(orm, event="admin", outcome="ok", reason="secret replaced" if replaced else "secret stored",
                 tenant=tenant, resource=str(path))
    return jsonify({"path": str(path), "replaced": replaced}), 200 if replaced else 201


@bp.get("/secrets")
def list_secrets() -> Response:
    tenant = _tenant()
    return jsonify({"tenant": tenant, "secrets": vault.list_secrets(get_orm(), tenant)})


@bp.delete("/secrets/<repo>/<rtype>/<tag>")
def rm_secret(repo: str, rtype: str, tag: str) -> Response:
    tenant = _tenant()
    path = _path(repo, rtype, tag, tenant, legacy=True)
    orm = get_orm()
    if not vault.rm_secret(orm, tenant, path):
        raise ApiError("NotFound", "no such resource", 404)
    audit.record(orm, event="admin", outcome="ok", reason="secret removed", tenant=tenant, resource=str(path))
    return jsonify({"path": str(path), "removed": True})


ENDORSEMENT_MAX_BYTES = 64 * 1024   # verifier.endorse.corim.MAX_ENDORSEMENT_SIZE


@bp.post("/firmware")
def upload_firmware() -> tuple[Response, int]:
    tenant = _tenant()
    request.max_content_length = int(current_app.config["UPLOAD_MAX_BYTES"])
    blob = request.get_data(cache=False)
    if not blob:
        raise ApiError("BadRequest", "the request body (firmware image or UKI add-on) is empty", 400)
    orm = get_orm()
    st = state()
    try:
        # The caller's own policy must list it: whether some other tenant does is not the caller's
        # business, so "listed by someone else" and "listed by nobody" get the same answer.
        if st.appraiser is not None and not st.appraiser.lists_firmware(tenant, blob):
            digest = hashlib.sha384(blob).hexdigest()
            raise FirmwareError(f"firmware in the upload (sha384 of the upload {digest[:16]}...) is not allowed "
                                "by your policy: list its image's sha384 in your policy first")
        digests = store_firmware(st, orm, blob, source=f"tenant:{tenant}")
    except FirmgateError as exc:
        audit.record(orm, event="admin", outcome="denied", reason=f"firmware upload refused: {exc.diagnostics()}",
                     tenant=tenant)
        raise ApiError("FirmwareNotAllowed", exc.diagnostics(), 422) from None
    audit.record(orm, event="admin", outcome="ok", reason="firmware uploaded: " + ", ".join(digests),
                 tenant=tenant)
    return jsonify({"sha384": digests}), 201


@bp.post("/endorsements")
def upload_endorsement() -> tuple[Response, int]:
    """A firmware publisher's signed endorsement (CoRIM in COSE_Sign1), kept for the firmware it
    endorses; refused unless the caller's own policy trusts its signer (docs/endorsements.md)."""
    tenant = _tenant()
    request.max_content_length = ENDORSEMENT_MAX_BYTES
    blob = request.get_data(cache=False)
    if blob[:1] != b"\xd2":
        raise ApiError("BadRequest", "the request body must be an endorsement (a tagged COSE_Sign1)", 400)
    orm = get_orm()
    st = state()
    try:
        # As for firmware: the caller's own policy must trust the signer, so an upload cannot probe
        # whether some other tenant trusts a publisher (the same answer for "someone else" and "nobody").
        if st.appraiser is not None and not st.appraiser.trusts_endorsement(tenant, blob):
            raise TrustError("the endorsement is not signed by a publisher your policy trusts "
                             "(list the publisher under [[firmware.publishers]] first)")
        taken = store_firmware(st, orm, blob, source=f"tenant:{tenant}")
    except FirmgateError as exc:
        audit.record(orm, event="admin", outcome="denied", reason=f"endorsement refused: {exc.diagnostics()}",
                     tenant=tenant)
        raise ApiError("EndorsementNotTrusted", exc.diagnostics(), 422) from None
    audit.record(orm, event="admin", outcome="ok", reason="endorsement uploaded: " + ", ".join(taken), tenant=tenant)
    return jsonify({"endorsement": taken[0].removeprefix("endorsement:")}), 201


@bp.get("/audit")
def read_audit() -> Response:
    caller = _caller()
    try:
        after = int(request.args.get("after", "0"))
        limit = int(request.args.get("limit", "100"))
    except ValueError:
        raise ApiError("BadRequest", "after and limit must be integers", 400) from None
    # `after` is an audit row id: bound it to a signed 64-bit integer, the widest id column
    # SQLite and PostgreSQL hold (a larger value overflowed the driver: a 500).
    if not 1 <= limit <= 1000 or not 0 <= after <= MAX_AUDIT_ID:
        raise ApiError("BadRequest", f"limit must be 1..1000 and after 0..{MAX_AUDIT_ID}", 400)
    records: list[dict[str, Any]] = audit.read(get_orm(), caller, after, limit)
    return jsonify({"tenant": caller, "records": records})
