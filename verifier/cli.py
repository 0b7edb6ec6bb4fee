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
import os
import sys
import textwrap
import traceback
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any

from .errors import FirmgateError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2, as the contract says
        self.exit(2, f"{self.prog}: error: {message}\n")


# `firmgate --help` lists the commands by who runs them (the README follows the same order). The
# commands come from entry points; one this table does not name is listed under "other".
ROLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("relying party: verify evidence", ("verify", "report")),
    ("owner: firmware and policy", ("addon", "measure", "igvm-from-ovmf", "idblock", "endorse", "policy")),
    ("broker operator", ("serve", "tenant", "secret")),
    ("host operator (also the `host-install` command)", ("host-install",)),
    ("guest (inside the VM)", ("guest",)),
    ("try it on this machine", ("demo",)),
)


def _grouped_commands(sub: argparse._SubParsersAction[Any]) -> str:
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    named = {c for _, cmds in ROLES for c in cmds}
    groups = [*ROLES, ("other", tuple(sorted(c for c in helps if c not in named)))]
    width = max(len(c) for c in helps) + 2
    lines = ["commands, by who runs them:"]
    for title, cmds in groups:
        present = [c for c in cmds if c in helps]
        if not present:
            continue
        lines.append(f"  {title}")
        for c in present:
            text = textwrap.wrap(helps[c], 76 - width) or [""]
            lines.append(f"    {c.ljust(width)}{text[0]}")
            lines += [f"    {' ' * width}{t}" for t in text[1:]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    epilog = textwrap.fill("`firmgate COMMAND --help` for a command's options. Exit codes: 0 ok, 1 rejected, "
                           "2 bad input or usage, 3 could not decide (a needed service unreachable).", 78)
    parser = _Parser(prog="firmgate", usage="firmgate [-h] [--verbose] COMMAND ...",
                     description="Attestation verifier and key broker for confidential VMs",
                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog)
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="also show debug logs and the traceback of an error (the exit code stays the same)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, help=argparse.SUPPRESS)
    sub.required = True
    for ep in sorted(entry_points(group="firmgate.commands"), key=lambda e: e.name):
        ep.load()(sub)
    parser.description = f"{parser.description}\n\n{_grouped_commands(sub)}"
    return parser


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


# A reader that stopped early (`| head`): the command ends quietly, as other Unix tools do when
# SIGPIPE kills them (the shell shows 128 + 13). SIGPIPE itself stays ignored: a server or client
# writing to a closed socket must get an error, not die.
EXIT_BROKEN_PIPE = 141


def _stdout_gone() -> int:
    try:  # further writes (and the interpreter's flush at exit) go nowhere instead of raising again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


def run(func: Any, args: argparse.Namespace) -> int:
    """Run a command function under the one error contract.

    --verbose adds the traceback before the error line; it never changes the exit code.
    """
    try:
        code = int(func(args))
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at interpreter exit
        return code
    except BrokenPipeError:
        return _stdout_gone()
    except FirmgateError as exc:
        if getattr(args, "verbose", False):
            traceback.print_exc()
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
