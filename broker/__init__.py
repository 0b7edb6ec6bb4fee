"""firmgate key broker (Trustee KBS protocol 0.4.0 compatible).

`create_app(test_config)` is the application factory; production runs it under
gunicorn: `gunicorn -c python:broker.gunicorn_conf -w 4 -b 0.0.0.0:8080 'broker:create_app()'` with FIRMGATE_*
environment variables (see docs/protocol.md), development via `firmgate serve`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask

from .config import DEFAULTS, from_env

__all__ = ["create_app"]


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_mapping(DEFAULTS)
    app.config.from_mapping(from_env())
    if test_config is not None:
        app.config.from_mapping(test_config)
    # No 308 redirects (HTML bodies) for "//" or a missing trailing slash: such paths are 404s.
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    from .json_provider import OrjsonProvider
    app.json = OrjsonProvider(app)  # insertion order kept: JWE/JWKS members stay as built

    from . import admin, errors, kbs, metrics, ops, state
    errors.register_error_handlers(app)
    state.init_app(app)
    metrics.init_app(app)
    app.register_blueprint(kbs.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(ops.bp)
    if app.config.get("CONSOLE_ENABLED", True):
        from . import console
        app.register_blueprint(console.bp)
    return app
