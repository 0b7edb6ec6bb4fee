"""A read-only web console: what the broker decided, for one tenant at a time.

`/console/` signs in with a tenant's API token and shows only that tenant's
policy in force and reference table, attestations and releases with each
verdict's checks, secrets (names and sizes, never values) and an hourly chart;
the operator token sees the tenant list and the broker's health. Server-rendered
Jinja templates, no JavaScript. docs/console.md has screenshots.
"""
from __future__ import annotations

from typing import Any

from . import views as _views  # noqa: F401 - registers the routes on bp
from .blueprint import bp

__all__ = ["bp", "openapi_paths"]


def _html(desc: str) -> dict[str, Any]:
    return {"description": desc, "content": {"text/html": {"schema": {"type": "string"}}}}


def _problem(desc: str) -> dict[str, Any]:
    return {"description": desc, "content": {"application/problem+json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}}


_COOKIE: list[dict[str, list[str]]] = [{"consoleSession": []}]


def openapi_paths() -> dict[str, Any]:
    """The console's routes for /openapi.json (HTML pages; the session cookie is set by /console/login)."""
    page = {"200": _html("the page"), "401": _html("not signed in: the sign-in form"),
            "403": _html("the operator token does not see tenants' pages")}
    return {
        "/console/": {"get": {"summary": "Console: sign-in form, or the signed-in tenant's (operator's) overview",
                              "security": [{}, *_COOKIE], "responses": {"200": _html("the page")}}},
        "/console/login": {"post": {
            "summary": "Console sign-in with an API token; sets the console session cookie",
            "requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {
                "type": "object", "required": ["token"], "properties": {"token": {"type": "string"}}}}}},
            "responses": {"303": {"description": "signed in: go to /console/"},
                          "401": _html("wrong token: the sign-in form"), "403": _html("cross-site request"),
                          "413": _problem("request too large")}}},
        "/console/logout": {"post": {"summary": "Console sign-out (clears the session cookie)",
                                     "responses": {"303": {"description": "signed out"},
                                                   "403": _html("cross-site request")}}},
        "/console/policy": {"get": {"summary": "Console: the policy in force and its reference measurement table",
                                    "security": _COOKIE, "responses": page}},
        "/console/activity": {"get": {
            "summary": "Console: recent attestations, releases and denials with each verdict's checks",
            "security": _COOKIE,
            "parameters": [
                {"name": "outcome", "in": "query", "schema": {"enum": ["all", "ok", "denied"]}},
                {"name": "event", "in": "query", "schema": {"enum": ["all", "attest", "release", "deny", "admin"]}},
                {"name": "since", "in": "query", "schema": {"enum": ["1h", "24h", "7d", "30d", "all"]}},
                {"name": "before", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                             "maximum": 2**63 - 1}}],
            "responses": {**page, "400": _html("a filter is not one of the offered choices")}}},
        "/console/secrets": {"get": {"summary": "Console: the tenant's secrets (names, sizes, last release)",
                                     "security": _COOKIE, "responses": page}},
        "/console/style.css": {"get": {"summary": "Console stylesheet", "responses": {"200": {
            "description": "OK", "content": {"text/css": {"schema": {"type": "string"}}}}}}},
    }
