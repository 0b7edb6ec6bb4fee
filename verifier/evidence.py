"""Evidence loading: the report plus whatever certificates came with it, from every shape firmgate reads.

Shapes (all hostile input: sizes bounded, types checked, fail closed with a reason):
- a raw 1184-byte report;
- Trustee/CoCo `SnpEvidence` JSON (KBS-FACTS.md section 1): `attestation_report`
  field by field, byte fields as arrays of integers; the raw report is rebuilt
  with reserved bytes zero, then parsed and verified like any other;
- firmgate's own JSON: `{"report": b64, "cert_table": b64|null, "certs": [b64 DER|PEM]}`;
- the configfs-tsm JSON used by veraison: `{"outblob": b64, "auxblob": b64, "provider": ..}`.
"""
from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .abi.certtable import GUIDS, parse_cert_table
from .abi.fields import Product, TcbVersion, product_from_cpuid
from .abi.report import LAYOUT, REPORT_SIZE, AttestationReport, pack_fields
from .certs import MAX_CERT_SIZE, MAX_CERTS, Lru, load_certificates, load_crl
from .errors import CertificateFormatError, EvidenceError, MalformedReport

MAX_EVIDENCE_SIZE = 512 * 1024   # a Trustee JSON with a full chain is ~40 KB


@dataclass(frozen=True)
class Evidence:
    report: AttestationReport
    certs: tuple[x509.Certificate, ...] = ()
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    shape: str = "raw"             # "raw" | "firmgate-json" | "snp-evidence" | "tsm"
    cert_source: str | None = None  # "cert_table" | "cert_chain" | "certs" | None


def load_evidence(data: bytes) -> Evidence:
    """Evidence from a file's bytes: a raw report or one of the JSON shapes."""
    if not isinstance(data, (bytes, bytearray)):
        raise EvidenceError(f"evidence must be bytes, not {type(data).__name__}")
    if len(data) > MAX_EVIDENCE_SIZE:
        raise EvidenceError(f"evidence is {len(data)} bytes; at most {MAX_EVIDENCE_SIZE}")
    # Exactly 1184 bytes is always a raw report: every JSON shape holding a report is longer
    # (base64 alone is 1580 characters), so a report whose first byte happens to be '{' is
    # still read, and refused, as a report.
    if len(data) != REPORT_SIZE and bytes(data).lstrip()[:1] == b"{":
        try:
            obj = json.loads(bytes(data).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise EvidenceError(f"evidence looks like JSON but does not parse: {exc}") from None
        return evidence_from_json(obj)
    if len(data) != REPORT_SIZE:
        raise MalformedReport(f"evidence is {len(data)} bytes: neither a {REPORT_SIZE}-byte report nor JSON")
    return Evidence(report=AttestationReport.from_bytes(bytes(data)), shape="raw")


def evidence_from_json(obj: Any) -> Evidence:
    """Evidence from an already-parsed JSON value (the broker's `primary_evidence`)."""
    if not isinstance(obj, dict):
        raise EvidenceError("evidence JSON must be an object")
    if "primary_evidence" in obj:      # the KBS composite wrapper; the inner object is the evidence
        inner = obj["primary_evidence"]
        if isinstance(inner, dict) and "primary_evidence" in inner:
            raise EvidenceError("primary_evidence is nested in primary_evidence")
        return evidence_from_json(inner)
    if "attestation_report" in obj:
        return _from_snp_evidence(obj)
    if "outblob" in obj:
        return _from_tsm(obj)
    if "report" in obj:
        return _from_firmgate(obj)
    raise EvidenceError("evidence JSON has none of attestation_report (Trustee), report (firmgate), outblob (tsm)")


# -- helpers ------------------------------------------------------------------------
def _b64(value: Any, what: str, limit: int) -> bytes:
    """Standard or URL-safe base64, padding optional (configfs-tsm tools write base64url)."""
    if not isinstance(value, str):
        raise EvidenceError(f"{what} must be a base64 string")
    if len(value) > limit * 4 // 3 + 8:
        raise EvidenceError(f"{what} is too large")
    text = value.strip()
    alt = b"-_" if ("-" in text or "_" in text) else b"+/"
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=alt, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EvidenceError(f"{what} is not valid base64: {exc}") from None


def _certs_from_table(blob: bytes) -> tuple[tuple[x509.Certificate, ...], tuple[x509.CertificateRevocationList, ...]]:
    certs: list[x509.Certificate] = []
    crls: list[x509.CertificateRevocationList] = []
    for entry in parse_cert_table(blob):
        if entry.kind == "CRL":
            crls.append(load_crl(entry.data, "CRL in the certificate table"))
        elif entry.kind != "OTHER":   # entries with other GUIDs are not ours to judge; ignored
            certs.extend(load_certificates(entry.data, f"{entry.kind} in the certificate table"))
    return tuple(certs), tuple(crls)


# -- firmgate JSON ---------------------------------------------------------------------
def _from_firmgate(obj: Mapping[str, Any]) -> Evidence:
    unknown = set(obj) - {"report", "cert_table", "certs"}
    if unknown:
        raise EvidenceError(f"firmgate evidence JSON has unknown keys: {', '.join(sorted(unknown))}")
    report = AttestationReport.from_bytes(_b64(obj["report"], "report", REPORT_SIZE))
    certs: tuple[x509.Certificate, ...] = ()
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    source = None
    table = obj.get("cert_table")
    if table is not None:
        certs, crls = _certs_from_table(_b64(table, "cert_table", 64 * 1024))
        source = "cert_table"
    extra = obj.get("certs")
    if extra is not None:
        if not isinstance(extra, list) or len(extra) > MAX_CERTS:
            raise EvidenceError(f"certs must be a list of at most {MAX_CERTS} base64 certificates")
        more: list[x509.Certificate] = []
        for i, item in enumerate(extra):
            more.extend(load_certificates(_b64(item, f"certs[{i}]", MAX_CERT_SIZE * 2), f"certs[{i}]"))
        certs += tuple(more)
        source = source or "certs"
    return Evidence(report=report, certs=certs, crls=crls, shape="firmgate-json", cert_source=source)


def firmgate_evidence_json(report: bytes, cert_table: bytes | None = None,
                           certs: Iterable[x509.Certificate] | None = None) -> dict[str, Any]:
    """firmgate's own evidence JSON, what _from_firmgate reads: the base64 report, the GUID
    certificate table (null when there is none) and, when given, certificates as base64 DER."""
    out: dict[str, Any] = {"report": base64.b64encode(report).decode(),
                           "cert_table": base64.b64encode(cert_table).decode() if cert_table else None}
    if certs is not None:
        out["certs"] = [base64.b64encode(c.public_bytes(Encoding.DER)).decode() for c in certs]
    return out


# -- configfs-tsm (veraison) ---------------------------------------------------------------
def _from_tsm(obj: Mapping[str, Any]) -> Evidence:
    provider = obj.get("provider")
    if provider is not None and (not isinstance(provider, str) or provider.strip() != "sev_guest"):
        raise EvidenceError(f"configfs-tsm provider is {provider!r}; firmgate reads sev_guest")
    report = AttestationReport.from_bytes(_b64(obj["outblob"], "outblob", REPORT_SIZE))
    aux = obj.get("auxblob")
    if aux is None:
        return Evidence(report=report, shape="tsm")
    certs, crls = _certs_from_table(_b64(aux, "auxblob", 64 * 1024))
    return Evidence(report=report, certs=certs, crls=crls, shape="tsm", cert_source="cert_table")


# -- Trustee SnpEvidence -----------------------------------------------------------------
# JSON key -> report field (KBS-FACTS section 1). Byte arrays must have the exact size.
_BYTE_FIELDS = ("family_id", "image_id", "report_data", "measurement", "host_data", "id_key_digest",
                "author_key_digest", "report_id", "report_id_ma", "chip_id")
_INT_FIELDS = {"version": "version", "guest_svn": "guest_svn", "policy": "policy", "vmpl": "vmpl",
               "sig_algo": "signature_algo", "plat_info": "platform_info", "key_info": "key_info"}
_TCB_FIELDS = ("current_tcb", "reported_tcb", "committed_tcb", "launch_tcb")
_OPT_INT_FIELDS = ("cpuid_fam_id", "cpuid_mod_id", "cpuid_step", "launch_mit_vector", "current_mit_vector")
_KNOWN_KEYS = set(_BYTE_FIELDS) | set(_INT_FIELDS) | set(_TCB_FIELDS) | set(_OPT_INT_FIELDS) | {
    "current", "committed", "signature"}
_REQUIRED_KEYS = frozenset(_BYTE_FIELDS) | frozenset(_INT_FIELDS) | frozenset(_TCB_FIELDS) | {
    "current", "committed", "signature"}
_INT_BITS = {key: 8 * LAYOUT[field][1] for key, field in _INT_FIELDS.items()}
_OPT_INT_BITS = {key: 8 * LAYOUT[key][1] for key in _OPT_INT_FIELDS}
_BYTE_SIZES = {key: LAYOUT[key][1] for key in _BYTE_FIELDS}
_BYTE_LENGTHS = list(_BYTE_SIZES.values())
_BYTE_SPANS = tuple(zip(_BYTE_FIELDS, itertools.accumulate([0, *_BYTE_LENGTHS]), itertools.accumulate(_BYTE_LENGTHS),
                        strict=False))  # the running start has one more element than the fields




def _int(value: Any, what: str, bits: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
        raise EvidenceError(f"attestation_report.{what} must be an unsigned {bits}-bit integer")
    return value


def _json_bytes(value: list[Any]) -> bytes | None:
    """The bytes a JSON array of integers 0..255 stands for, or None if it holds anything else.

    C-speed throughout (a per-element generator over a handshake's arrays cost more than the
    report signature). Used for the report's own fields (hundreds of elements, new every time;
    cert_chain arrays use _chain_bytes). Types first: only an exact `int` passes
    (a bool is an int subclass that bytearray() would read as 0/1; a float, string, null, array
    or object is refused), so nothing but ints reaches bytearray(), which refuses a value
    outside 0..255 with ValueError. (bytearray() fills from a list ~3x faster than bytes().)"""
    if list(map(type, value)).count(int) != len(value):
        return None
    try:
        return bytes(bytearray(value))
    except ValueError:
        return None


# sha256 of a certificate/CRL array's bytes -> where it holds 0x00/0x01 (see _chain_bytes)
_BOOL_SPOTS = Lru(256)


def clear_caches() -> None:
    """Forget the memoised cert_chain byte positions (verifier.verify.clear_caches calls this)."""
    _BOOL_SPOTS.clear()
    _tcb_u64.cache_clear()


def _bool_spots(data: bytes) -> tuple[int, ...]:
    spots: list[int] = []
    for byte in (0, 1):
        i = data.find(byte)
        while i >= 0:
            spots.append(i)
            i = data.find(byte, i + 1)
    return tuple(spots)


def _chain_bytes(value: list[Any]) -> bytes | None:
    """The bytes of a cert_chain entry's `data` array (JSON integers 0..255), or None.

    Certificates are kilobytes and arrive on every handshake, so the per-element type pass of
    _json_bytes (~20 ns an element) is avoided: bytearray() refuses every JSON value that is not
    an integer 0..255 (float, string, null, array, object: TypeError; < 0 or > 255: ValueError)
    except a bool, which it reads as 0 or 1. So only the elements where the bytes hold 0x00 or
    0x01 need their type looked at; those positions are memoised by the bytes' SHA-256 (the same
    ARK/ASK/VCEK every time), and a bool there is refused on every call, cached or not.
    (Python objects JSON cannot produce, such as int subclasses, are read as the integers they
    are; the report's own fields keep the exact-int check of _json_bytes.)"""
    try:
        data = bytes(bytearray(value))
    except (TypeError, ValueError):
        return None
    key = hashlib.sha256(data).digest()
    spots = _BOOL_SPOTS.get(key)
    if spots is None:
        spots = _bool_spots(data)
        _BOOL_SPOTS.put(key, spots)
    if bool in map(type, map(value.__getitem__, spots)):
        return None
    return data


def _byte_array(value: Any, what: str, size: int) -> bytes:
    if not isinstance(value, list) or len(value) != size:
        raise EvidenceError(f"attestation_report.{what} must be an array of {size} integers")
    data = _json_bytes(value)
    if data is None:
        raise EvidenceError(f"attestation_report.{what} must hold integers 0..255")
    return data


_TCB_KEYS = frozenset(("fmc", "bootloader", "tee", "snp", "microcode"))
_TCB_PARTS = ("bootloader", "tee", "snp", "microcode")


@functools.lru_cache(maxsize=1024)
def _tcb_u64(turin: bool, bootloader: int, tee: int, snp: int, microcode: int, fmc: int) -> int:
    """TcbVersion.encode, memoised: a chip's TCB values repeat on every handshake (arguments are checked bytes)."""
    if turin:
        return TcbVersion.encode(Product.TURIN, fmc=fmc, bootloader=bootloader, tee=tee, snp=snp, microcode=microcode)
    return TcbVersion.encode(Product.MILAN, bootloader=bootloader, tee=tee, snp=snp, microcode=microcode)


def _tcb(value: Any, what: str, turin: bool) -> int:
    if not isinstance(value, dict) or not value.keys() <= _TCB_KEYS:
        raise EvidenceError(f"attestation_report.{what} must be an object fmc/bootloader/tee/snp/microcode")
    bl, tee, snp, uc = (_int(value.get(k), f"{what}.{k}", 8) for k in _TCB_PARTS)
    fmc = value.get("fmc")
    if turin:
        return _tcb_u64(True, bl, tee, snp, uc, _int(fmc if fmc is not None else 0, f"{what}.fmc", 8))
    if fmc is not None:
        raise EvidenceError(f"attestation_report.{what}.fmc is set, but the report is not from a Turin CPU")
    return _tcb_u64(False, bl, tee, snp, uc, 0)   # Milan and Genoa share this layout


def _version(value: Any, what: str) -> tuple[int, int, int]:
    if not isinstance(value, dict) or value.keys() != {"major", "minor", "build"}:
        raise EvidenceError(f"attestation_report.{what} must be an object major/minor/build")
    return (_int(value["major"], f"{what}.major", 8), _int(value["minor"], f"{what}.minor", 8),
            _int(value["build"], f"{what}.build", 8))


def _byte_fields(ar: Mapping[str, Any]) -> dict[str, bytes]:
    """The report's byte-array fields (not the signature), each exactly its LAYOUT size.

    One type check and one conversion over all ten arrays (~450 elements) when they are well
    formed (a call per array cost more than the arrays); otherwise field by field in
    _BYTE_FIELDS order, so the first bad field is the one named."""
    arrays = [ar[key] for key in _BYTE_FIELDS]
    if all(type(a) is list for a in arrays) and list(map(len, arrays)) == _BYTE_LENGTHS:
        flat: list[Any] = []
        for a in arrays:
            flat += a            # list concatenation in C; cheaper than itertools.chain here
        blob = _json_bytes(flat)
        if blob is not None:
            return {key: blob[a:b] for key, a, b in _BYTE_SPANS}
    return {key: _byte_array(ar[key], key, size) for key, size in _BYTE_SIZES.items()}


def rebuild_report(ar: Mapping[str, Any]) -> bytes:
    """The raw 1184 bytes from a Trustee `attestation_report` object (reserved bytes zero)."""
    if not isinstance(ar, dict):
        raise EvidenceError("attestation_report must be an object")
    unknown = ar.keys() - _KNOWN_KEYS
    if unknown:
        raise EvidenceError(f"attestation_report has unknown keys: {', '.join(sorted(unknown))}")
    missing = _REQUIRED_KEYS - ar.keys()
    if missing:
        raise EvidenceError(f"attestation_report lacks: {', '.join(sorted(missing))}")
    values: dict[str, int | bytes] = {}
    for key, field in _INT_FIELDS.items():
        values[field] = _int(ar[key], key, _INT_BITS[key])
    values.update(_byte_fields(ar))
    for key, bits in _OPT_INT_BITS.items():
        if ar.get(key) is not None:
            values[key] = _int(ar[key], key, bits)
    fam, mod = values.get("cpuid_fam_id"), values.get("cpuid_mod_id")
    # The layout of a TCB object's bytes follows the CPU; without CPUID (v2) a set fmc means Turin.
    cpu = product_from_cpuid(int(fam), int(mod)) if isinstance(fam, int) and isinstance(mod, int) else None
    turin = cpu is Product.TURIN or (cpu is None and any(
        isinstance(ar[k], dict) and ar[k].get("fmc") is not None for k in _TCB_FIELDS))
    for key in _TCB_FIELDS:
        values[key] = _tcb(ar[key], key, turin)
    for key in ("current", "committed"):
        values[f"{key}_major"], values[f"{key}_minor"], values[f"{key}_build"] = _version(ar[key], key)
    sig = ar["signature"]
    if not isinstance(sig, dict) or sig.keys() != {"r", "s"}:
        raise EvidenceError("attestation_report.signature must be an object {r, s}")
    values["signature_r"] = _byte_array(sig["r"], "signature.r", 72)
    values["signature_s"] = _byte_array(sig["s"], "signature.s", 72)
    # Every value was range- and size-checked above, so the packer cannot truncate or wrap one.
    return pack_fields(values)


def _from_snp_evidence(obj: Mapping[str, Any]) -> Evidence:
    unknown = set(obj) - {"attestation_report", "cert_chain"}
    if unknown:
        raise EvidenceError(f"SnpEvidence has unknown keys: {', '.join(sorted(unknown))}")
    report = AttestationReport.from_bytes(rebuild_report(obj["attestation_report"]))
    chain = obj.get("cert_chain")
    if chain is None:
        return Evidence(report=report, shape="snp-evidence")
    if not isinstance(chain, list) or len(chain) > MAX_CERTS:
        raise EvidenceError(f"cert_chain must be null or a list of at most {MAX_CERTS} entries")
    certs: list[x509.Certificate] = []
    crls: list[x509.CertificateRevocationList] = []
    for i, entry in enumerate(chain):
        if not isinstance(entry, dict) or set(entry) != {"cert_type", "data"}:
            raise EvidenceError(f"cert_chain[{i}] must be an object {{cert_type, data}}")
        kind = entry["cert_type"]
        data = entry["data"]
        if not isinstance(data, list) or len(data) > MAX_CERT_SIZE:
            raise EvidenceError(f"cert_chain[{i}].data must be an array of at most {MAX_CERT_SIZE} bytes")
        blob = _chain_bytes(data)
        if blob is None:
            raise EvidenceError(f"cert_chain[{i}].data must hold integers 0..255")
        if kind == "CRL":
            crls.append(load_crl(blob, f"cert_chain[{i}] (CRL)"))
        elif kind in ("ARK", "ASK", "VCEK", "VLEK"):
            certs.extend(load_certificates(blob, f"cert_chain[{i}] ({kind})"))
        elif kind == "Empty" or (isinstance(kind, dict) and set(kind) == {"OTHER"}):
            continue   # not a certificate firmgate uses
        else:
            raise CertificateFormatError(f"cert_chain[{i}].cert_type {kind!r} is not a known CertType")
    return Evidence(report=report, certs=tuple(certs), crls=tuple(crls), shape="snp-evidence",
                    cert_source="cert_chain")


def snp_evidence_json(report: bytes | AttestationReport,
                      cert_chain: Iterable[tuple[str, bytes]] | None = None,
                      product: Product | str | None = None) -> dict[str, Any]:
    """The Trustee SnpEvidence JSON for a raw report (the inverse of rebuild_report).

    `cert_chain`: (kind, DER) pairs, kind in ARK/ASK/VCEK/VLEK/CRL. For a v2 report the
    TCB layout needs `product` when it is Turin (Milan/Genoa share a layout).
    """
    r = report if isinstance(report, AttestationReport) else AttestationReport.from_bytes(report)
    prod = Product.parse(product) if isinstance(product, str) else product
    prod = prod or r.cpuid_product or Product.MILAN

    def arr(b: bytes) -> list[int]:
        return list(b)

    def tcb(value: int) -> dict[str, Any]:
        t = TcbVersion.from_u64(value, prod)
        return {"fmc": t.fmc, "bootloader": t.bootloader, "tee": t.tee, "snp": t.snp, "microcode": t.microcode}

    raw = r.raw
    ar: dict[str, Any] = {
        "version": r.version, "guest_svn": r.guest_svn, "policy": r.policy.raw,
        "family_id": arr(r.family_id), "image_id": arr(r.image_id), "vmpl": r.vmpl,
        "sig_algo": r.signature_algo, "current_tcb": tcb(r.current_tcb), "plat_info": r.platform_info.raw,
        "key_info": r.key_info.raw, "report_data": arr(r.report_data), "measurement": arr(r.measurement),
        "host_data": arr(r.host_data), "id_key_digest": arr(r.id_key_digest),
        "author_key_digest": arr(r.author_key_digest), "report_id": arr(r.report_id),
        "report_id_ma": arr(r.report_id_ma), "reported_tcb": tcb(r.reported_tcb),
        "cpuid_fam_id": r.cpuid_fam_id, "cpuid_mod_id": r.cpuid_mod_id, "cpuid_step": r.cpuid_step,
        "chip_id": arr(r.chip_id), "committed_tcb": tcb(r.committed_tcb),
        "current": {"major": r.current_build.major, "minor": r.current_build.minor, "build": r.current_build.build},
        "committed": {"major": r.committed_build.major, "minor": r.committed_build.minor,
                      "build": r.committed_build.build},
        "launch_tcb": tcb(r.launch_tcb),
        "launch_mit_vector": r.launch_mit_vector, "current_mit_vector": r.current_mit_vector,
        "signature": {"r": arr(raw[0x2A0:0x2E8]), "s": arr(raw[0x2E8:0x330])},
    }
    chain = None
    if cert_chain is not None:
        chain = []
        for kind, der in cert_chain:
            if kind not in GUIDS:
                raise ValueError(f"unknown cert_type {kind!r}")
            chain.append({"cert_type": kind, "data": list(der)})
    return {"attestation_report": ar, "cert_chain": chain}

