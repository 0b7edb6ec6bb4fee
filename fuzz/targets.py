"""One fuzz target per parser that reads hostile input, shared by atheris and the tests.

Contract of every target: `run(data)` feeds `data` to the parser and returns
normally, or raises the error class the parser promises for bad input
(FirmgateError and its subclasses), which the target swallows. ANY other
exception (IndexError, struct.error, a UnicodeDecodeError, RecursionError, a
500 from the broker ...) escapes: that is a crash, i.e. a bug to fix and to keep
under fuzz/regressions/<target>/.

Seeds are built at run time (the `sim` platform, and ../shared through the test
constants), never copied into the repo.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from verifier.errors import FirmgateError

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FIRMGATE_SHARED", REPO.parent / "shared"))
REGRESSIONS = Path(__file__).resolve().parent / "regressions"


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]
    what: str


_SIM: Any = None


def _sim() -> Any:
    global _SIM
    if _SIM is None:
        from sim.platform import SimPlatform
        _SIM = SimPlatform("Milan")
    return _SIM


def _shared_files(sub: str, pattern: str) -> list[bytes]:
    d = SHARED / sub
    return [p.read_bytes() for p in sorted(d.rglob(pattern)) if p.is_file()] if d.is_dir() else []


# -- report parser ---------------------------------------------------------------------------
def run_report(data: bytes) -> None:
    from verifier.abi.fields import Product
    from verifier.abi.report import AttestationReport
    try:
        rep = AttestationReport.from_bytes(data)
    except FirmgateError:
        return
    rep.to_dict()
    for prod in (Product.MILAN, Product.GENOA, Product.TURIN):
        try:
            rep.to_dict(prod)
            for which in ("current", "reported", "committed", "launch"):
                rep.tcb(which, prod)
        except FirmgateError:
            pass


def seeds_report() -> list[bytes]:
    out = [r for r in _shared_files("vectors/snp", "*.bin") if len(r) == 1184]
    out.append(bytes(_sim().sign_report(report_data=b"\x01" * 64)))
    return out


# -- evidence loader (raw, Trustee SnpEvidence JSON, firmgate JSON, configfs-tsm) -------------
def run_evidence(data: bytes) -> None:
    from verifier.evidence import load_evidence
    try:
        ev = load_evidence(data)
    except FirmgateError:
        return
    ev.report.to_dict()


def seeds_evidence() -> list[bytes]:
    sim = _sim()
    rep = bytes(sim.sign_report(report_data=b"\x02" * 64))
    out = [rep, json.dumps(sim.trustee_json(rep, include=("ARK", "ASK", "LEAF"))).encode(),
           json.dumps(sim.firmgate_json(rep)).encode(), json.dumps(sim.tsm_json(rep)).encode()]
    out += _shared_files("vectors/kbs", "*.json")
    return out


# -- certificate table ---------------------------------------------------------------------
def run_certtable(data: bytes) -> None:
    from verifier.abi.certtable import parse_cert_table
    try:
        entries = parse_cert_table(data)
    except FirmgateError:
        return
    for e in entries:
        e.kind  # noqa: B018 - the property itself is under test


def seeds_certtable() -> list[bytes]:
    return [_sim().cert_table(), _sim().cert_table(pem=True)] + [
        b for b in _shared_files("vectors/snp", "*") if 24 <= len(b) <= 64 * 1024 and b[:1] != b"-"][:4]


# -- certificates and AMD's VCEK/VLEK extensions ----------------------------------------------
def run_cert(data: bytes) -> None:
    from verifier.certs import common_name, load_certificates, serial_number
    from verifier.kds import parse_leaf
    try:
        certs = load_certificates(data)
    except FirmgateError:
        return
    for c in certs:
        serial_number(c)
        common_name(c)
        c.issuer, c.subject  # noqa: B018 - verify compares them; cryptography parses them lazily
        try:
            info = parse_leaf(c)
        except FirmgateError:
            continue
        info.tcb()


def seeds_cert() -> list[bytes]:
    from cryptography.hazmat.primitives.serialization import Encoding
    from verifier.certs import load_certificates
    sim = _sim()
    out = [c.public_bytes(Encoding.DER) for c in load_certificates(sim.chain_pem())]
    out.append(sim.chain_pem())
    for raw in _shared_files("vectors/snp", "*"):
        if raw[:2] == b"\x30\x82" and len(raw) < 16 * 1024:
            out.append(raw)
    return out


# -- chain and signature verification with hostile certificates ------------------------------
_CHAIN: Any = None


def _chain_ctx() -> Any:
    """A fixed sim chain + report shared by every process (kept beside the seed cache), and options
    trusting its root, so mutated inputs stay close to a chain that verifies."""
    global _CHAIN
    if _CHAIN is None:
        import base64
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding
        from verifier.options import default_options
        f = _mkdir(SEED_CACHE) / "chain-context.json"
        if not f.exists() or "crl" not in json.loads(f.read_text() or "{}"):  # absent, or from an older layout
            from sim.platform import make_crl
            sim = _sim()
            ctx = {"certs": [base64.b64encode(c.public_bytes(Encoding.DER)).decode()
                             for c in (sim.ark, sim.intermediate, sim.leaf)],
                   "report": base64.b64encode(sim.sign_report(report_data=b"\x05" * 64)).decode(),
                   "crl": base64.b64encode(make_crl(sim, [7, 8])).decode()}
            tmp = f.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(ctx))
            tmp.replace(f)
        ctx = json.loads(f.read_text())
        certs = [base64.b64decode(c) for c in ctx["certs"]]
        root = x509.load_der_x509_certificate(certs[0])
        _CHAIN = (certs, base64.b64decode(ctx["report"]), base64.b64decode(ctx["crl"]),
                  default_options(trust_root=root))
    return _CHAIN


def run_chain(data: bytes) -> None:
    """First byte: which part the rest replaces (0 ARK, 1 ASK, 2 VCEK, 3 the raw report, 4 the ARK's CRL)."""
    from verifier.abi.report import AttestationReport
    from verifier.certs import load_certificate, load_crl
    from verifier.evidence import Evidence
    from verifier.verify import verify_report
    if not data:
        return
    certs, report, crl, options = _chain_ctx()
    parts = list(certs) + [report, crl]
    parts[data[0] % 5] = data[1:]
    try:
        ev = Evidence(report=AttestationReport.from_bytes(parts[3]),
                      certs=tuple(load_certificate(c) for c in parts[:3]), crls=(load_crl(parts[4]),), shape="raw")
        verify_report(ev, options)
    except FirmgateError:
        return


def seeds_chain() -> list[bytes]:
    certs, report, crl, _ = _chain_ctx()
    return [bytes([i]) + c for i, c in enumerate(certs)] + [b"\x03" + report, b"\x04" + crl]


# -- UKI add-on reader (.efifw, .hwids) -----------------------------------------------------------
def run_addon(data: bytes) -> None:
    from verifier.firmware.addon import read_addon
    try:
        addon = read_addon(data)
    except FirmgateError:
        return
    for fwid in addon.fwids:
        try:
            addon.select(fwid)
        except FirmgateError:
            pass


def seeds_addon() -> list[bytes]:
    from verifier.firmware.addon import build_addon
    return [bytes(build_addon([("edk2-fuzz.1", b"\xaa" * 64)])),
            bytes(build_addon([("a", b"\x01" * 16), ("b", b"\x02" * 32)])),
            bytes(build_addon([("edk2-fuzz.1", b"\xaa" * 64)], extra_sections=[(".corim", b"\xd2\x84")]))]


# -- endorsements: CoRIM in COSE_Sign1, publisher revocation lists --------------------------------
def _publisher_key() -> Any:
    """A fixed P-256 key (the same in every process: cached seeds must verify with it)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.derive_private_key(0x5EED_F1E1_D0C5, ec.SECP256R1())


def run_endorsement(data: bytes) -> None:
    """First byte: 0 full admission (signature first), 1 the strict payload reader on unverified input
    (as if the signature had passed), 2 a revocation list."""
    from verifier.endorse.admit import PublisherRule, admit
    from verifier.endorse.corim import (
        parse_revocations,
        parse_signed,
        read_payload,
        read_revocations,
    )
    from verifier.endorse.cose import key_id

    if not data:
        return
    mode, body = data[0] % 3, data[1:]
    try:
        if mode == 0:
            key = _publisher_key().public_key()
            admit([PublisherRule("fuzz", key_id(key).hex(), key=key)], body, "00" * 48)
        elif mode == 1:
            read_payload(parse_signed(body)).endorsement.to_dict()
        else:
            read_revocations(parse_revocations(body))
    except FirmgateError:
        return


def seeds_endorsement() -> list[bytes]:
    import time

    from verifier.endorse.corim import Endorsement, Provenance, Revocations
    from verifier.endorse.corim import sign_endorsement as sign_e
    from verifier.endorse.corim import sign_revocations as sign_r

    key = _publisher_key()
    now = int(time.time())
    e = Endorsement("fuzz-1", "edk2-fuzz.1", "00" * 48, 3, "Fuzz", now - 60, now + 10 * 365 * 86400,
                    Provenance("https://example.com/x.git", "0123abcd", "make"),
                    (("vcpus=1,vcpu_type=EPYC-v4,vmm=qemu,guest_features=0x1", b"\x11" * 48),))
    raw = sign_e(e, key)
    rev = sign_r(Revocations("Fuzz", now, frozenset({"fuzz-0"}), frozenset({"11" * 48})), key)
    return [b"\x00" + raw, b"\x01" + raw, b"\x02" + rev]


# -- OVMF footer table and SEV metadata -----------------------------------------------------------
def run_ovmf(data: bytes) -> None:
    from verifier.firmware.image import inspect_firmware, require_snp_firmware
    try:
        inspect_firmware(data).to_dict()
        require_snp_firmware(data)
    except FirmgateError:
        return


def seeds_ovmf() -> list[bytes]:
    # The footer table and SEV metadata sit in the image's last pages: a 4 KiB tail keeps them.
    return [raw[-4096:] for raw in _shared_files("firmware", "*.fd")] or [b"\0" * 4096]


# -- IGVM reader and SNP launch digest -----------------------------------------------------------
def run_igvm(data: bytes) -> None:
    """First byte: 0 reads the rest as is; otherwise its CRC-32 is fixed first, so that mutations
    reach the header parser and the measurement instead of stopping at the checksum."""
    from verifier.firmware.igvm_build import fix_checksum
    from verifier.measure.igvm import measure_igvm
    if not data:
        return
    body = data[1:] if data[0] == 0 else fix_checksum(data[1:])
    for rule in ("qemu", "native-zero"):
        try:
            measure_igvm(body, rule)
        except FirmgateError:
            return


def seeds_igvm() -> list[bytes]:
    from sevsnpmeasure.sev_mode import SevMode
    from sevsnpmeasure.vmm_types import VMMType
    from sevsnpmeasure.vmsa import VMSA

    from verifier.firmware import igvm as ig
    from verifier.firmware.igvm_build import IgvmWriter
    vmsa = bytes(VMSA(SevMode.SEV_SNP, 0xFFFFF000, 0x800F12, 0x1, VMMType.QEMU).bsp_save_area)
    small = (IgvmWriter().platform().guest_policy().page(0xFFFFF000, b"\x90" * 4096).page(0x1000)
             .page(0x2000, data_type=ig.PAGE_SECRETS).page(0x3000, data_type=ig.PAGE_CPUID_DATA)
             .parameter_area(0, 0x1000).parameter(ig.VHT_MEMORY_MAP, 0, 0).parameter_insert(0x10000, 0)
             .required_memory(0x20000, 0x2000).id_block(bytes(48)).vp_context(vmsa, 0).vp_context(vmsa, 1))
    two = (IgvmWriter().platform(mask=1).platform(mask=2, platform_type=ig.PLATFORM_TDX).guest_policy(mask=3)
           .page(0x4000, mask=2).page(0x5000, bytes(4096), mask=3).vp_context(vmsa))
    return [b"\x00" + small.to_bytes(), b"\x01" + small.to_bytes(), b"\x01" + two.to_bytes()]


# -- policy loader ---------------------------------------------------------------------------
def run_policy(data: bytes) -> None:
    from verifier.appraise.policy import parse_policy
    # parse_policy returns its errors; it must never raise.
    policy, errors = parse_policy(data, "fuzz.toml", check_files=False)
    if policy is None and not errors:
        raise AssertionError("parse_policy returned neither a policy nor an error")
    for e in errors:
        e.diagnostics()


def seeds_policy() -> list[bytes]:
    return [p.read_bytes() for p in sorted((REPO / "policies").glob("*.toml"))]


# -- host_install's update channel: frames a guest sends to the host -----------------------------
class _Peer:
    """What read_frame needs of a socket: recv() over fixed bytes, then EOF."""

    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def recv(self, n: int) -> bytes:
        chunk = self._data[self._pos:self._pos + n]
        self._pos += len(chunk)
        return chunk


def run_channel(data: bytes) -> None:
    from host_install.channel import REQUEST_MAGIC, read_frame
    try:
        header, body = read_frame(_Peer(data), REQUEST_MAGIC)  # type: ignore[arg-type]
    except FirmgateError:
        return
    if not isinstance(header, dict) or not isinstance(body, bytes):
        raise AssertionError("read_frame returned something other than (dict, bytes)")


def seeds_channel() -> list[bytes]:
    from host_install.channel import REQUEST_MAGIC, encode_frame
    from verifier.firmware.addon import build_addon
    addon = bytes(build_addon([("edk2-fuzz.1", b"\xaa" * 64)]))
    return [encode_frame(REQUEST_MAGIC, {"version": 1, "op": "install", "fwid": None}, addon),
            encode_frame(REQUEST_MAGIC, {"version": 1, "op": "install", "fwid": "edk2-fuzz.1"}, b"")]


# -- the broker's JSON endpoints (in-process WSGI, real verifier, SQLite) -----------------------
_BROKER: Any = None


def _broker() -> Any:
    global _BROKER
    if _BROKER is None:
        import logging
        import secrets as _secrets
        from broker import create_app
        logging.getLogger("broker").setLevel(logging.CRITICAL)  # errors are checked, not printed
        tmp = Path(tempfile.mkdtemp(prefix="fg-fuzz-broker-"))
        (tmp / "policies").mkdir()
        # No trust root: the bindings are checked before any chain work, and that is where a
        # fuzzed body ends; tests/test_hardening_inputs.py drives bound evidence into the verifier.
        app = create_app({"DATABASE_URL": f"sqlite:///{tmp / 'fuzz.db'}", "MASTER_KEY": _secrets.token_bytes(32),
                          "POLICIES_DIR": str(tmp / "policies"), "OPERATOR_TOKEN": "fuzz-operator"})
        # A tenant "a" so that the tenant routes (secrets of a/..., firmware upload) run past authentication.
        r = app.test_client().post("/admin/v0/tenants", json={"name": "a"},
                                   headers={"Authorization": "Bearer fuzz-operator"})
        app.config["FUZZ_TENANT_TOKEN"] = r.get_json()["token"]
        _BROKER = app
    return _BROKER


_ROUTES = (("POST", "/kbs/v0/auth"), ("POST", "/kbs/v0/attest"), ("GET", "/kbs/v0/resource/a/b/c"),
           ("POST", "/admin/v0/tenants"), ("PUT", "/admin/v0/secrets/a/b/c"), ("GET", "/admin/v0/audit"),
           ("POST", "/admin/v0/firmware"))


def run_broker(data: bytes) -> None:
    """First byte picks the route, the rest is the body; /attest runs inside a fresh session."""
    if not data:
        return
    app = _broker()
    method, path = _ROUTES[data[0] % len(_ROUTES)]
    body = data[1:]
    client = app.test_client()
    headers = {"Content-Type": "application/json"}
    if path.startswith("/admin/"):
        token = "fuzz-operator" if path in ("/admin/v0/tenants", "/admin/v0/audit") else app.config["FUZZ_TENANT_TOKEN"]
        headers["Authorization"] = f"Bearer {token}"
    if path == "/kbs/v0/attest":
        r = client.post("/kbs/v0/auth", json={"version": "0.4.0", "tee": "snp"})
        if r.status_code != 200:
            raise AssertionError(f"/auth failed: {r.status_code}")
        try:  # let a fuzzed body that parses name this session's real nonce now and then
            obj = json.loads(body)
            if isinstance(obj, dict) and isinstance(obj.get("runtime-data"), dict) and data[0] & 0x80:
                obj["runtime-data"]["nonce"] = r.get_json()["nonce"]
                body = json.dumps(obj).encode()
        except (ValueError, RecursionError):
            pass
    if path == "/admin/v0/audit":
        resp = client.open(path + "?" + body[:64].decode("latin-1"), method=method, headers=headers)
    else:
        resp = client.open(path, method=method, data=body, headers=headers)
    if resp.status_code >= 500:
        raise AssertionError(f"{method} {path} answered {resp.status_code}: {resp.get_data()[:300]!r}")
    if resp.status_code != 200 and resp.status_code != 201:
        err = resp.get_json(silent=True)
        if not (isinstance(err, dict) and isinstance(err.get("type"), str) and isinstance(err.get("detail"), str)):
            raise AssertionError(f"{method} {path} {resp.status_code} without a JSON type/detail: "
                                 f"{resp.get_data()[:200]!r}")


def seeds_broker() -> list[bytes]:
    sim = _sim()
    rep = bytes(sim.sign_report(report_data=b"\x03" * 64))
    att = {"init-data": None,
           "runtime-data": {"nonce": "x", "tee-pubkey": {"kty": "EC", "crv": "P-256", "alg": "ECDH-ES+A256KW",
                                                         "x": "AAAA", "y": "AAAA"}},
           "tee-evidence": {"primary_evidence": sim.trustee_json(rep), "additional_evidence": ""}}
    auth = {"version": "0.4.0", "tee": "snp", "extra-params": {"supported-hash-algorithms": ["sha384"]}}
    from verifier.firmware.addon import build_addon
    return [b"\x00" + json.dumps(auth).encode(), b"\x01" + json.dumps(att).encode(),
            b"\x81" + json.dumps(att).encode(), b"\x02", b"\x03" + b'{"name": "acme"}', b"\x04value",
            b"\x05after=1&limit=5", b"\x06" + bytes(build_addon([("edk2-fuzz.1", b"\xaa" * 4096)]))]


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("report", run_report, seeds_report, "verifier.abi.report: raw 1184-byte SNP report"),
    Target("evidence", run_evidence, seeds_evidence, "verifier.evidence: raw / Trustee / firmgate / tsm JSON"),
    Target("certtable", run_certtable, seeds_certtable, "verifier.abi.certtable: extended-report cert table"),
    Target("cert", run_cert, seeds_cert, "verifier.certs + kds.parse_leaf: DER/PEM certs, AMD extensions"),
    Target("chain", run_chain, seeds_chain, "verifier.verify: chain, signature, CRL, TCB checks on hostile input"),
    Target("addon", run_addon, seeds_addon, "verifier.firmware.addon: UKI add-on PE, .efifw/.hwids"),
    Target("ovmf", run_ovmf, seeds_ovmf, "verifier.firmware.image: OVMF footer table, SEV metadata"),
    Target("igvm", run_igvm, seeds_igvm, "verifier.firmware.igvm + measure.igvm: IGVM file, SNP launch digest"),
    Target("endorsement", run_endorsement, seeds_endorsement,
           "verifier.endorse: CoRIM in COSE_Sign1 endorsements, revocation lists (CBOR)"),
    Target("policy", run_policy, seeds_policy, "verifier.appraise.policy: tenant TOML policy"),
    Target("channel", run_channel, seeds_channel, "host_install.channel.read_frame: guest -> host update frames"),
    Target("broker", run_broker, seeds_broker, "broker: KBS and admin JSON endpoints (no 500, JSON errors)"),
)}


SEED_CACHE = Path(os.environ.get("FIRMGATE_FUZZ_SEEDS", REPO / "fuzz" / "corpus" / ".seeds-v3"))  # v3: endorsements


def cached_seeds(name: str) -> list[bytes]:
    """The target's seeds, built once per machine (the sim chain's RSA keygen takes seconds)."""
    d = SEED_CACHE / name
    if d.is_dir() and (d / ".complete").exists():
        return [p.read_bytes() for p in sorted(d.glob("seed-*"))]
    seeds = TARGETS[name].seeds()
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=_mkdir(SEED_CACHE)))
    for i, data in enumerate(seeds):
        (tmp / f"seed-{i:03d}").write_bytes(data)
    (tmp / ".complete").touch()
    try:
        tmp.rename(d)  # atomic; a concurrent builder may have won the race, which is fine
    except OSError:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return seeds


def _mkdir(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return d


def regressions(name: str) -> list[Path]:
    d = REGRESSIONS / name
    return sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")) if d.is_dir() else []
