"""A simulated SEV-SNP platform: its own ARK/ASK(ASVK)/VCEK(VLEK)-like chain and a report signer.

Same algorithms and extensions as AMD's (RSA-4096 roots and intermediates signing
with RSASSA-PSS SHA-384 / MGF1-SHA-384 / salt 48; ECDSA P-384 leaf with the
1.3.6.1.4.1.3704.1 extensions; Milan/Genoa/Turin TCB layouts; 64- or 8-byte hwID),
but a different root: nothing signed here verifies unless that root is trusted
explicitly (`--trust-root`), and every result based on it says so.

Differences from AMD's certificates, on purpose: subject names say "SIMULATED",
and leaf serial numbers are 1 (cryptography cannot *build* a serial-0 certificate;
loading real serial-0 VCEKs is tested with the shared vectors).

Every field of a report can be set, including wrong ones, so that each check in
verifier.verify / verifier.snpchecks can be shown to fail on its own.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.asn1 import IA5String, encode_der
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from verifier.abi.certtable import build_cert_table
from verifier.abi.fields import Product, SigningKey, TcbVersion
from verifier.abi.report import SIGNED_SIZE, encode_fields, signature_to_bytes
from verifier.kds import (
    OID_BL_SPL,
    OID_CSP_ID,
    OID_FMC_SPL,
    OID_HWID,
    OID_PRODUCT_NAME,
    OID_SNP_SPL,
    OID_STRUCT_VERSION,
    OID_TEE_SPL,
    OID_UCODE_SPL,
)

PSS_SALT = 48
RSA_BITS = 4096   # as AMD's; keygen is cached per process so tests pay it once per role

CPUID = {Product.MILAN: (0x19, 0x01, 0x01), Product.GENOA: (0x19, 0x11, 0x01), Product.TURIN: (0x1A, 0x02, 0x00)}
VCEK_PRODUCT_NAME = {Product.MILAN: "Milan-B0", Product.GENOA: "Genoa", Product.TURIN: "Turin"}

_KEYS: dict[tuple[str, ...], Any] = {}


def _rsa_key(label: str) -> rsa.RSAPrivateKey:
    key = _KEYS.get(("rsa", label))
    if key is None:
        key = _KEYS[("rsa", label)] = rsa.generate_private_key(65537, RSA_BITS)
    return key


def _ec_key(label: str, curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    curve = curve or ec.SECP384R1()
    key = _KEYS.get(("ec", curve.name, label))
    if key is None:
        key = _KEYS[("ec", curve.name, label)] = ec.generate_private_key(curve)
    return key


def _pss(salt: int = PSS_SALT) -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=salt)


def _name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "firmgate SIMULATED platform (not AMD)"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


@dataclass(frozen=True)
class Tcb:
    """SPLs of the simulated platform (fmc only for Turin)."""

    bootloader: int = 9
    tee: int = 0
    snp: int = 23
    microcode: int = 72
    fmc: int | None = None

    def encode(self, product: Product) -> int:
        fmc = (self.fmc if self.fmc is not None else 1) if product is Product.TURIN else None
        return TcbVersion.encode(product, bootloader=self.bootloader, tee=self.tee, snp=self.snp,
                                 microcode=self.microcode, fmc=fmc)


class SimPlatform:
    """One simulated chip with its chain. Knobs let a test break exactly one thing."""

    def __init__(self, product: Product | str = "Milan", signer: str = "VCEK", *,
                 now: dt.datetime | None = None,
                 tcb: Tcb | None = None,
                 cert_tcb: Tcb | None = None,            # leaf's SPLs, default = tcb
                 chip_id: bytes | None = None,
                 hwid: bytes | None = None,              # leaf's hwID, default = chip id
                 hwid_der_wrapped: bool = False,
                 leaf_product_name: str | None = None,
                 leaf_validity: tuple[dt.datetime, dt.datetime] | None = None,
                 intermediate_validity: tuple[dt.datetime, dt.datetime] | None = None,
                 chain_salt: int = PSS_SALT,              # salt of the ARK->ASK->leaf PSS signatures
                 leaf_curve: ec.EllipticCurve | None = None,
                 key_label: str = "") -> None:
        self.product = product if isinstance(product, Product) else Product.parse(product)
        if signer not in ("VCEK", "VLEK"):
            raise ValueError("signer is VCEK or VLEK")
        self.signer = signer
        self.now = now or dt.datetime.now(dt.UTC)
        self.tcb = tcb or Tcb()
        self.cert_tcb = cert_tcb or self.tcb
        hw_size = 8 if self.product is Product.TURIN else 64
        default_chip = hashlib.sha512(f"sim-chip-{self.product.value}-{key_label}".encode()).digest()[:hw_size]
        self.chip_id = (chip_id if chip_id is not None else default_chip).ljust(64, b"\0")
        self.hwid = hwid if hwid is not None else self.chip_id[:hw_size]
        p = self.product.value
        # RSA keys are shared across products (keygen dominates test time); a key_label gives a
        # platform keys of its own (e.g. a second, untrusted root).
        self.ark_key = _rsa_key(f"ark-{key_label}")
        self.int_key = _rsa_key(f"{'ask' if signer == 'VCEK' else 'asvk'}-{key_label}")
        self.leaf_key = _ec_key(f"{signer}-{p}-{key_label}", leaf_curve)
        start = self.now - dt.timedelta(days=365)
        far = self.now + dt.timedelta(days=365 * 20)
        self.ark = self._ca_cert(_name(f"SIM-ARK-{p}"), _name(f"SIM-ARK-{p}"), self.ark_key, self.ark_key,
                                 (start, far), chain_salt, serial=1)
        int_cn = f"SIM-SEV-{p}" if signer == "VCEK" else f"SIM-SEV-VLEK-{p}"
        self.intermediate = self._ca_cert(_name(int_cn), self.ark.subject, self.int_key, self.ark_key,
                                          intermediate_validity or (start, far), chain_salt, serial=2)
        self.leaf = self._leaf_cert(leaf_product_name, leaf_validity or (start, self.now + dt.timedelta(days=365 * 7)),
                                    hwid_der_wrapped, chain_salt)

    # -- certificates ----------------------------------------------------------
    def _ca_cert(self, subject: x509.Name, issuer: x509.Name, key: rsa.RSAPrivateKey, signer: rsa.RSAPrivateKey,
                 validity: tuple[dt.datetime, dt.datetime], salt: int, serial: int) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(serial).not_valid_before(validity[0]).not_valid_after(validity[1])
             .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                          crl_sign=True, encipher_only=False, decipher_only=False), critical=True))
        return b.sign(signer, hashes.SHA384(), rsa_padding=_pss(salt))

    def _leaf_cert(self, product_name: str | None, validity: tuple[dt.datetime, dt.datetime], wrapped: bool,
                   salt: int) -> x509.Certificate:
        p = self.product
        name = product_name or (VCEK_PRODUCT_NAME[p] if self.signer == "VCEK" else p.value)
        t = self.cert_tcb
        exts: list[tuple[x509.ObjectIdentifier, bytes]] = [
            (OID_STRUCT_VERSION, encode_der(1 if p is Product.TURIN else 0)),
            (OID_PRODUCT_NAME, encode_der(IA5String(name))),
            (OID_BL_SPL, encode_der(t.bootloader)), (OID_TEE_SPL, encode_der(t.tee)),
            (OID_SNP_SPL, encode_der(t.snp)), (OID_UCODE_SPL, encode_der(t.microcode)),
        ]
        if p is Product.TURIN:
            exts.append((OID_FMC_SPL, encode_der(t.fmc if t.fmc is not None else 1)))
        if self.signer == "VCEK":
            exts.append((OID_HWID, encode_der(self.hwid) if wrapped else self.hwid))
        else:
            exts.append((OID_CSP_ID, encode_der(IA5String("CN=sim-csp.firmgate.invalid"))))
        b = (x509.CertificateBuilder().subject_name(_name(f"SEV-{self.signer}"))
             .issuer_name(self.intermediate.subject).public_key(self.leaf_key.public_key())
             .serial_number(1).not_valid_before(validity[0]).not_valid_after(validity[1]))
        for oid, der in exts:
            b = b.add_extension(x509.UnrecognizedExtension(oid, der), critical=False)
        return b.sign(self.int_key, hashes.SHA384(), rsa_padding=_pss(salt))

    def root_pem(self) -> bytes:
        return self.ark.public_bytes(Encoding.PEM)

    def chain_pem(self) -> bytes:
        """Leaf, intermediate, root as one PEM bundle (the order does not matter to firmgate)."""
        return b"".join(c.public_bytes(Encoding.PEM) for c in (self.leaf, self.intermediate, self.ark))

    def cert_table(self, *, pem: bool = False, include: tuple[str, ...] = ("ARK", "ASK", "LEAF")) -> bytes:
        """The extended-report GUID table holding the chain (DER by default, PEM as configfs-tsm hosts do)."""
        enc = Encoding.PEM if pem else Encoding.DER
        parts = {"ARK": ("ARK", self.ark), "ASK": ("ASK", self.intermediate), "LEAF": (self.signer, self.leaf)}
        return build_cert_table([(parts[k][0], parts[k][1].public_bytes(enc)) for k in include])

    # -- reports -----------------------------------------------------------------
    def default_fields(self) -> dict[str, int | bytes]:
        p = self.product
        tcb = self.tcb.encode(p)
        fam, mod, step = CPUID[p]
        return {
            "version": 3, "guest_svn": 1, "policy": 0x30000, "vmpl": 0, "signature_algo": 1,
            "current_tcb": tcb, "reported_tcb": tcb, "committed_tcb": tcb, "launch_tcb": tcb,
            "platform_info": 0x25,
            "key_info": int(SigningKey.VCEK if self.signer == "VCEK" else SigningKey.VLEK) << 2,
            "measurement": hashlib.sha384(b"sim-measurement").digest(),
            "report_id": hashlib.sha256(b"sim-report-id").digest(),
            "report_id_ma": b"\xff" * 32,
            "cpuid_fam_id": fam, "cpuid_mod_id": mod, "cpuid_step": step,
            "chip_id": self.chip_id,
            "current_major": 1, "current_minor": 55, "current_build": 40,
            "committed_major": 1, "committed_minor": 55, "committed_build": 40,
        }

    def sign_report(self, *, raw_patch: Mapping[int, int | bytes] | None = None, bad_signature: bool = False,
                    sign_with: ec.EllipticCurvePrivateKey | None = None, **fields: Any) -> bytes:
        """A signed 1184-byte report. `fields` override LAYOUT fields (TCBs may be Tcb values);
        `raw_patch` writes bytes at offsets before signing (reserved bytes...); `bad_signature`
        flips one bit of R after signing."""
        values = self.default_fields()
        if fields.get("version") == 2:
            for k in ("cpuid_fam_id", "cpuid_mod_id", "cpuid_step"):
                values.pop(k)
        for k, v in fields.items():
            values[k] = v.encode(self.product) if isinstance(v, Tcb) else v
        buf = encode_fields(values)
        for off, val in (raw_patch or {}).items():
            data = bytes([val]) if isinstance(val, int) else val
            buf[off:off + len(data)] = data
        der = (sign_with or self.leaf_key).sign(bytes(buf[:SIGNED_SIZE]), ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(der)
        if bad_signature:
            r ^= 1
        rb, sb = signature_to_bytes(r, s)
        buf[0x2A0:0x2A0 + 72] = rb
        buf[0x2E8:0x2E8 + 72] = sb
        return bytes(buf)

    # -- evidence shapes -------------------------------------------------------------
    def firmgate_json(self, report: bytes, *, with_table: bool = True) -> dict[str, Any]:
        """firmgate's own evidence JSON: base64 report and (optionally) the GUID cert table."""
        from verifier.evidence import firmgate_evidence_json
        return firmgate_evidence_json(report, self.cert_table() if with_table else None)

    def trustee_json(self, report: bytes, *, include: tuple[str, ...] = ("LEAF",)) -> dict[str, Any]:
        """Trustee SnpEvidence JSON (what an unmodified CoCo guest sends)."""
        from verifier.evidence import snp_evidence_json
        parts = {"ARK": ("ARK", self.ark), "ASK": ("ASK", self.intermediate), "LEAF": (self.signer, self.leaf)}
        chain = [(parts[k][0], parts[k][1].public_bytes(Encoding.DER)) for k in include] if include else None
        return snp_evidence_json(report, chain)

    def tsm_json(self, report: bytes) -> dict[str, Any]:
        """The veraison configfs-tsm shape: outblob (report) + auxblob (PEM cert table), base64url."""
        def b64u(b: bytes) -> str:
            return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
        return {"outblob": b64u(report), "auxblob": b64u(self.cert_table(pem=True)), "provider": "sev_guest\n"}


class SimFetcher:
    """A CertFetcher that serves a SimPlatform's certificates (plays AMD KDS; counts calls)."""

    def __init__(self, platform: SimPlatform, crl: bytes | None = None) -> None:
        self.platform = platform
        self.crl_der = crl
        self.calls: list[str] = []

    def vcek(self, product: Product, chip_id: bytes, tcb: TcbVersion) -> bytes:
        self.calls.append("vcek")
        return self.platform.leaf.public_bytes(Encoding.DER)

    def chain(self, product: Product, signer: str) -> bytes:
        self.calls.append(f"chain:{signer}")
        return self.platform.intermediate.public_bytes(Encoding.PEM) + self.platform.ark.public_bytes(Encoding.PEM)

    def crl(self, product: Product, signer: str) -> bytes | None:
        self.calls.append("crl")
        return self.crl_der


def make_crl(platform: SimPlatform, revoked_serials: list[int], *, now: dt.datetime | None = None,
             signer: rsa.RSAPrivateKey | None = None) -> bytes:
    """A DER CRL issued by the platform's ARK (as AMD's KDS CRL is) revoking `revoked_serials`."""
    now = now or platform.now
    b = (x509.CertificateRevocationListBuilder().issuer_name(platform.ark.subject)
         .last_update(now - dt.timedelta(days=1)).next_update(now + dt.timedelta(days=30)))
    for serial in revoked_serials:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                      .revocation_date(now - dt.timedelta(hours=1)).build())
    return b.sign(signer or platform.ark_key, hashes.SHA384(), rsa_padding=_pss()).public_bytes(Encoding.DER)
