"""`firmgate report show` and `firmgate verify`: thin argparse -> evidence/pipeline -> table or JSON."""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import os
import sys
from pathlib import Path
from typing import Any

from cryptography import x509

from ..abi.certtable import parse_cert_table
from ..abi.fields import Product
from ..abi.flags import GUEST_POLICY, KEY_INFO, PLATFORM_INFO
from ..appraise.appraise import appraise
from ..certs import common_name, load_certificate, load_certificates, load_crl
from ..errors import CertificateFormatError, EvidenceError, FetchError, FirmgateError, TrustError, UsageError
from ..evidence import MAX_EVIDENCE_SIZE, Evidence, load_evidence
from ..kds import parse_leaf
from ..kds.fetch import HttpFetcher
from ..options import VerifyOptions
from ..pipeline import check_name_for, evidence_digest, verify_to_report
from ..trust import DEFAULT_TRUST_STORE
from ..verdict import CheckResult, Outcome, Verdict

MAX_CERT_FILES = 64


def register(sub: argparse._SubParsersAction[Any]) -> None:
    r = sub.add_parser("report", help="read SEV-SNP attestation reports")
    rsub = r.add_subparsers(dest="report_command", metavar="SUBCOMMAND")
    rsub.required = True
    s = rsub.add_parser("show", help="print every field of a report (raw, Trustee JSON, firmgate JSON or tsm JSON)")
    s.add_argument("report", metavar="REPORT", help="report file, or - for stdin")
    s.add_argument("--product", help="Milan, Genoa or Turin: decodes TCBs of a v2 report (no CPUID)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=show_handler)

    v = sub.add_parser("verify", help="verify a report's signature and chain against AMD's roots and run every check")
    v.add_argument("report", metavar="REPORT", help="raw 1184-byte report or an evidence JSON file, or - for stdin")
    v.add_argument("--certs", action="append", default=[], metavar="FILE|DIR",
                   help="certificates (DER/PEM, one or many; a directory is read recursively): VCEK/VLEK, ASK/ASVK, "
                        "ARK, CRLs; repeatable")
    v.add_argument("--cert-table", metavar="FILE", help="extended-report certificate table (GUID table, auxblob)")
    v.add_argument("--crl", action="append", default=[], metavar="FILE", help="an ARK-signed CRL (DER/PEM)")
    v.add_argument("--check-crl", action="store_true", help="require a CRL (given, in the evidence, or from KDS)")
    v.add_argument("--product", help="Milan, Genoa or Turin; must agree with CPUID and the certificate")
    v.add_argument("--report-data", metavar="HEX", help="expected REPORT_DATA (up to 64 bytes, zero-padded)")
    v.add_argument("--at", metavar="ISO8601", help="check certificate and firmware endorsement validity at this time (default: now)")
    v.add_argument("--trust-root", metavar="PEM", help="also trust this self-signed SIMULATED root (results say so)")
    v.add_argument("--no-provisional", action="store_true",
                   help="fail (instead of warn) when COMMITTED_TCB differs from CURRENT_TCB")
    v.add_argument("--offline", action="store_true", help="never contact AMD KDS; use the cache only")
    v.add_argument("--kds-cache", metavar="DIR", help="KDS cache directory (default: $XDG_CACHE_HOME/firmgate/kds)")
    v.add_argument("--json", action="store_true", help="print the verdict as JSON")
    v.add_argument("--policy", metavar="FILE_OR_DIR",
                   help="appraise against this owner policy (a tenant's TOML file, or a policy directory)")
    v.add_argument("--tenant", metavar="T", help="the tenant whose policy applies (needed with a directory)")
    v.add_argument("--firmware", action="append", default=[], metavar="FILE",
                   help="firmware add-on or image the VM supplied (accepted only if the policy lists its digest, "
                        "or a publisher it trusts endorsed it)")
    v.add_argument("--endorsement", action="append", default=[], metavar="FILE",
                   help="a publisher's endorsement of a --firmware (an add-on's .corim sections count too)")
    v.add_argument("--measure-cache", metavar="DIR", help="cache of expected measurements (protect like the policy)")
    v.add_argument("--ear-out", metavar="FILE", help="write the signed EAR attestation result (JWT) here")
    v.add_argument("--ear-key", metavar="PEM",
                   help="EC private key that signs --ear-out (P-256: ES256, P-384: ES384)")
    v.set_defaults(func=verify_handler)


# -- input helpers ---------------------------------------------------------------------------
def _read(path: str, what: str, limit: int) -> bytes:
    if path == "-":
        data = sys.stdin.buffer.read(limit + 1)
    else:
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"{what} {path}: no such file")
        with p.open("rb") as f:
            data = f.read(limit + 1)
    if len(data) > limit:
        raise UsageError(f"{what} {path}: larger than {limit} bytes")
    return data


def _load_evidence(path: str) -> Evidence:
    return load_evidence(_read(path, "report", MAX_EVIDENCE_SIZE))


def _cert_files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        wanted = (f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in (".pem", ".der", ".crt", ".cer", ".crl"))
        files = sorted(itertools.islice(wanted, MAX_CERT_FILES + 1))
        if len(files) > MAX_CERT_FILES:
            raise UsageError(f"--certs {path}: more than {MAX_CERT_FILES} certificate files")
        return files
    if p.is_file():
        return [p]
    raise UsageError(f"--certs {path}: no such file or directory")


def _load_cert_args(paths: list[str], crl_paths: list[str]
                    ) -> tuple[tuple[x509.Certificate, ...], tuple[x509.CertificateRevocationList, ...]]:
    certs: list[x509.Certificate] = []
    crls: list[x509.CertificateRevocationList] = []
    for path in paths:
        for f in _cert_files(path):
            data = _read(str(f), "certificate file", 256 * 1024)
            if f.suffix.lower() == ".crl" or b"BEGIN X509 CRL" in data:
                crls.append(load_crl(data, str(f)))
                continue
            try:
                certs.extend(load_certificates(data, str(f)))
            except CertificateFormatError:
                try:
                    crls.append(load_crl(data, str(f)))   # a DER CRL with a .der name
                except CertificateFormatError:
                    raise CertificateFormatError(f"{f}: neither a certificate nor a CRL") from None
    for path in crl_paths:
        crls.append(load_crl(_read(path, "CRL", 256 * 1024), path))
    return tuple(certs), tuple(crls)


def _parse_at(text: str | None) -> dt.datetime | None:
    if text is None:
        return None
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--at {text!r} is not an ISO 8601 time (e.g. 2025-06-01T00:00:00Z)") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _parse_hex(text: str | None) -> bytes | None:
    if text is None:
        return None
    t = text.lower().removeprefix("0x")
    try:
        data = bytes.fromhex(t)
    except ValueError:
        raise UsageError("--report-data is not hex") from None
    if len(data) > 64:
        raise UsageError(f"--report-data is {len(data)} bytes; REPORT_DATA holds 64")
    return data


def _product(text: str | None) -> Product | None:
    if text is None:
        return None
    try:
        return Product.parse(text)
    except FirmgateError:
        raise UsageError(f"--product {text!r}: expected Milan, Genoa or Turin") from None


def _kds_cache(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "firmgate" / "kds"


def options_from_args(args: argparse.Namespace) -> VerifyOptions:
    certs, crls = _load_cert_args(args.certs, args.crl)
    if args.cert_table:
        for entry in parse_cert_table(_read(args.cert_table, "--cert-table", 64 * 1024)):
            if entry.kind == "CRL":
                crls += (load_crl(entry.data, f"{args.cert_table} (CRL)"),)
            elif entry.kind != "OTHER":
                certs += tuple(load_certificates(entry.data, f"{args.cert_table} ({entry.kind})"))
    store = DEFAULT_TRUST_STORE
    if args.trust_root:
        root = load_certificate(_read(args.trust_root, "--trust-root", 64 * 1024), "--trust-root")
        if root.issuer != root.subject:
            raise UsageError(f"--trust-root {args.trust_root}: not a self-signed root certificate")
        store = store.with_simulated_root(root)
    return VerifyOptions(now=_parse_at(args.at), trust_store=store,
                         fetcher=HttpFetcher(_kds_cache(args.kds_cache), offline=args.offline),
                         certs=certs, crls=crls, product=_product(args.product),
                         allow_provisional=not args.no_provisional, check_crl=args.check_crl,
                         report_data=_parse_hex(args.report_data))


# -- output --------------------------------------------------------------------------------
_MARK = {Outcome.PASS: "ok", Outcome.WARN: "WARN", Outcome.FAIL: "FAILED", Outcome.SKIP: "skip"}


def print_verdict(name: str, verdict: Verdict, out: Any = None) -> None:
    out = out or sys.stdout
    facts = verdict.facts
    head = "OK" if verdict.accepted else "FAIL"
    print(f"{head}: {name}", file=out)
    if facts:
        sim = "  ** SIMULATED platform: not AMD's roots **" if facts.get("simulated") else ""
        print(f"  {facts.get('product')} {facts.get('signer')}, report v{facts.get('report_version')}, "
              f"root {facts.get('root')!r}{sim}", file=out)
    width = max((len(c.name) for c in verdict.checks), default=10)
    for c in verdict.checks:
        print(f"  {_MARK[c.outcome]:<6} {c.name:<{width}}  {c.message}", file=out)


def verify_handler(args: argparse.Namespace) -> int:
    from ..cli import print_json

    if not args.policy and (args.tenant or args.firmware or args.endorsement or args.ear_out):
        raise UsageError("--tenant, --firmware and --ear-out need --policy")
    if bool(args.ear_out) != bool(args.ear_key):
        raise UsageError("--ear-out and --ear-key go together")
    evidence = _load_evidence(args.report)          # bad input: exit 2
    options = options_from_args(args)
    when = None if options.now is None else int(options.now.timestamp())  # endorsements are checked at --at too
    loaded = _load_policy(args, when) if args.policy else None   # a broken policy is bad input: exit 2
    try:
        verified = verify_to_report(evidence, options)
        if loaded is None:
            verdict = Verdict(checks=verified.checks, evidence_sha384=evidence_digest(evidence),
                              facts=verified.facts())
        else:
            verdict = appraise(verified, loaded, expected_report_data=options.report_data, now=when)
    except (EvidenceError, FetchError):
        raise                                      # exit 2 / 3 with one line
    except TrustError as exc:                      # rejected: still one verdict shape, exit 1
        verdict = Verdict(checks=(CheckResult(check_name_for(exc), Outcome.FAIL, exc.diagnostics()),),
                          evidence_sha384=evidence_digest(evidence))
    if args.ear_out:
        _write_ear(args, verdict)
    if args.json:
        print_json(verdict.to_dict())
    else:
        print_verdict(args.report, verdict)
    return 0 if verdict.accepted else 1


def _load_policy(args: argparse.Namespace, now: int | None) -> Any:
    from ..appraise.store import load_for_cli

    loaded = load_for_cli(args.policy, args.tenant, cache_dir=args.measure_cache)
    import hashlib

    from ..appraise.reference import split_firmware
    endorsements = tuple(_read(p, "--endorsement", 64 * 1024) for p in args.endorsement)
    for path in args.firmware:      # the VM's own add-on/image: measured only if listed or endorsed
        data = _read(path, "--firmware", 64 * 1024 * 1024)
        payload, carried = split_firmware(data)
        if loaded.policy.firmware_by_digest(hashlib.sha384(payload).hexdigest()) is None and loaded.policy.publishers:
            loaded.table.add_endorsed(payload, carried + endorsements, now)  # EndorsementRefused: why (exit 1)
        else:
            loaded.add_firmware_bytes(data)
    return loaded


def _write_ear(args: argparse.Namespace, verdict: Verdict) -> None:
    """Sign the verdict as an EAR JWT; written even for a rejection (status contraindicated)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from ..ear import issue_ear_jwt

    try:
        key = load_pem_private_key(_read(args.ear_key, "--ear-key", 64 * 1024), password=None)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--ear-key {args.ear_key}: not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in ("secp256r1", "secp384r1"):
        raise UsageError(f"--ear-key {args.ear_key}: need an EC P-256 or P-384 private key")
    alg = "ES256" if key.curve.name == "secp256r1" else "ES384"
    token = issue_ear_jwt(verdict, key, alg)
    fd = os.open(args.ear_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")


def show_handler(args: argparse.Namespace) -> int:
    from ..cli import print_json

    evidence = _load_evidence(args.report)
    product = _product(args.product)
    r = evidence.report
    data = r.to_dict(product)
    certs = []
    for c in evidence.certs:
        try:
            info = parse_leaf(c)
            kind = f"{info.kind} ({info.product_name}, {info.tcb()})"
        except FirmgateError:
            kind = "CA"
        certs.append({"subject": common_name(c), "kind": kind, "not_after": c.not_valid_after_utc.isoformat()})
    data["evidence_shape"] = evidence.shape
    data["certificates"] = certs
    if args.json:
        print_json(data)
        return 0
    for key, value in data.items():
        print(f"{key:<20} {_show_value(key, value, r.version)}")
        if key == "certificates":
            for item in value:
                print(f"{'':<20}   {item['kind']}: {item['subject']} (not after {item['not_after']})")
    return 0


_FLAG_WORDS = {"policy": GUEST_POLICY, "platform_info": PLATFORM_INFO, "key_info": KEY_INFO}
_ABSENT = {"cpuid": "absent (reserved in a version 2 report)",
           "product": "unknown (a version 2 report has no CPUID; pass --product)",
           "launch_mit_vector": "absent (mitigation vectors exist from report version 5)",
           "current_mit_vector": "absent (mitigation vectors exist from report version 5)"}


def _show_value(key: str, value: Any, version: int) -> str:
    """One line of `report show`: flag words by name, absent fields say why, never Python's None."""
    if value is None:
        return _ABSENT.get(key, "absent")
    if key in _FLAG_WORDS:
        word = _FLAG_WORDS[key]
        set_ = [n for n in word.names if value.get(n)]
        clear = [n for n in word.names if not value.get(n)]
        parts = [str(value["raw"])]
        if key == "policy":
            parts.append(f"abi {value['abi_major']}.{value['abi_minor']}")
        if key == "key_info":
            parts.append(f"signing_key {value['signing_key']}")
        parts.append("set: " + (", ".join(set_) or "none"))
        parts.append("clear: " + (", ".join(clear) or "none"))
        unknown = value.get("unknown_bits") or []
        parts.append("unknown bits: " + (", ".join(map(str, unknown)) if unknown else "none"))
        return "; ".join(parts)
    if key.endswith("_mit_vector"):
        bits = value.get("bits") or []
        return f"{value['raw']}; set bits: " + (", ".join(map(str, bits)) if bits else "none")
    if isinstance(value, dict):
        return ", ".join(f"{k}={'-' if v is None else v}" for k, v in value.items())
    if isinstance(value, list):
        return str(len(value))
    return str(value)
