"""HTTP errors as JSON problem details; never an HTML page, never a 500 for bad input.

KBS routes answer in Trustee's ErrorInformation shape, `{"type", "detail"}`,
with `type` = KBS_ERROR_BASE + variant (the guest parses both strings): 404 for
InvalidRequestPath / PluginNotFound, 401 for everything else (the guest then
re-attests). Other routes use RFC 9457 problem details with the same `type` and
`detail` plus `title` and `status`.
"""
from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify, request
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as SaTimeoutError
from werkzeug.exceptions import HTTPException

from verifier.errors import FirmgateError

KBS_ERROR_BASE = "https://github.com/confidential-containers/kbs/errors/"
FIRMGATE_ERROR_BASE = "https://github.com/firmgate/firmgate/errors/"
log = logging.getLogger(__name__)

# Trustee's status rule (kbs/src/error.rs): 404 for these, 401 for every other variant.
_KBS_404 = {"InvalidRequestPath", "PluginNotFound"}


class ApiError(Exception):
    """An error a handler raises on purpose: a variant name, a detail for the client, a status."""

    def __init__(self, variant: str, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.variant = variant
        self.detail = detail
        self.status = status if status is not None else (404 if variant in _KBS_404 else 401)

    def to_dict(self, kbs: bool) -> dict[str, Any]:
        base = KBS_ERROR_BASE if kbs else FIRMGATE_ERROR_BASE
        body: dict[str, Any] = {"type": base + self.variant, "detail": self.detail}
        if not kbs:
            body.update(title=self.variant, status=self.status)
        return body


def _is_kbs() -> bool:
    return request.path.startswith("/kbs/")


def _problem(err: ApiError) -> Response:
    resp = jsonify(err.to_dict(_is_kbs()))
    resp.status_code = err.status
    resp.mimetype = "application/json" if _is_kbs() else "application/problem+json"
    return resp


# Werkzeug status -> KBS variant, for errors raised before a handler runs.
_HTTP_VARIANTS = {404: "InvalidRequestPath", 405: "InvalidRequestPath", 413: "SerdeError", 400: "SerdeError",
                  411: "SerdeError"}


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(err: ApiError) -> Response:
        resp = _problem(err)
        if err.status == 503:  # could not decide yet (e.g. policies still loading): worth retrying
            resp.headers["Retry-After"] = "5"
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException) -> Response:
        code = err.code or 500
        if _is_kbs():
            # The guest only handles 200/401 on /auth and /attest and 401/404 on /resource.
            variant = _HTTP_VARIANTS.get(code, "HTTPFailed")
            # 404/405/413 keep their status (re-attesting fixes none of them); the rest are 401.
            status = code if code in (404, 405, 413) else 401
            resp = _problem(ApiError(variant, err.description or err.name, status))
            if code == 405 and getattr(err, "valid_methods", None):
                resp.headers["Allow"] = ", ".join(err.valid_methods)  # type: ignore[attr-defined]
            return resp
        resp = _problem(ApiError(err.name.replace(" ", ""), err.description or err.name, code))
        if code == 405 and getattr(err, "valid_methods", None):
            resp.headers["Allow"] = ", ".join(err.valid_methods)  # type: ignore[attr-defined]
        return resp

    @app.errorhandler(FirmgateError)
    def _firmgate_error(err: FirmgateError) -> Response:
        from .secretbox import SecretDecryptError
        if isinstance(err, SecretDecryptError):  # the broker's own data, not the client's input
            log.error("sealed data does not decrypt on %s %s: %s", request.method, request.path, err)
            return _problem(ApiError("HTTPFailed" if _is_kbs() else "InternalError",
                                     "internal error; see the broker log", 500))
        # Errors from the verifier that escaped a handler: the evidence or input was bad.
        return _problem(ApiError("AttestationError" if _is_kbs() else "BadInput", err.diagnostics(),
                                 401 if _is_kbs() else 400))

    @app.errorhandler(DBAPIError)
    @app.errorhandler(DisconnectionError)
    @app.errorhandler(SaTimeoutError)
    def _database_down(err: Exception) -> Response:
        # The database is unreachable or failed: not the client's fault, and worth retrying.
        log.warning("database error on %s %s: %s", request.method, request.path, type(err).__name__)
        resp = _problem(ApiError("StorageUnavailable" if not _is_kbs() else "HTTPFailed",
                                 "the broker's database is unavailable; retry later", 503))
        resp.headers["Retry-After"] = "2"
        return resp

    @app.errorhandler(Exception)
    def _unexpected(err: Exception) -> Response:
        # A bug, not bad input: log it with its traceback, tell the client nothing about internals.
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _problem(ApiError("HTTPFailed" if _is_kbs() else "InternalError",
                                 "internal error; see the broker log", 500))
