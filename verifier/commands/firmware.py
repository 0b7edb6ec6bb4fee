"""`firmgate measure`, `firmgate addon build|inspect|extract` and `firmgate igvm-from-ovmf`.

Thin: read files (bounded), call verifier.firmware / verifier.measure, print.
Errors are FirmgateError subclasses; verifier.cli turns them into one line and
the exit code (2 for a bad add-on or firmware).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ..cli import print_json
from ..errors import FirmwareError, UsageError
from ..firmware.addon import MAX_ADDON_SIZE, Addon, build_addon, read_addon
from ..firmware.image import IGVM_MAGIC, MAX_FIRMWARE_SIZE, inspect_firmware, require_snp_firmware
from ..measure.cache import MeasurementCache
from ..measure.igvm import ZERO_RULES, measure_igvm
from ..measure.launch import (
    SEV_SNP_MEASURE_VERSION,
    VCPU_TYPES,
    VMMS,
    KernelHashes,
    Shape,
    igvm_shape_matches,
    measure_prepared,
    prepare_firmware,
    shapes_product,
)
from .fileio import read_bounded, write_file

# A table larger than this is a typo, not a policy (each shape is a few SHA-384s).
MAX_SHAPES = 65536
PROGRESS_MIN_SHAPES = 32


def _is_pe(data: bytes) -> bool:
    return data[:2] == b"MZ"


# -- measure ------------------------------------------------------------------------
def _int_list(text: str, what: str, *, ranges: bool = True) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if ranges and "-" in part[1:]:
                lo, hi = (int(x, 0) for x in part.split("-", 1))
                if hi < lo or hi - lo > MAX_SHAPES:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part, 0))
        except ValueError as exc:
            example = "1,2,4 or 1-8" if ranges else "0x1,0x5"
            raise UsageError(f"{what}: {part!r} is not a number{' or range' if ranges else ''} (e.g. {example})"
                             ) from exc
    return list(dict.fromkeys(out))


def _str_list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    out = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in out if p not in allowed]
    if bad or not out:
        raise UsageError(f"{what}: unknown {', '.join(bad) or 'empty value'}; expected one of {', '.join(allowed)}")
    return list(dict.fromkeys(out))


def _firmware_from_file(path: str, fwid: str | None) -> tuple[bytes, str | None]:
    """Raw firmware, or the selected entry of an add-on; returns (payload, fwid or None)."""
    data = read_bounded(path, MAX_ADDON_SIZE, "firmware")
    if _is_pe(data):
        entry = read_addon(data).select(fwid)
        return entry.payload, entry.fwid
    if fwid is not None:
        raise UsageError("--fwid applies to an add-on; FIRMWARE is a raw image")
    if len(data) > MAX_FIRMWARE_SIZE:
        raise FirmwareError(f"firmware {path} is larger than {MAX_FIRMWARE_SIZE} bytes")
    return data, None


def _progress_printer(enabled: bool) -> Callable[[int, int], None] | None:
    if not enabled:
        return None
    last = [-1]

    def show(done: int, total: int) -> None:
        if total < PROGRESS_MIN_SHAPES:
            return
        tenth = done * 10 // total
        if tenth != last[0] or done == total:
            last[0] = tenth
            print(f"measuring: {done}/{total} shapes", file=sys.stderr, flush=True)
    return show


def cmd_measure(args: argparse.Namespace) -> int:
    vcpus = _int_list(args.vcpus, "--vcpus")
    types = _str_list(args.vcpu_type, VCPU_TYPES, "--vcpu-type")
    vmms = _str_list(args.vmm, VMMS, "--vmm")
    features = _int_list(args.guest_features, "--guest-features", ranges=False)  # bitmasks, not ranges
    if (args.initrd or args.append is not None) and not args.kernel:
        raise UsageError("--initrd and --append need --kernel")
    kh = KernelHashes.from_files(args.kernel, args.initrd, args.append) if args.kernel else None
    count = len(vcpus) * len(types) * len(vmms) * len(features)
    if count > MAX_SHAPES:
        raise UsageError(f"{count} shapes requested, above the limit of {MAX_SHAPES}")
    shapes = shapes_product(vcpus, types, vmms, features, kh)

    payload, fwid = _firmware_from_file(args.firmware, args.fwid)
    if payload[:4] == IGVM_MAGIC:
        return _measure_igvm(args, payload, fwid, shapes)
    fw = prepare_firmware(payload)
    cache = MeasurementCache(args.cache_dir) if args.cache_dir else None
    table = measure_prepared(fw, shapes, cache=cache, progress=_progress_printer(not args.json))

    if args.json:
        print_json({
            "firmware": {"path": args.firmware, "fwid": fwid, **fw.image.to_dict()},
            "sev_snp_measure": SEV_SNP_MEASURE_VERSION,
            "snp_ovmf_hash": table.seed.hex() if table.seed else None,
            "measurements": [{
                "shape": s.key(), "vmm": s.vmm, "vcpu_type": s.vcpu_type, "vcpus": s.vcpus,
                "guest_features": f"{s.guest_features:#x}",
                "kernel_hashes": None if s.kernel_hashes is None else {
                    "kernel": s.kernel_hashes.kernel.hex(), "initrd": s.kernel_hashes.initrd.hex(),
                    "cmdline": s.kernel_hashes.cmdline.hex()},
                "measurement": m.hex()} for s, m in table.measurements.items()],
        })
        return 0
    img = fw.image
    print(f"firmware: {args.firmware}" + (f" (fwid {fwid})" if fwid else ""))
    print(f"  size {img.size}, sha384 {img.sha384}")
    print(f"  SEV metadata: {', '.join(f'{s.type}@{s.gpa:#x}+{s.size:#x}' for s in img.sev_metadata or ())}")
    if table.seed:
        print(f"  snp:ovmf-hash {table.seed.hex()}")
    if kh:
        print(f"  kernel hashes: kernel {kh.kernel.hex()} initrd {kh.initrd.hex()} cmdline {kh.cmdline.hex()}")
    print(f"measurements (sev-snp-measure {SEV_SNP_MEASURE_VERSION}, mode snp):")
    width = max(len(t) for t in types)
    print(f"{'VMM':5} {'VCPU-TYPE':{width}} {'VCPUS':>5} {'FEATURES':>8}  MEASUREMENT")
    for s, m in table.measurements.items():
        print(f"{s.vmm:5} {s.vcpu_type:{width}} {s.vcpus:>5} {s.guest_features:>#8x}  {m.hex()}")
    return 0


def _measure_igvm(args: argparse.Namespace, payload: bytes, fwid: str | None, shapes: list[Shape]) -> int:
    """An IGVM file fixes its shape: print its one digest and which requested shapes it can launch as."""
    m = measure_igvm(payload, args.zero_page_rule)
    matching = [s for s in shapes if igvm_shape_matches(m, s)]
    img = inspect_firmware(payload)
    if args.json:
        print_json({"firmware": {"path": args.firmware, "fwid": fwid, **img.to_dict()},
                    "igvm": m.to_dict(),
                    "measurements": [{"shape": s.key(), "measurement": m.digest.hex()} for s in matching]})
        return 0
    print(f"firmware: {args.firmware}" + (f" (fwid {fwid})" if fwid else "") + " (IGVM)")
    print(f"  size {img.size}, sha384 {img.sha384}")
    print(f"  fixed by the file: vcpus {m.vcpus}, vmm qemu, guest_features {m.sev_features:#x}, "
          f"vcpu signature {m.vcpu_sig:#x}, guest policy {m.policy:#x}")
    print(f"  pages: {', '.join(f'{k} {v}' for k, v in m.page_counts.items())}")
    if m.id_block is not None:
        print(f"  SNP ID block: ld {m.id_block.ld.hex()} ({'matches' if m.id_block_matches else 'DOES NOT match'}), "
              f"id_key_digest {m.id_block.id_key_digest.hex()}, guest_svn {m.id_block.guest_svn}")
    for w in m.warnings:
        print(f"  warning: {w}")
    print(f"measurement (zero-page rule {m.rule}): {m.digest.hex()}")
    print(f"requested shapes it launches as: {', '.join(s.key() for s in matching) or 'none'}")
    return 0


def cmd_igvm_from_ovmf(args: argparse.Namespace) -> int:
    from ..measure.ovmf_igvm import igvm_from_ovmf
    features = _int_list(args.guest_features, "--guest-features", ranges=False)
    if len(features) != 1:
        raise UsageError("--guest-features takes one value here")
    payload = read_bounded(args.ovmf, MAX_FIRMWARE_SIZE, "firmware")
    shape = Shape(vcpus=int(args.vcpus), vcpu_type=args.vcpu_type, vmm=args.vmm, guest_features=features[0])
    out = igvm_from_ovmf(payload, shape)
    write_file(args.output, out)
    print(f"wrote {args.output}: {len(out)} bytes, IGVM of {args.ovmf} for {shape.key()}")
    return 0


# -- addon ------------------------------------------------------------------------------
def cmd_addon_build(args: argparse.Namespace) -> int:
    files, fwids = args.firmware or [], args.fwid or []
    if not files or len(files) != len(fwids):
        raise UsageError("give one --fwid for each --firmware (in the same order)")
    entries = []
    for path, fwid in zip(files, fwids, strict=True):
        payload = read_bounded(path, MAX_FIRMWARE_SIZE, "firmware")
        if not args.unsafe_skip_firmware_check:
            try:
                require_snp_firmware(payload)
            except FirmwareError as exc:
                raise FirmwareError(f"{path}: {exc.diagnostics()} (--unsafe-skip-firmware-check to pack it anyway)"
                                    ) from exc
        entries.append((fwid, payload))
    out = build_addon(entries, extra_sections=[(".corim", e) for e in _endorsements(args.endorsement or [], entries)])
    write_file(args.output, out)
    print(f"wrote {args.output}: {len(out)} bytes, {len(entries)} firmware image(s): {', '.join(fwids)}")
    return 0


def _endorsements(paths: list[str], entries: list[tuple[str, bytes]]) -> list[bytes]:
    """Endorsement files to carry in `.corim` sections; each must be for one of the images packed.
    (Its signature is the verifier's business: the builder may not even know the publisher's key.)"""
    import hashlib

    from ..endorse.corim import MAX_ENDORSEMENT_SIZE, parse_signed, read_payload
    from ..firmware.addon import MAX_ENDORSEMENTS
    if len(paths) > MAX_ENDORSEMENTS:
        raise UsageError(f"at most {MAX_ENDORSEMENTS} --endorsement files")
    digests = {hashlib.sha384(p).hexdigest(): f for f, p in entries}
    out = []
    for path in paths:
        data = read_bounded(path, MAX_ENDORSEMENT_SIZE, "endorsement")
        e = read_payload(parse_signed(data)).endorsement
        if e.sha384 not in digests:
            raise UsageError(f"{path} endorses sha384 {e.sha384[:16]}... ({e.fwid}), which is none of the images packed")
        if digests[e.sha384] != e.fwid:
            raise UsageError(f"{path} endorses fwid {e.fwid}, packed here as {digests[e.sha384]}")
        out.append(data)
    return out


def _addon_facts(path: str, addon: Addon) -> dict[str, Any]:
    entries = []
    for e in addon.entries:
        facts: dict[str, Any] = {"fwid": e.fwid, "section_index": e.section_index, "size": e.size,
                                 "sha384": e.sha384}
        try:
            facts["image"] = inspect_firmware(e.payload).to_dict()
        except FirmwareError as exc:
            facts["image"] = {"error": exc.diagnostics()}
        try:
            require_snp_firmware(e.payload)
            facts["snp"] = "ok"
        except FirmwareError as exc:
            facts["snp"] = f"refused: {exc.diagnostics()}"
        entries.append(facts)
    return {
        "path": path, "sha384": addon.sha384,
        "sections": [{"index": s.index, "name": s.name, "virtual_size": s.virtual_size, "raw_size": s.raw_size}
                     for s in addon.sections],
        "efifw": entries,
        "hwids": [{"chid": str(h.chid), "name": h.name, "fwid": h.fwid} for h in addon.hwids],
        "endorsements": [_endorsement_facts(e) for e in addon.endorsements],
    }


def _endorsement_facts(data: bytes) -> dict[str, Any]:
    """What an endorsement section says (signature NOT checked here: `firmgate endorse verify` does)."""
    from ..endorse.corim import parse_signed, read_payload
    from ..errors import FirmgateError
    try:
        signed = read_payload(parse_signed(data))
    except FirmgateError as exc:
        return {"error": exc.diagnostics()}
    return {"key_sha256": signed.kid_hex, "signature": "not checked", **signed.endorsement.to_dict()}


def cmd_addon_inspect(args: argparse.Namespace) -> int:
    addon = read_addon(read_bounded(args.addon, MAX_ADDON_SIZE, "add-on"))
    facts = _addon_facts(args.addon, addon)
    if args.json:
        print_json(facts)
        return 0
    print(f"add-on: {args.addon}  sha384 {addon.sha384}")
    print("sections: " + ", ".join(f"{s['name']}({s['virtual_size']})" for s in facts["sections"]))
    for e in facts["efifw"]:
        img = e["image"]
        print(f".efifw [{e['section_index']}] fwid {e['fwid']}: {e['size']} bytes, sha384 {e['sha384']}")
        if "kind" in img:
            meta = img["sev_metadata"]
            print(f"  kind {img['kind']}, SEV metadata: {len(meta)} sections" if meta is not None
                  else f"  kind {img['kind']}, no SEV metadata")
        print(f"  snp: {e['snp']}")
    for h in facts["hwids"]:
        print(f".hwids uefi-fw chid {h['chid']} name {h['name']} fwid {h['fwid']}")
    for e in facts["endorsements"]:
        print(f".corim {e['error']}" if "error" in e else
              f".corim endorsement {e['id']}: {e['fwid']} svn {e['svn']} by {e['publisher']} "
              f"(key sha256:{e['key_sha256'][:16]}..., signature not checked)")
    return 0


def cmd_addon_extract(args: argparse.Namespace) -> int:
    addon = read_addon(read_bounded(args.addon, MAX_ADDON_SIZE, "add-on"))
    entry = addon.select(args.fwid)
    write_file(args.output, entry.payload)
    print(f"wrote {args.output}: fwid {entry.fwid}, {entry.size} bytes, sha384 {entry.sha384}")
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    m = sub.add_parser("measure", help="expected SNP launch measurements of a firmware for a set of VM shapes")
    m.add_argument("firmware", metavar="FIRMWARE", help="raw OVMF image, or a UKI add-on (see --fwid)")
    m.add_argument("--fwid", help="which firmware of an add-on (needed when it holds several)")
    m.add_argument("--vcpus", default="1", help="vCPU counts: 1,2,4 or 1-8 (default 1)")
    m.add_argument("--vcpu-type", default="EPYC-v4",
                   help=f"comma list of vCPU types (default EPYC-v4); known: {', '.join(VCPU_TYPES)}")
    m.add_argument("--vmm", default="qemu", help="comma list of qemu, ec2, gce (default qemu)")
    m.add_argument("--guest-features", default="0x1", help="SEV_FEATURES values, comma list (default 0x1)")
    m.add_argument("--kernel", help="kernel measured through the SEV hashes table (QEMU -kernel)")
    m.add_argument("--initrd", help="initrd (with --kernel)")
    m.add_argument("--append", help="kernel command line (with --kernel)")
    m.add_argument("--cache-dir", help="cache measurements here (protect it like the policy files)")
    m.add_argument("--zero-page-rule", choices=ZERO_RULES, default="qemu",
                   help="IGVM only: how a page without data is measured (default qemu, as QEMU's IGVM "
                        "loader does; native-zero as igvmmeasure --native-zero)")
    m.add_argument("--json", action="store_true", help="print JSON")
    m.set_defaults(func=cmd_measure)

    g = sub.add_parser("igvm-from-ovmf", help="wrap an OVMF image and one VM shape into an IGVM file "
                                              "(the measurement cross-check's oracle)")
    g.add_argument("ovmf", metavar="OVMF")
    g.add_argument("--vcpus", type=int, default=1)
    g.add_argument("--vcpu-type", default="EPYC-v4")
    g.add_argument("--vmm", default="qemu", choices=VMMS)
    g.add_argument("--guest-features", default="0x1")
    g.add_argument("-o", "--output", required=True, metavar="OUT.igvm")
    g.set_defaults(func=cmd_igvm_from_ovmf)

    a = sub.add_parser("addon", help="build, inspect or extract UKI firmware add-ons (.efifw)")
    asub = a.add_subparsers(dest="addon_command", metavar="ACTION", parser_class=type(a))
    asub.required = True
    b = asub.add_parser("build", help="write a PE add-on holding one .efifw section per firmware")
    b.add_argument("--firmware", action="append", metavar="FILE", help="firmware image (repeatable)")
    b.add_argument("--fwid", action="append", metavar="ID", help="its firmware id (one per --firmware)")
    b.add_argument("--endorsement", action="append", metavar="FILE",
                   help="a publisher's signed endorsement of one of the images, carried in a .corim section "
                        "(repeatable; see firmgate endorse sign)")
    b.add_argument("-o", "--output", required=True, metavar="OUT.efi")
    b.add_argument("--unsafe-skip-firmware-check", action="store_true",
                   help="pack images that are not SNP-capable OVMF (for tests)")
    b.set_defaults(func=cmd_addon_build)
    i = asub.add_parser("inspect", help="list sections, firmware ids and image facts")
    i.add_argument("addon", metavar="ADDON")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_addon_inspect)
    x = asub.add_parser("extract", help="write one firmware image out of an add-on")
    x.add_argument("addon", metavar="ADDON")
    x.add_argument("--fwid")
    x.add_argument("-o", "--output", required=True, metavar="FILE")
    x.set_defaults(func=cmd_addon_extract)


