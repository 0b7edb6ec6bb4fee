"""`firmgate serve`, `firmgate tenant add`, `firmgate secret put|list|rm`.

The tenant and secret commands work on the broker's database directly (the
operator's tools, run where the database and master key are); tenants use the
admin API with their token for the same operations.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from verifier.errors import UsageError


def _db_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", metavar="URL", default=os.environ.get("FIRMGATE_DB"),
                   help="SQLAlchemy URL (default: FIRMGATE_DB, else the SQLite file firmgate.db in the state "
                        "directory: FIRMGATE_STATE_DIR, else $XDG_STATE_HOME/firmgate, else "
                        "~/.local/state/firmgate; the master key defaults to master.key there)")
    p.add_argument("--master-key-file", metavar="F", default=os.environ.get("FIRMGATE_MASTER_KEY_FILE"),
                   help="32-byte master key file (or FIRMGATE_MASTER_KEY)")


def _state_dir() -> Path:
    # The same folder `create_app` uses for its default database and master key.
    from .config import default_state_dir, make_state_dir
    return make_state_dir(default_state_dir())


def _default_db() -> str:
    return "sqlite:///" + str(_state_dir() / "firmgate.db")


def _orm(args: argparse.Namespace) -> Any:
    from sqlalchemy.orm import sessionmaker

    from .db import make_engine, migrate
    engine = make_engine(args.db or _default_db())
    migrate(engine)
    return sessionmaker(engine, expire_on_commit=False)()


def _box(args: argparse.Namespace, orm: Any) -> Any:
    """The master key's box, checked against what the database holds sealed (as `serve` does):
    a wrong key is refused before it seals a value no broker can open, or removes a live one."""
    from . import vault
    from .secretbox import SecretBox, SecretDecryptError, load_master_key
    path = args.master_key_file
    if not path and not os.environ.get("FIRMGATE_MASTER_KEY") and not args.db:
        default = _state_dir() / "master.key"  # what `firmgate serve` creates by default
        path = str(default) if default.is_file() else None
    box = SecretBox(load_master_key(path))
    try:
        vault.check_master_key(orm, box)
    except SecretDecryptError:
        raise UsageError("the master key does not open this database's sealed data (wrong --master-key-file "
                         "or FIRMGATE_MASTER_KEY?); nothing was changed") from None
    return box


def cmd_serve(args: argparse.Namespace) -> int:
    from . import create_app
    cfg: dict[str, Any] = {"POLICIES_DIR": args.policies}
    if args.db:
        cfg["DATABASE_URL"] = args.db
    if args.trust_root:
        if not Path(args.trust_root).is_file():
            raise UsageError(f"--trust-root {args.trust_root}: no such file")
        cfg["TRUST_ROOT_PEM"] = args.trust_root
        print("warning: trusting the simulated root in " + args.trust_root + "; results based on it are "
              "not evidence of real AMD hardware", file=sys.stderr)
    if args.master_key_file:
        cfg["MASTER_KEY_FILE"] = args.master_key_file
    if args.session_ttl:
        cfg["SESSION_TTL"] = args.session_ttl
    if not Path(args.policies).is_dir():
        raise UsageError(f"--policies {args.policies}: no such directory")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a TCP port (0-65535)")
    from .devserver import bind, serve
    sock = bind(args.host, args.port)  # before the app exists: a port in use changes nothing on disk
    app = create_app(cfg)
    serve(sock, app, args.host, "firmgate serve: key broker on {url} (development server; production: "
          "gunicorn -c python:broker.gunicorn_conf 'broker:create_app()' as firmgate-broker.service, docs/host.md)")
    return 0


def cmd_tenant_add(args: argparse.Namespace) -> int:
    from . import audit, vault
    orm = _orm(args)
    token = vault.add_tenant(orm, args.tenant)
    audit.record(orm, event="admin", outcome="ok", reason="tenant created (cli)", tenant=args.tenant)
    print(f"tenant {args.tenant} created; its API token (shown once): ", file=sys.stderr)
    print(token)
    return 0


def _read_value(args: argparse.Namespace) -> bytes:
    """The value to store, read no further than one byte past the limit (the vault enforces it)."""
    from .vault import MAX_SECRET_BYTES

    if args.value is not None:
        return str(args.value).encode()
    if args.file:
        try:
            with open(args.file, "rb") as f:
                return f.read(MAX_SECRET_BYTES + 1)
        except OSError as exc:
            raise UsageError(f"cannot read {args.file}: {exc.strerror}") from exc
    return sys.stdin.buffer.read(MAX_SECRET_BYTES + 1)


def _require_tenant(orm: Any, tenant: str) -> None:
    from . import vault

    if not vault.tenant_exists(orm, tenant):
        raise UsageError(f"no tenant {tenant}: run `firmgate tenant add {tenant}` first")


def cmd_secret_put(args: argparse.Namespace) -> int:
    from . import audit, vault
    path = vault.ResourcePath.parse(args.path)
    value = _read_value(args)
    if not value:
        raise UsageError("empty secret value")
    orm = _orm(args)
    box = _box(args, orm)
    _require_tenant(orm, path.repo)
    replaced = vault.put_secret(orm, box, path.repo, path, value)
    audit.record(orm, event="admin", outcome="ok", reason="secret stored (cli)", tenant=path.repo,
                 resource=str(path))
    print(f"{'replaced' if replaced else 'stored'} {path}")
    return 0


def cmd_secret_list(args: argparse.Namespace) -> int:
    from verifier.cli import print_json

    from . import vault
    orm = _orm(args)
    _require_tenant(orm, args.tenant)  # the same answer as `secret put` for a tenant that does not exist
    rows = vault.list_secrets(orm, args.tenant)
    if args.json:
        print_json(rows)
    else:
        for r in rows:
            print(f"{r['path']}\t{r['size']} bytes")
    return 0


def cmd_secret_rm(args: argparse.Namespace) -> int:
    from . import audit, vault
    path = vault.ResourcePath.parse(args.path, legacy=True)  # an older broker's name can still be removed
    orm = _orm(args)
    _require_tenant(orm, path.repo)
    if not any(r["path"] == str(path) for r in vault.list_secrets(orm, path.repo)):
        raise UsageError(f"no secret {path}")
    _box(args, orm)  # the operator must hold the key of what they remove
    if not vault.rm_secret(orm, path.repo, path):
        raise UsageError(f"no secret {path}")
    audit.record(orm, event="admin", outcome="ok", reason="secret removed (cli)", tenant=path.repo,
                 resource=str(path))
    print(f"removed {path}")
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("serve", help="run the key broker (development server; production: gunicorn)",
                       description="Run the key broker on werkzeug's development server. Production: gunicorn "
                                   "'broker:create_app()' (firmgate-broker.service, docs/host.md).")
    p.add_argument("--policies", default=os.environ.get("FIRMGATE_POLICIES", "policies"), metavar="DIR",
                   help="the owners' policy repo checkout, one <tenant>.toml each "
                        "(default: %(default)s; env FIRMGATE_POLICIES)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default: %(default)s; 0: any free port)")
    p.add_argument("--trust-root", metavar="PEM", default=os.environ.get("FIRMGATE_TRUST_ROOT"),
                   help="also trust this (simulated) ARK; demos and tests only (env FIRMGATE_TRUST_ROOT)")
    p.add_argument("--session-ttl", type=int, metavar="S",
                   help="session and nonce lifetime in seconds (default: 300; env FIRMGATE_SESSION_TTL)")
    _db_args(p)
    p.set_defaults(func=cmd_serve)

    t = sub.add_parser("tenant", help="manage broker tenants")
    tsub = t.add_subparsers(dest="tenant_cmd", metavar="ACTION")
    tsub.required = True
    ta = tsub.add_parser("add", help="create a tenant and print its API token")
    ta.add_argument("tenant")
    _db_args(ta)
    ta.set_defaults(func=cmd_tenant_add)

    s = sub.add_parser("secret", help="manage a tenant's secrets")
    ssub = s.add_subparsers(dest="secret_cmd", metavar="ACTION")
    ssub.required = True
    sp = ssub.add_parser("put", help="store a secret at TENANT/TYPE/TAG")
    sp.add_argument("path", metavar="TENANT/TYPE/TAG")
    src = sp.add_mutually_exclusive_group()
    src.add_argument("--value", help="the value as text (else --file, else stdin)")
    src.add_argument("--file", metavar="F")
    _db_args(sp)
    sp.set_defaults(func=cmd_secret_put)
    sl = ssub.add_parser("list", help="list a tenant's secrets (no values)")
    sl.add_argument("tenant")
    sl.add_argument("--json", action="store_true")
    _db_args(sl)
    sl.set_defaults(func=cmd_secret_list)
    sr = ssub.add_parser("rm", help="remove a secret")
    sr.add_argument("path", metavar="TENANT/TYPE/TAG")
    _db_args(sr)
    sr.set_defaults(func=cmd_secret_rm)
