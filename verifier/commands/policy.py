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
            print(f"OK: {len(report.files)} policy file(s), tenants {', '.join(p.tenant for p in report.policies)}; "
                  f"{n_fw} firmware, {n_sh} shape rule(s), {n_se} secret(s)")
        else:
            print(f"FAIL: {len(report.errors)} error(s) in {len(report.files)} file(s)")
    return 0 if report.ok else 1
