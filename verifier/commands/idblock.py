"""`firmgate idblock sign|verify`: the owner's signed ID blocks for its policy's reference table.

sign: load the policy (firmware files beside it, plus --firmware for "uploaded"
entries), measure every firmware x shape, and sign one ID block per entry with the
owner's ID key (and author key) into a `firmgate-idblocks/1` file (verifier/idblockset.py).
verify: check every signature of a set, and optionally its keys and that its
launch digests are what the given firmware measures in each block's shape.
Exit 0 ok, 1 a signature/key/digest does not match, 2 bad input.
"""
from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path
from typing import Any

from .fileio import read_bounded, write_file

MAX_KEY_FILE = 64 * 1024
MAX_FIRMWARE_FILE = 256 * 1024 * 1024   # an add-on or image given with --firmware


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser("idblock", help="owner-signed SEV-SNP ID blocks for a policy's reference table")
    isub = p.add_subparsers(dest="idblock_command", metavar="ACTION")
    isub.required = True
    s = isub.add_parser("sign", help="sign one ID block per (firmware x shape) of a policy")
    s.add_argument("--policy", required=True, metavar="FILE", help="the tenant's policy (<tenant>.toml)")
    s.add_argument("--id-key", required=True, metavar="PEM", help="the ID key (ECDSA P-384 private key, PEM)")
    s.add_argument("--author-key", metavar="PEM", help="the author key that signs the ID key (P-384, PEM)")
    s.add_argument("--firmware", action="append", default=[], metavar="FILE",
                   help="bytes of an 'uploaded' firmware entry (add-on or image); repeatable")
    s.add_argument("--family-id", default="00" * 16, metavar="HEX", help="FAMILY_ID, 16 bytes hex")
    s.add_argument("--image-id", default="00" * 16, metavar="HEX", help="IMAGE_ID, 16 bytes hex")
    s.add_argument("--guest-svn", type=int, default=0, metavar="N", help="GUEST_SVN (u32)")
    s.add_argument("--guest-policy", default="0x30000", metavar="HEX",
                   help="the guest POLICY the VM is launched with (must match exactly); default 0x30000")
    s.add_argument("-o", "--output", metavar="FILE", help="default: <tenant>.idblocks.json beside the policy")
    s.set_defaults(func=cmd_sign)
    v = isub.add_parser("verify", help="verify a set: signatures, keys, and launch digests against firmware")
    v.add_argument("set", metavar="SET", help="a firmgate-idblocks/1 file")
    v.add_argument("--id-key", metavar="PEM_OR_HEX", help="expected ID key (PEM public/private key or digest)")
    v.add_argument("--author-key", metavar="PEM_OR_HEX", help="expected author key (PEM or digest)")
    v.add_argument("--firmware", action="append", default=[], metavar="FILE",
                   help="recompute the launch digest of this firmware's blocks; repeatable")
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    v.set_defaults(func=cmd_verify)


def _hexarg(value: str, size: int, name: str) -> bytes:
    from ..errors import UsageError
    if not re.fullmatch(r"[0-9a-fA-F]*", value) or len(value) != 2 * size:
        raise UsageError(f"{name} must be {2 * size} hex digits")
    return bytes.fromhex(value)


def cmd_sign(args: argparse.Namespace) -> int:
    from ..appraise.policy import load_policy
    from ..appraise.reference import ReferenceTable
    from ..errors import UsageError
    from ..idblock import load_private_key
    from ..idblockset import sign_table

    try:
        guest_policy = int(args.guest_policy, 16)
    except ValueError:
        raise UsageError("--guest-policy must be hex (e.g. 0x30000)") from None
    if not 0 <= guest_policy < 2**64 or not 0 <= args.guest_svn < 2**32:
        raise UsageError("--guest-policy is a u64 and --guest-svn a u32")
    family, image = _hexarg(args.family_id, 16, "--family-id"), _hexarg(args.image_id, 16, "--image-id")
    id_key = load_private_key(read_bounded(args.id_key, MAX_KEY_FILE, "--id-key"), "--id-key")
    author = load_private_key(read_bounded(args.author_key, MAX_KEY_FILE, "--author-key"), "--author-key") if args.author_key else None
    policy = load_policy(args.policy)
    table = ReferenceTable(policy)
    table.load_files()
    for f in args.firmware:
        _add_firmware(table, read_bounded(f, MAX_FIRMWARE_FILE, "firmware"))
    if table.missing:
        raise UsageError("no bytes for firmware " + ", ".join(sorted(table.missing)) + ": pass --firmware FILE")
    entries = [(m, match.firmware.id, match.firmware.sha384, match.shape.key()) for m, match in table.entries()]
    s = sign_table(policy.tenant, policy.digest, entries, id_key, author, family_id=family, image_id=image,
                   guest_svn=args.guest_svn, guest_policy=guest_policy)
    out = Path(args.output) if args.output else Path(args.policy).with_name(f"{policy.tenant}.idblocks.json")
    write_file(str(out), s.to_json().encode())
    print(f"OK: {len(s.blocks)} ID block(s) for tenant {policy.tenant} -> {out}")
    print(f"id_key_digest     {s.id_key_digest.hex()}")
    if s.author_key_digest is not None:
        print(f"author_key_digest {s.author_key_digest.hex()}")
    return 0


def _add_firmware(table: Any, data: bytes) -> None:
    """A listed build by its digest, or one a trusted publisher endorsed (its add-on's .corim sections;
    docs/endorsements.md): the owner signs ID blocks for an endorsed build without a policy change."""
    from ..appraise.reference import split_firmware
    payload, endorsements = split_firmware(data)
    if table.policy.firmware_by_digest(hashlib.sha384(payload).hexdigest()) is None and table.policy.publishers:
        table.add_endorsed(payload, endorsements)
    else:
        table.add_firmware_bytes(data)


def _expected_digest(value: str) -> bytes:
    from ..idblock import pem_key_digest
    if re.fullmatch(r"[0-9a-fA-F]{96}", value):
        return bytes.fromhex(value)
    return pem_key_digest(read_bounded(value, MAX_KEY_FILE, "key"))


def cmd_verify(args: argparse.Namespace) -> int:
    from ..appraise.reference import extract_firmware
    from ..cli import print_json
    from ..idblockset import load_set
    from ..measure.launch import Shape, expected_measurement

    s = load_set(args.set)                      # every signature verified, or IdBlockError
    problems: list[str] = []
    if args.id_key and _expected_digest(args.id_key) != s.id_key_digest:
        problems.append(f"signed with ID key {s.id_key_digest.hex()[:16]}..., not the expected one")
    if args.author_key:
        want = _expected_digest(args.author_key)
        if s.author_key_digest != want:
            problems.append("author key " + (s.author_key_digest.hex()[:16] + "..." if s.author_key_digest
                                             else "(none)") + " is not the expected one")
    checked = 0
    for f in args.firmware:
        payload = extract_firmware(read_bounded(f, MAX_FIRMWARE_FILE, "firmware"))
        digest = hashlib.sha384(payload).hexdigest()
        mine = [b for b in s.blocks if b.firmware_sha384 == digest]
        if not mine:
            problems.append(f"{f}: no ID block for firmware sha384 {digest[:16]}...")
        for b in mine:
            m = expected_measurement(payload, Shape.parse(b.shape))
            checked += 1
            if m != b.launch_digest:
                problems.append(f"{b.firmware} / {b.shape}: launch digest {b.launch_digest.hex()[:16]}... is not "
                                f"the measurement {m.hex()[:16]}...")
    ok = not problems
    if args.json:
        print_json({"ok": ok, "tenant": s.tenant, "blocks": len(s.blocks), "measurements_checked": checked,
                    "id_key_digest": s.id_key_digest.hex(),
                    "author_key_digest": s.author_key_digest.hex() if s.author_key_digest else None,
                    "problems": problems})
    else:
        for p in problems:
            print(p)
        print(f"{'OK' if ok else 'FAIL'}: {args.set}: {len(s.blocks)} signed ID block(s) of tenant {s.tenant}, "
              f"{checked} launch digest(s) recomputed")
        print(f"id_key_digest     {s.id_key_digest.hex()}")
        if s.author_key_digest is not None:
            print(f"author_key_digest {s.author_key_digest.hex()}")
    return 0 if ok else 1
