"""Operations routes: health, Prometheus metrics, the OpenAPI document, the token JWKS."""
from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy import text

from . import metrics
from .db import SCHEMA_VERSION
from .errors import ApiError
from .openapi import openapi_document
from .state import app_state_summary, get_orm, state

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    try:
        get_orm().execute(text("SELECT 1"))
    except Exception:  # noqa: BLE001 - any database failure means "not healthy"
        raise ApiError("Unavailable", "database unreachable", 503) from None
    return jsonify({"status": "ok", "schema_version": SCHEMA_VERSION, **app_state_summary(state())})


@bp.get("/metrics")
def prometheus() -> Response:
    metrics.check_scrape_token()
    return Response(metrics.render(), content_type=metrics.content_type())


@bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(openapi_document(console="console" in current_app.blueprints))


@bp.get("/.well-known/jwks.json")
def well_known_jwks() -> Response:
    return jsonify(state().token_key.jwks())
