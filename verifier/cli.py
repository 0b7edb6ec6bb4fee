"""The `firmgate` command: argparse in, exit code out; no decisions here.

Sub-commands come from the `firmgate.commands` entry points (see
pyproject.toml), so broker, host_install and sim add theirs without the
verifier importing them. Each `register(subparsers)` adds parsers whose
`func(args) -> int` does the work.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any

from .errors import FirmgateError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2, as the contract says
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="firmgate", description="Attestation verifier and key broker for confidential VMs")
    parser.add_argument("--verbose", "-v", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for ep in sorted(entry_points(group="firmgate.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def run(func: Any, args: argparse.Namespace) -> int:
    """Run a command function under the one error contract."""
    try:
        return int(func(args))
    except FirmgateError as exc:
        if getattr(args, "verbose", False):
            raise
        print(f"error: {exc.diagnostics()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
