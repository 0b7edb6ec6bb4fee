"""`host-install` (and `firmgate host-install`): argparse in, exit code out; decisions live in install.py."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from verifier.cli import print_json, run

from . import progress
from .errors import BootFailed, InstallError

if TYPE_CHECKING:  # the work modules load QEMU/QMP support; `firmgate` startup should not pay for it
    from .install import InstallResult


def _read_addon(path: str) -> bytes:
    from verifier.firmware.addon import MAX_ADDON_SIZE

    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_ADDON_SIZE:
            raise InstallError(f"add-on {path} is {size} bytes, above the {MAX_ADDON_SIZE}-byte limit",
                               "a UKI add-on with one firmware image is a few MiB")
        return p.read_bytes()
    except FileNotFoundError:
        raise InstallError(f"add-on {path} does not exist", "pass the path of the guest's UKI add-on") from None
    except IsADirectoryError:
        raise InstallError(f"add-on {path} is a directory", "pass the add-on file itself") from None


def _print_result(args: argparse.Namespace, result: InstallResult) -> int:
    if args.json:
        print_json(result.to_dict())
    else:
        digest = (result.in_force or "")[:16]
        print(f"{result.status.upper().replace('-', ' ')}: {args.vm} firmware {result.fwid!r} sha384:{digest}…"
              + (f" ({result.reason})" if result.reason else ""))
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    from .init_vm import init_vm

    given = {"snp": args.snp or None, "vcpus": args.vcpus, "memory_mib": args.memory, "cpu": args.cpu,
             "accel": args.accel, "qemu": args.qemu, "update_port": args.update_port or None,
             "launch_mode": args.launch_mode, "extra_args": args.extra_arg}
    vm = init_vm(args.vm, **{k: v for k, v in given.items() if v is not None})
    if args.json:
        print_json({"vm": str(vm.path), "config": str(vm.path / "vm.toml")})
    else:
        print(f"CREATED: {vm.path / 'vm.toml'} (edit it to add disks and network: extra_args)")
    return 0


def _cmd_install(args: argparse.Namespace) -> int:
    from .install import install, plan
    from .vm import VmDir

    progress.enable()
    vm = VmDir.open(args.vm)
    data = _read_addon(args.addon)
    if args.dry_run:
        steps = plan(vm, data, args.fwid, launch=not args.no_launch)
        if args.json:
            print_json(steps)
        else:
            print(f"PLAN: {args.vm}: {steps['old']['fwid']!r} -> {steps['fwid']!r} "
                  f"({steps['kind']}, {steps['size']} bytes, sha384:{steps['digest'][:16]}…)")
            print("steps: " + " -> ".join(steps["steps"]))
        return 0
    try:
        result = install(vm, data, args.fwid, launch=not args.no_launch)
    except BootFailed as exc:
        if args.json and exc.result is not None:
            print_json({**exc.result.to_dict(), "error": str(exc), "hint": exc.hint})
        raise
    return _print_result(args, result)


def _cmd_status(args: argparse.Namespace) -> int:
    from .install import status

    st = status(args.vm)
    if args.json:
        print_json(st)
        return 0
    cur = st["in_force"]
    print(f"vm:        {st['vm']}")
    print(f"in force:  {cur['fwid']!r} sha384:{cur['digest']}" if cur["digest"] else "in force:  none")
    print(f"previous:  {st['previous']['fwid']!r}" if st["previous"]["digest"] else "previous:  none")
    print(f"qemu:      pid {st['qemu']['pid']} ({st['qemu']['status']})" if st["qemu"]["pid"] else "qemu:      not running")
    if st["interrupted"]:
        print(f"INTERRUPTED transaction after {st['interrupted'][-1]!r}: run `host-install recover`")
    elif not st["consistent"]:
        print("INCONSISTENT: firmware link disagrees with the journal: run `host-install recover`")
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    from .install import rollback

    progress.enable()
    return _print_result(args, rollback(args.vm, launch=not args.no_launch))


def _cmd_recover(args: argparse.Namespace) -> int:
    from .install import recover

    progress.enable()
    return _print_result(args, recover(args.vm, relaunch=not args.no_launch))


def _log_requests_to_stderr() -> None:
    """Each served request as one line on stderr (journald adds its own timestamp under systemd)."""
    import logging

    from .listen_log import log

    if not any(getattr(h, "_firmgate_listen", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("host-install listen: %(message)s"))
        handler._firmgate_listen = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _cmd_listen(args: argparse.Namespace) -> int:
    from .channel import Listener
    from .vm import VmDir

    vm = VmDir.open(args.vm)
    listener = Listener(vm, launch=not args.no_launch)
    progress.enable()
    _log_requests_to_stderr()
    print(f"listening on {listener.path}", flush=True)
    try:
        listener.serve(args.max_requests)
    finally:
        listener.close()
    return 0


def _add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    def common(p: argparse.ArgumentParser, launch_help: str) -> None:
        p.add_argument("--vm", required=True, metavar="DIR", help="the VM directory (holds vm.toml)")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.add_argument("--no-launch", action="store_true", help=launch_help)

    p = sub.add_parser("init", help="create a VM directory with a commented vm.toml")
    p.add_argument("--vm", required=True, metavar="DIR", help="the new VM directory (created if missing)")
    p.add_argument("--snp", action="store_true", help="an SEV-SNP guest: images must carry SEV metadata")
    p.add_argument("--launch-mode", choices=("snp", "plain"),
                   help="plain: run the ROM as an ordinary VM (hosts without SNP); default follows --snp")
    p.add_argument("--vcpus", type=int, metavar="N", help="virtual CPUs (default 1)")
    p.add_argument("--memory", type=int, metavar="MIB", help="guest memory in MiB (default 2048)")
    p.add_argument("--cpu", metavar="MODEL", help="QEMU -cpu model, e.g. EPYC (default: QEMU's)")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), help="default auto: KVM when /dev/kvm opens")
    p.add_argument("--qemu", metavar="BINARY", help="QEMU binary (default qemu-system-x86_64)")
    p.add_argument("--update-port", action="store_true",
                   help="give the guest the org.firmgate.update port (for host-install listen)")
    p.add_argument("--extra-arg", action="append", metavar="ARG",
                   help="one more QEMU argument (repeat; e.g. --extra-arg=-drive --extra-arg=file=d.qcow2)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_init)
    p = sub.add_parser("install", help="install the firmware from a guest's UKI add-on and relaunch the VM")
    common(p, "switch the ROM without stopping or starting QEMU")
    p.add_argument("--addon", required=True, metavar="ADDON", help="UKI add-on with .efifw section(s)")
    p.add_argument("--fwid", help="which .efifw entry (needed when the add-on holds several)")
    p.add_argument("--dry-run", action="store_true", help="run the checks and print the plan; change nothing")
    p.set_defaults(func=_cmd_install)
    p = sub.add_parser("status", help="firmware in force, QEMU state, interrupted transactions")
    common(p, "(no effect)")
    p.set_defaults(func=_cmd_status)
    p = sub.add_parser("rollback", help="return to the previous firmware and relaunch")
    common(p, "switch the ROM without relaunching QEMU")
    p.set_defaults(func=_cmd_rollback)
    p = sub.add_parser("recover", help="finish or undo an install that a crash interrupted")
    common(p, "do not relaunch QEMU")
    p.set_defaults(func=_cmd_recover)
    p = sub.add_parser("listen", help="serve framed update requests on <vm>/channel.sock")
    common(p, "install without relaunching QEMU")
    p.add_argument("--max-requests", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_listen)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add `firmgate host-install ...`."""
    p = sub.add_parser("host-install", help="install guest-supplied firmware into a VM's ROM and relaunch it")
    inner = p.add_subparsers(dest="host_install_command", metavar="ACTION", parser_class=type(p))
    inner.required = True
    _add_commands(inner)


def build_parser() -> argparse.ArgumentParser:
    from verifier.cli import _Parser

    parser = _Parser(prog="host-install", description="install guest-supplied firmware into a VM's ROM")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="also show the traceback of an error (the exit code stays the same)")
    sub = parser.add_subparsers(dest="host_install_command", metavar="ACTION", parser_class=_Parser)
    sub.required = True
    _add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
