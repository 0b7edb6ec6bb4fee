"""Broker configuration: defaults, then FIRMGATE_* environment, then the caller's mapping."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DEFAULTS: dict[str, Any] = {
    "DATABASE_URL": None,            # None: sqlite file firmgate.db in STATE_DIR
    "STATE_DIR": None,               # None: default_state_dir(); holds the default database and master key
    "POLICIES_DIR": "policies",
    "TRUST_ROOT_PEM": None,          # a simulated platform's root; trusted only when set
    "MEASURE_CACHE": None,           # directory for the reference-measurement cache; None: no cache
    "KDS_CACHE": None,               # directory for AMD KDS certificates; None: no KDS access
    "KDS_OFFLINE": True,             # True: only what is already in KDS_CACHE (no network)
    "MASTER_KEY": None,              # 32 bytes; or MASTER_KEY_FILE; or FIRMGATE_MASTER_KEY
    "MASTER_KEY_FILE": None,
    "OPERATOR_TOKEN": None,          # bearer token for tenant creation over the admin API
    "METRICS_TOKEN": None,           # bearer token for /metrics; None: the operator token; neither: open
    "SESSION_TTL": 300,              # seconds a session (its nonce, its cookie) lives: Trustee's 5 min
    "TOKEN_TTL": 300,                # EAR token lifetime
    "AUDIT_RETENTION_DAYS": 90,      # audit rows are deleted after this many days ...
    "AUTH_AUDIT_RETENTION_HOURS": 24,  # ... `auth` rows and operator-only denials (nothing verified) after this
    "MAX_CONTENT_LENGTH": 64 * 1024,  # every route, except the two below
    "ATTEST_MAX_BYTES": 12 * 1024 * 1024,  # an 8 MiB add-on in additional_evidence, 1.3 MiB for the rest
    "UPLOAD_MAX_BYTES": 16 * 1024 * 1024,  # firmware upload over the admin API
    "POLICY_LOAD_BACKGROUND": True,  # first policy load in a thread: loaded tenants serve while the rest load
    "POLICY_LOAD_WAIT": 30,          # seconds a request for a tenant still loading waits before a 503
    "APPRAISER": None,               # an appraisal.Appraiser; None: the real verifier over POLICIES_DIR
    "CONSOLE_ENABLED": True,         # the read-only web console at /console/ (docs/console.md)
    "CONSOLE_SESSION_TTL": 8 * 3600,  # seconds a console sign-in lasts
    "CONSOLE_COOKIE_SECURE": None,   # None: Secure when the request came over TLS; True behind a TLS proxy
}

# Environment variable -> (key, converter)
ENV: dict[str, tuple[str, Any]] = {
    "FIRMGATE_DB": ("DATABASE_URL", str),
    "FIRMGATE_STATE_DIR": ("STATE_DIR", str),
    "FIRMGATE_POLICIES": ("POLICIES_DIR", str),
    "FIRMGATE_TRUST_ROOT": ("TRUST_ROOT_PEM", str),
    "FIRMGATE_MEASURE_CACHE": ("MEASURE_CACHE", str),
    "FIRMGATE_KDS_CACHE": ("KDS_CACHE", str),
    "FIRMGATE_KDS_OFFLINE": ("KDS_OFFLINE", lambda v: v.lower() not in ("0", "false", "no")),
    "FIRMGATE_MASTER_KEY_FILE": ("MASTER_KEY_FILE", str),
    "FIRMGATE_OPERATOR_TOKEN": ("OPERATOR_TOKEN", str),
    "FIRMGATE_METRICS_TOKEN": ("METRICS_TOKEN", str),
    "FIRMGATE_SESSION_TTL": ("SESSION_TTL", int),
    "FIRMGATE_TOKEN_TTL": ("TOKEN_TTL", int),
    "FIRMGATE_POLICY_LOAD_BACKGROUND": ("POLICY_LOAD_BACKGROUND", lambda v: v.lower() not in ("0", "false", "no")),
    "FIRMGATE_POLICY_LOAD_WAIT": ("POLICY_LOAD_WAIT", float),
    "FIRMGATE_AUDIT_RETENTION_DAYS": ("AUDIT_RETENTION_DAYS", int),
    "FIRMGATE_AUTH_AUDIT_RETENTION_HOURS": ("AUTH_AUDIT_RETENTION_HOURS", int),
    "FIRMGATE_CONSOLE": ("CONSOLE_ENABLED", lambda v: v.lower() not in ("0", "false", "no")),
    "FIRMGATE_CONSOLE_SESSION_TTL": ("CONSOLE_SESSION_TTL", int),
    "FIRMGATE_CONSOLE_COOKIE_SECURE": ("CONSOLE_COOKIE_SECURE", lambda v: v.lower() not in ("0", "false", "no")),
}


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where the broker keeps its default SQLite file and master key: FIRMGATE_STATE_DIR, else
    $XDG_STATE_HOME/firmgate, else ~/.local/state/firmgate (XDG Base Directory spec). Never the
    source tree: a checkout is shared, copied and committed; the master key must not be."""
    env = os.environ if environ is None else environ
    if env.get("FIRMGATE_STATE_DIR"):
        return Path(env["FIRMGATE_STATE_DIR"])
    xdg = env.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "state"  # spec: relative is invalid
    return base / "firmgate"


def make_state_dir(path: str | os.PathLike[str]) -> Path:
    """Create the state directory (0700: it holds the master key) if it does not exist."""
    p = Path(path)
    p.mkdir(mode=0o700, parents=True, exist_ok=True)
    return p


def from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for var, (key, conv) in ENV.items():
        if env.get(var):
            out[key] = conv(env[var])
    return out
