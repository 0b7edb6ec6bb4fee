"""The OpenAPI 3.1 document served at /openapi.json (a test checks it lists exactly the app's routes)."""
from __future__ import annotations

from typing import Any

_ERR = {"$ref": "#/components/schemas/Error"}


def _err(desc: str) -> dict[str, Any]:
    """An RFC 9457 problem (admin and ops routes)."""
    return {"description": desc, "content": {"application/problem+json": {"schema": _ERR}}}


def _kerr(desc: str) -> dict[str, Any]:
    """Trustee's ErrorInformation (KBS routes: the guest expects application/json)."""
    return {"description": desc, "content": {"application/json": {"schema": _ERR}}}


def _json(schema: dict[str, Any], desc: str = "OK") -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {"schema": schema}}}


_BEARER: list[dict[str, list[str]]] = [{"apiToken": []}]
# The policy file's name rule (verifier.appraise.policy TENANT_RE, RESOURCE_PART_RE), anchored.
TENANT_PATTERN = "^[a-z0-9][a-z0-9_-]{0,62}$"
PART_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_RES_PARAMS = [{"name": n, "in": "path", "required": True,
                "schema": {"type": "string", "pattern": TENANT_PATTERN if n == "repository" else PART_PATTERN}}
               for n in ("repository", "type", "tag")]


def openapi_document(console: bool = True) -> dict[str, Any]:
    """The document; `console`: the app serves the web console (CONSOLE_ENABLED)."""
    doc = _document()
    if console:
        from .console import openapi_paths as console_paths
        doc["paths"].update(console_paths())
        doc["components"]["securitySchemes"]["consoleSession"] = {"type": "apiKey", "in": "cookie",
                                                                  "name": "firmgate-console"}
    return doc


def _document() -> dict[str, Any]:
    obj = {"type": "object"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "firmgate key broker", "version": "0.1.0",
                 "description": "Trustee KBS protocol 0.4.0 compatible key broker; see docs/protocol.md."},
        "paths": {
            "/kbs/v0/auth": {"post": {
                "summary": "Start a session: returns a nonce and sets the kbs-session-id cookie",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "$ref": "#/components/schemas/Request"}}}},
                "responses": {"200": _json({"$ref": "#/components/schemas/Challenge"}),
                              "401": _kerr("protocol version or tee not supported")}}},
            "/kbs/v0/attest": {"post": {
                "summary": "Send evidence bound to the nonce; returns the EAR token",
                "security": [{"sessionCookie": []}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "$ref": "#/components/schemas/Attestation"}}}},
                "responses": {"200": _json({"type": "object", "required": ["token"],
                                            "properties": {"token": {"type": "string"}}}),
                              "401": _kerr("evidence rejected, nonce replayed or session expired"),
                              "413": _kerr("request too large")}}},
            "/kbs/v0/resource/{repository}/{type}/{tag}": {"get": {
                "summary": "A secret as a flattened JWE to the attested tee-pubkey",
                "parameters": _RES_PARAMS,
                "security": [{"sessionCookie": []}, {"earToken": []}],
                "responses": {"200": _json({"$ref": "#/components/schemas/Jwe"}),
                              "401": _kerr("not attested, or the tenant's policy denies it"),
                              "404": _kerr("invalid resource path")}}},
            "/kbs/v0/jwks": {"get": {"summary": "Public key of the EAR token signer",
                                     "responses": {"200": _json({"$ref": "#/components/schemas/Jwks"})}}},
            "/.well-known/jwks.json": {"get": {"summary": "Same as /kbs/v0/jwks",
                                               "responses": {"200": _json({"$ref": "#/components/schemas/Jwks"})}}},
            "/healthz": {"get": {"summary": "Liveness and database reachability",
                                 "responses": {"200": _json(obj), "503": _err("database unreachable")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (text format 0.0.4); the metrics (else operator) "
                                            "token when one is configured",
                                 "security": [{"metricsToken": []}],
                                 "responses": {"200": {"description": "OK",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}},
                                               "401": _err("no or wrong metrics token")}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": _json(obj)}}},
            "/admin/v0/tenants": {"post": {
                "summary": "Create a tenant (operator token); returns its first API token",
                "security": _BEARER,
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["name"], "properties": {"name": {
                        "type": "string", "minLength": 1, "maxLength": 63,
                        "pattern": TENANT_PATTERN}}}}}},
                "responses": {"201": _json(obj), "400": _err("bad name"), "401": _err("no or bad token"),
                              "403": _err("not the operator"), "409": _err("exists"),
                              "411": _err("no Content-Length (a chunked body is refused)")}}},
            "/admin/v0/secrets": {"get": {"summary": "List the calling tenant's secrets (paths, no values)",
                                          "security": _BEARER,
                                          "responses": {"200": _json(obj), "401": _err("no or bad token")}}},
            "/admin/v0/secrets/{repository}/{type}/{tag}": {
                "put": {"summary": "Store a secret (body: the raw value); repository must be the tenant",
                        "parameters": _RES_PARAMS, "security": _BEARER,
                        "requestBody": {"required": True, "content": {"application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}}}},
                        "responses": {"200": _json(obj, "replaced"), "201": _json(obj, "created"),
                                      "400": _err("empty"), "401": _err("no or bad token"),
                                      "404": _err("not this tenant's"), "413": _err("too large")}},
                "delete": {"summary": "Remove a secret", "parameters": _RES_PARAMS, "security": _BEARER,
                           "responses": {"200": _json(obj), "401": _err("no or bad token"),
                                         "404": _err("no such resource")}}},
            "/admin/v0/firmware": {"post": {
                "summary": "Upload firmware bytes (image or UKI add-on) whose digest some policy allows",
                "security": _BEARER,
                "requestBody": {"required": True, "content": {"application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"}}}},
                "responses": {"201": _json(obj), "400": _err("empty"), "401": _err("no or bad token"),
                              "413": _err("too large"), "422": _err("no policy allows this firmware")}}},
            "/admin/v0/endorsements": {"post": {
                "summary": "Upload a firmware publisher's signed endorsement (CoRIM in COSE_Sign1) some policy trusts",
                "security": _BEARER,
                "requestBody": {"required": True, "content": {"application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"}}}},
                "responses": {"201": _json(obj), "400": _err("not an endorsement"), "401": _err("no or bad token"),
                              "413": _err("too large"), "422": _err("no policy trusts its signer")}}},
            "/admin/v0/audit": {"get": {
                "summary": "The calling tenant's audit records (the operator sees all)",
                "security": _BEARER,
                "parameters": [{"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}},
                               {"name": "limit", "in": "query",
                                "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}],
                "responses": {"200": _json(obj), "400": _err("bad query"), "401": _err("no or bad token")}}},
        },
        "components": {
            "securitySchemes": {
                "sessionCookie": {"type": "apiKey", "in": "cookie", "name": "kbs-session-id"},
                "earToken": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "apiToken": {"type": "http", "scheme": "bearer"},
                "metricsToken": {"type": "http", "scheme": "bearer"},
            },
            "schemas": {
                "Error": {"type": "object", "required": ["type", "detail"],
                          "properties": {"type": {"type": "string"}, "detail": {"type": "string"},
                                         "title": {"type": "string"}, "status": {"type": "integer"}}},
                "Request": {"type": "object", "required": ["version", "tee"],
                            "properties": {"version": {"const": "0.4.0"}, "tee": {"type": "string"},
                                           "extra-params": {}}},
                "Challenge": {"type": "object", "required": ["nonce", "extra-params"],
                              "properties": {"nonce": {"type": "string"}, "extra-params": {}}},
                "Attestation": {"type": "object", "required": ["runtime-data", "tee-evidence"], "properties": {
                    "init-data": {"type": ["object", "null"]},
                    "runtime-data": {"type": "object", "required": ["nonce", "tee-pubkey"],
                                     "properties": {"nonce": {"type": "string"}, "tee-pubkey": {"type": "object"}}},
                    "tee-evidence": {"type": "object", "required": ["primary_evidence"],
                                     "properties": {"primary_evidence": {"type": "object"},
                                                    "additional_evidence": {"type": "string"}}}}},
                "Jwe": {"type": "object", "required": ["protected", "encrypted_key", "iv", "ciphertext", "tag"],
                        "properties": {k: {"type": "string"} for k in
                                       ("protected", "encrypted_key", "iv", "ciphertext", "tag")}},
                "Jwks": {"type": "object", "required": ["keys"],
                         "properties": {"keys": {"type": "array", "items": {"type": "object"}}}},
            },
        },
    }
