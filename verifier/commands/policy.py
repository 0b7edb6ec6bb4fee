"""`firmgate policy check PATH...`: validate owners' policy files, every error at once."""
from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("policy", help="owner policy files")
    psub = p.add_subparsers(dest="policy_command", metavar="ACTION")
    psub.required = True
    c = psub.add_parser("check", help="check policy files or directories; every error with file:line")
    c.add_argument("paths", nargs="+", metavar="PATH", help="a <tenant>.toml file or a directory of them")
    c.add_argument("--no-files", action="store_true",
                   help="do not read firmware files named in the policies (syntax and consistency only)")
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    c.set_defaults(func=check)
    e = psub.add_parser("export", help="write a tenant's reference table (firmware x shape -> MEASUREMENT, svn) "
                                       "as a CoRIM (AMD SEV-SNP profile) for other verifiers")
    e.add_argument("--corim", required=True, metavar="TENANT", help="the tenant whose table to export")
    e.add_argument("--policies", default="policies", metavar="FILE_OR_DIR",
                   help="the tenant's policy file, or a directory of them (default: ./policies)")
    e.add_argument("--key", metavar="PEM", help="sign it (COSE_Sign1, ES256/ES384) with this private key")
    e.add_argument("-o", "--output", required=True, metavar="OUT")
    e.set_defaults(func=export)


def check(args: argparse.Namespace) -> int:
    from ..appraise.check import check_paths
    from ..cli import print_json

    report = check_paths(args.paths, check_files=not args.no_files)
    if args.json:
        print_json({
            "ok": report.ok,
            "files": report.files,
            "tenants": [p.tenant for p in report.policies],
            "errors": [{"path": e.path, "line": e.line, "field": e.field, "reason": e.why} for e in report.errors],
        })
    else:
        for e in report.errors:
            print(e.diagnostics())
        if report.ok:
            n_fw = sum(len(p.firmware) for p in report.policies)
            n_sh = sum(len(p.shapes) for p in report.policies)
            n_se = sum(len(p.secrets) for p in report.policies)
            n_pub = sum(len(p.publishers) for p in report.policies)
            print(f"OK: {len(report.files)} policy file(s), tenants {', '.join(p.tenant for p in report.policies)}; "
                  f"{n_fw} firmware, {n_sh} shape rule(s), {n_se} secret(s)"
                  + (f", {n_pub} trusted publisher(s)" if n_pub else ""))
        else:
            print(f"FAIL: {len(report.errors)} error(s) in {len(report.files)} file(s)")
    return 0 if report.ok else 1


def export(args: argparse.Namespace) -> int:
    from ..appraise.store import load_for_cli
    from ..endorse.cose import load_private_key
    from ..endorse.export import export_bytes, rows_of, table_corim
    from .fileio import read_bounded, write_file

    loaded = load_for_cli(args.policies, args.corim)
    rows = rows_of(loaded)
    key = load_private_key(read_bounded(args.key, 16 * 1024, "key"), args.key) if args.key else None
    out = export_bytes(table_corim(loaded.tenant, loaded.policy_id, rows), key)
    write_file(args.output, out)
    n = sum(len(r[3]) for r in rows)
    missing = sorted(loaded.table.missing)
    print(f"wrote {args.output}: {len(rows)} firmware, {n} reference measurement(s) of tenant {loaded.tenant} "
          f"({loaded.policy_id}), {'signed' if key else 'unsigned'}"
          + (f"; without bytes (not exported): {', '.join(missing)}" if missing else ""))
    return 0
