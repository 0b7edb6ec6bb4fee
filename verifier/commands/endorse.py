"""`firmgate endorse sign|verify|revoke`: a firmware publisher's signed endorsements (docs/endorsements.md).

sign    one firmware build -> a CoRIM in COSE_Sign1 (ES256 with a P-256 key, ES384 with P-384)
verify  an endorsement against the publisher's public key and, given the bytes, their digest
        (and the measurements it claims, recomputed from the bytes)
revoke  the publisher's signed revocation list (endorsement ids and/or firmware digests)
Exit codes: 0 valid / written, 1 rejected (signature, validity, digest), 2 bad input.
"""
from __future__ import annotations

import argparse
import hashlib
import time
from datetime import UTC, datetime
from typing import Any

from ..errors import UsageError

MAX_KEY_FILE = 16 * 1024


def _time(text: str | None, what: str) -> int:
    if text is None:
        return int(time.time())
    try:
        t = datetime.fromisoformat(text)
    except ValueError as exc:
        raise UsageError(f"{what}: {text!r} is not an ISO 8601 date-time") from exc
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return int(t.timestamp())


def _shapes(specs: list[str]) -> list[Any]:
    """--shapes VCPUS:TYPES[:VMMS[:FEATURES]], e.g. 1,2,4:EPYC-v4,EPYC-Milan:qemu:0x1 (repeatable)."""
    from ..measure.launch import VCPU_TYPES, VMMS, shapes_product
    from .firmware import _int_list, _str_list
    out: list[Any] = []
    for spec in specs:
        parts = spec.split(":")
        if not 2 <= len(parts) <= 4:
            raise UsageError(f"--shapes {spec!r}: expected VCPUS:VCPU_TYPES[:VMMS[:GUEST_FEATURES]]")
        vcpus = _int_list(parts[0], "--shapes vcpus")
        types = _str_list(parts[1], tuple(VCPU_TYPES), "--shapes vcpu types")
        vmms = _str_list(parts[2], tuple(VMMS), "--shapes vmm") if len(parts) > 2 else ["qemu"]
        feats = _int_list(parts[3], "--shapes guest features", ranges=False) if len(parts) > 3 else [1]
        out += shapes_product(vcpus, types, vmms, feats)
    return list(dict.fromkeys(out))


def cmd_sign(args: argparse.Namespace) -> int:
    from ..endorse.corim import Endorsement, Provenance, new_id, sign_endorsement
    from ..endorse.cose import key_id, load_private_key
    from ..firmware.addon import MAX_ADDON_SIZE, read_addon
    from ..firmware.image import require_snp_firmware
    from ..measure.launch import measurement_table
    from .fileio import read_bounded, write_file
    data = read_bounded(args.firmware, MAX_ADDON_SIZE, "firmware")
    if data[:2] == b"MZ":   # an add-on: --fwid picks the entry, whose fwid is endorsed
        entry = read_addon(data).select(args.fwid)
        payload, fwid = entry.payload, entry.fwid
    elif args.fwid is None:
        raise UsageError("--fwid is needed for a raw firmware image")
    else:
        payload, fwid = data, args.fwid
    require_snp_firmware(payload)   # a publisher vouches for SNP firmware only
    key = load_private_key(read_bounded(args.key, MAX_KEY_FILE, "key"), args.key)
    publisher = args.publisher or f"sha256:{key_id(key.public_key()).hex()[:16]}"
    nb = _time(args.not_before, "--not-before")
    if not 1 <= args.valid_days <= 3660:
        raise UsageError("--valid-days must be 1..3660")
    shapes = _shapes(args.shapes or [])
    measurements: tuple[tuple[str, bytes], ...] = ()
    if shapes:
        table = measurement_table(payload, shapes)
        measurements = tuple((s.key(), m) for s, m in table.items())
    e = Endorsement(args.id or new_id(), fwid, hashlib.sha384(payload).hexdigest(), args.svn, publisher, nb,
                    nb + args.valid_days * 86400,
                    Provenance(args.source_repo, args.source_commit, args.build_recipe), measurements)
    out = sign_endorsement(e, key)
    write_file(args.output, out)
    print(f"wrote {args.output}: endorsement {e.id} of {fwid} (svn {e.svn}, sha384 {e.sha384[:16]}...) by "
          f"{publisher}, key sha256:{key_id(key.public_key()).hex()}, {len(measurements)} shape measurement(s)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ..cli import print_json
    from ..endorse.admit import (
        EndorsementRefused,
        PublisherRule,
        constraint_failure,
        verify_with,
    )
    from ..endorse.corim import MAX_ENDORSEMENT_SIZE, parse_signed
    from ..endorse.cose import key_id, load_public_key
    from ..measure.launch import Shape, measurement_table
    from .fileio import read_bounded
    from .firmware import _firmware_from_file
    data = read_bounded(args.endorsement, MAX_ENDORSEMENT_SIZE, "endorsement")
    key = load_public_key(read_bounded(args.key, MAX_KEY_FILE, "key"), args.key)
    rule = PublisherRule(name=args.key, key_sha256=key_id(key).hex(), key=key)
    parse_signed(data)   # bytes that are no endorsement at all: bad input (exit 2), not a rejection
    problems: list[str] = []
    try:
        _, signed = verify_with(data, [rule])
    except EndorsementRefused as exc:
        if args.json:
            print_json({"ok": False, "problems": [exc.diagnostics()]})
        else:
            print(f"FAIL: {args.endorsement}\n  {exc.diagnostics()}")
        return 1
    e = signed.endorsement
    why = constraint_failure(rule, e, _time(args.at, "--at"))
    if why is not None:
        problems.append(why)
    crosscheck: list[dict[str, Any]] = []
    if args.firmware:
        payload, _ = _firmware_from_file(args.firmware, args.fwid)
        digest = hashlib.sha384(payload).hexdigest()
        if digest != e.sha384:
            problems.append(f"firmware {args.firmware} has sha384 {digest[:16]}...; the endorsement is for "
                            f"{e.sha384[:16]}...")
        elif e.measurements:
            shapes = [Shape.parse(s) for s, _ in e.measurements]
            ours = {s.key(): m for s, m in measurement_table(payload, shapes).items()}
            for s, m in e.measurements:
                ok = ours.get(Shape.parse(s).key()) == m
                crosscheck.append({"shape": s, "claimed": m.hex(), "ok": ok})
                if not ok:
                    problems.append(f"claimed MEASUREMENT for shape {s} differs from the one recomputed from the bytes")
    if args.json:
        print_json({"ok": not problems, "problems": problems, "key_sha256": signed.kid_hex,
                    "alg": signed.sign1.alg_name, "endorsement": e.to_dict(), "measurements_checked": crosscheck})
    else:
        print(f"{'OK' if not problems else 'FAIL'}: {args.endorsement}: endorsement {e.id} of {e.fwid} "
              f"(svn {e.svn}, sha384 {e.sha384[:16]}...) by {e.publisher}, {signed.sign1.alg_name}, "
              f"key sha256:{signed.kid_hex[:16]}...")
        for p in problems:
            print(f"  {p}")
        if crosscheck and not problems:
            print(f"  {len(crosscheck)} claimed measurement(s) match the ones recomputed from the bytes")
    return 0 if not problems else 1


def cmd_revoke(args: argparse.Namespace) -> int:
    import re

    from ..endorse.corim import (
        MAX_ENDORSEMENT_SIZE,
        Revocations,
        parse_signed,
        read_payload,
        sign_revocations,
    )
    from ..endorse.cose import load_private_key
    from .fileio import read_bounded, write_file
    key = load_private_key(read_bounded(args.key, MAX_KEY_FILE, "key"), args.key)
    ids = set(args.id or [])
    digests = set()
    for d in args.sha384 or []:
        if not re.fullmatch(r"[0-9a-fA-F]{96}", d):
            raise UsageError(f"--sha384 {d[:20]!r}: expected 96 hex digits")
        digests.add(d.lower())
    for path in args.endorsement or []:
        ids.add(read_payload(parse_signed(read_bounded(path, MAX_ENDORSEMENT_SIZE, "endorsement"))).endorsement.id)
    if not ids and not digests and not args.empty:
        raise UsageError("nothing to revoke: give --id, --sha384 or --endorsement (or --empty for an empty list)")
    out = sign_revocations(Revocations(args.publisher, int(time.time()), frozenset(ids), frozenset(digests)), key)
    write_file(args.output, out)
    print(f"wrote {args.output}: {len(ids)} endorsement id(s), {len(digests)} firmware digest(s) revoked")
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("endorse", help="sign, verify or revoke firmware endorsements (CoRIM in COSE_Sign1)")
    esub = p.add_subparsers(dest="endorse_command", metavar="ACTION")
    esub.required = True
    s = esub.add_parser("sign", help="endorse one firmware build with the publisher's key")
    s.add_argument("--firmware", required=True, metavar="FILE", help="firmware image or UKI add-on")
    s.add_argument("--fwid", metavar="ID", help="firmware id (required for a raw image; picks an add-on's entry)")
    s.add_argument("--svn", required=True, type=int, metavar="N", help="security version number of the build")
    s.add_argument("--key", required=True, metavar="PEM", help="publisher private key (P-256: ES256, P-384: ES384)")
    s.add_argument("--publisher", metavar="NAME", help="publisher name (default: the key's fingerprint)")
    s.add_argument("--source-repo", metavar="URL")
    s.add_argument("--source-commit", metavar="HEX")
    s.add_argument("--build-recipe", metavar="TEXT")
    s.add_argument("--shapes", action="append", metavar="VCPUS:TYPES[:VMMS[:FEATURES]]",
                   help="also state the launch MEASUREMENT for these shapes (verifiers recompute, and may cross-check)")
    s.add_argument("--not-before", metavar="ISO8601", help="start of validity (default: now)")
    s.add_argument("--valid-days", type=int, default=365, metavar="N", help="validity in days (default 365)")
    s.add_argument("--id", metavar="ID", help="endorsement id (default: a random UUID)")
    s.add_argument("-o", "--output", required=True, metavar="OUT")
    s.set_defaults(func=cmd_sign)
    v = esub.add_parser("verify", help="check an endorsement against a publisher key (and firmware bytes)")
    v.add_argument("endorsement", metavar="ENDORSEMENT")
    v.add_argument("--key", required=True, metavar="PEM", help="publisher public key or certificate")
    v.add_argument("--firmware", metavar="FILE", help="the firmware (image or add-on): its digest must match")
    v.add_argument("--fwid", metavar="ID", help="which firmware of an add-on")
    v.add_argument("--at", metavar="ISO8601", help="check validity at this time (default: now)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)
    r = esub.add_parser("revoke", help="write the publisher's signed revocation list (the whole list)")
    r.add_argument("--key", required=True, metavar="PEM", help="publisher private key")
    r.add_argument("--publisher", required=True, metavar="NAME")
    r.add_argument("--id", action="append", metavar="ID", help="endorsement id to revoke (repeatable)")
    r.add_argument("--sha384", action="append", metavar="HEX", help="firmware digest to revoke (repeatable)")
    r.add_argument("--endorsement", action="append", metavar="FILE", help="revoke this endorsement (repeatable)")
    r.add_argument("--empty", action="store_true", help="publish an empty list")
    r.add_argument("-o", "--output", required=True, metavar="OUT")
    r.set_defaults(func=cmd_revoke)
