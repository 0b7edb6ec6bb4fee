"""`firmgate guest attest` and `firmgate guest request-update`: the guest's commands."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from verifier.commands.fileio import read_bounded
from verifier.errors import UsageError
from verifier.firmware.addon import MAX_ADDON_SIZE


def cmd_attest(args: argparse.Namespace) -> int:
    from guest import KbsSession, TeeKey, attest, default_source, fetch_resource, write_secret
    from guest.http import parse_resource_path
    try:
        parse_resource_path(args.resource)
        session = KbsSession(args.broker, cafile=args.cacert)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    addon = read_bounded(args.addon, MAX_ADDON_SIZE, "add-on") if args.addon else None
    init_data = None
    if args.init_data:
        try:
            body = read_bounded(args.init_data, MAX_ADDON_SIZE, "init-data").decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"init-data {args.init_data} is not UTF-8 TOML") from None
        init_data = {"format": "toml", "body": body}
    key = TeeKey.generate(args.key_type)
    source = default_source(args.tsm_root)
    att = attest(session, source, key, addon=addon, evidence_shape=args.evidence, tenant=args.tenant,
                 init_data=init_data)
    print(f"attested via {source.name}: token status {att.status}", file=sys.stderr)
    secret = fetch_resource(session, args.resource, key, bearer=att.token if args.bearer else None)
    if args.output and args.output != "-":
        path = write_secret(args.output, secret)
        print(f"secret {args.resource} written to {path} (mode 0600, {len(secret)} bytes)", file=sys.stderr)
    else:
        sys.stdout.buffer.write(secret)
        sys.stdout.flush()
    return 0


def cmd_request_update(args: argparse.Namespace) -> int:
    from guest.http import printable
    from guest.update import request_update
    from verifier.cli import print_json
    addon = read_bounded(args.addon, MAX_ADDON_SIZE, "add-on")
    if not Path(args.socket).exists():
        raise UsageError(f"no update channel at {args.socket} (is the virtio-serial port configured and "
                         "`host-install listen` running for this VM?)")
    answer = request_update(args.socket, addon, args.fwid)
    if args.json:
        print_json(answer)
    elif answer.get("ok") is True:
        res = answer.get("result") or {}
        print(printable(f"{answer.get('status')}: firmware {res.get('fwid')} ({str(res.get('in_force'))[:16]}…) in force"))
    else:
        hint = f" (hint: {answer['hint']})" if answer.get("hint") else ""
        print("error: " + printable(f"host refused the update ({answer.get('status')}): {answer.get('error')}{hint}"),
              file=sys.stderr)
    if answer.get("ok") is True:
        return 0
    code = answer.get("exit_code")
    return code if isinstance(code, int) and code in (1, 2, 3) else 1


def register(sub: argparse._SubParsersAction[Any]) -> None:
    g = sub.add_parser("guest", help="the guest's side: attest and fetch a secret; ask the host for a firmware update")
    gsub = g.add_subparsers(dest="guest_cmd", metavar="ACTION")
    gsub.required = True
    a = gsub.add_parser("attest", help="attest to the broker and fetch one resource (KBS protocol 0.4.0)")
    a.add_argument("--broker", required=True, metavar="URL", help="e.g. http://broker:8080")
    a.add_argument("--resource", required=True, metavar="REPO/TYPE/TAG")
    a.add_argument("-o", "--output", metavar="FILE", help="write the secret here (mode 0600); default: stdout")
    a.add_argument("--tsm-root", metavar="DIR", help="configfs-tsm report directory "
                   "(default /sys/kernel/config/tsm/report, else /dev/sev-guest)")
    a.add_argument("--key-type", choices=("p256", "p384", "p521", "rsa"), default="p256",
                   help="this run's key (default p256, as Trustee guests)")
    a.add_argument("--addon", metavar="FILE", help="send this UKI firmware add-on in additional_evidence "
                   "(bound by REPORT_DATA) for a broker that does not have its bytes yet")
    a.add_argument("--evidence", choices=("snp", "firmgate"), default="snp",
                   help="evidence JSON shape: Trustee SnpEvidence (default) or firmgate's own")
    a.add_argument("--tenant", help="tenant hint sent at /auth (extra-params.tenant)")
    a.add_argument("--init-data", metavar="TOML", help="the init-data the host bound into HOST_DATA at launch "
                   "(sent as init-data {format: toml}; the broker checks its digest against HOST_DATA)")
    a.add_argument("--cacert", metavar="PEM", help="CA bundle for an https broker (default: the system's)")
    a.add_argument("--bearer", action="store_true",
                   help="fetch with Authorization: Bearer <token> and no cookie (as CoCo pods do)")
    a.set_defaults(func=cmd_attest)
    r = gsub.add_parser("request-update", help="ask the host (host-install listen) to install this firmware add-on")
    r.add_argument("--addon", required=True, metavar="FILE")
    r.add_argument("--socket", default="/dev/virtio-ports/org.firmgate.update", metavar="PATH",
                   help="the host's update channel: the virtio-serial port (default) or a unix socket")
    r.add_argument("--fwid", help="which .efifw entry to install (default: the only one)")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_request_update)
