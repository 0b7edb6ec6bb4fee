"""AMD Key Distribution Service facts: VCEK/VLEK extension OIDs, their decoding, KDS URLs.

Source: AMD "Versioned Chip Endorsement Key (VCEK) Certificate and KDS Interface
Specification" (57230), Table 8 (VCEK extensions) and section 4 (KDS paths);
"VLEK Certificate and KDS Interface" (58369) for cspId. The core does no I/O:
fetching lives in verifier.kds.fetch.
"""
from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.asn1 import IA5String, decode_der

from ..abi.fields import Product, TcbVersion
from ..errors import CertificateFormatError

KDS_BASE = "https://kdsintf.amd.com"

_ARC = "1.3.6.1.4.1.3704.1"
OID_STRUCT_VERSION = x509.ObjectIdentifier(f"{_ARC}.1")
OID_PRODUCT_NAME = x509.ObjectIdentifier(f"{_ARC}.2")
OID_BL_SPL = x509.ObjectIdentifier(f"{_ARC}.3.1")
OID_TEE_SPL = x509.ObjectIdentifier(f"{_ARC}.3.2")
OID_SNP_SPL = x509.ObjectIdentifier(f"{_ARC}.3.3")
OID_UCODE_SPL = x509.ObjectIdentifier(f"{_ARC}.3.8")
OID_FMC_SPL = x509.ObjectIdentifier(f"{_ARC}.3.9")     # Turin
OID_HWID = x509.ObjectIdentifier(f"{_ARC}.4")          # VCEK only
OID_CSP_ID = x509.ObjectIdentifier(f"{_ARC}.5")        # VLEK only

HWID_SIZE = {Product.MILAN: 64, Product.GENOA: 64, Product.TURIN: 8}


@dataclass(frozen=True)
class AmdLeafInfo:
    """What a VCEK or VLEK certificate says about the chip and its TCB."""

    kind: str                      # "VCEK" (has hwID) or "VLEK" (has cspId)
    struct_version: int | None
    product_name: str              # as written: "Milan-B0", "Milan", "Genoa", "Turin"
    product: Product
    bl_spl: int
    tee_spl: int
    snp_spl: int
    ucode_spl: int
    fmc_spl: int | None
    hwid: bytes | None
    csp_id: str | None

    def tcb(self) -> TcbVersion:
        """The certificate's TCB as a TcbVersion in its product's layout."""
        raw = TcbVersion.encode(self.product, bootloader=self.bl_spl, tee=self.tee_spl, snp=self.snp_spl,
                                microcode=self.ucode_spl,
                                fmc=self.fmc_spl if self.product is Product.TURIN else None)
        return TcbVersion.from_u64(raw, self.product)


def _ext(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        # Certificates built elsewhere (not through verifier.certs) may reach here unparsed.
        raise CertificateFormatError(f"certificate extensions do not parse ({exc})") from None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise CertificateFormatError(f"extension {oid.dotted_string} has an unexpected type")
    return value.value


def _int_ext(cert: x509.Certificate, oid: x509.ObjectIdentifier, name: str, *, required: bool) -> int | None:
    der = _ext(cert, oid)
    if der is None:
        if required:
            raise CertificateFormatError(f"certificate lacks the {name} extension ({oid.dotted_string})")
        return None
    try:
        value = decode_der(int, der)
    except ValueError as exc:
        raise CertificateFormatError(f"{name} extension is not a DER INTEGER") from exc
    if not 0 <= value <= 0xFF:
        raise CertificateFormatError(f"{name} is {value}; expected 0..255")
    return value


def _str_ext(cert: x509.Certificate, oid: x509.ObjectIdentifier, name: str) -> str | None:
    der = _ext(cert, oid)
    if der is None:
        return None
    try:
        return decode_der(IA5String, der).as_str()
    except ValueError as exc:
        raise CertificateFormatError(f"{name} extension is not a DER IA5String") from exc


def _hwid(cert: x509.Certificate) -> bytes | None:
    der = _ext(cert, OID_HWID)
    if der is None:
        return None
    # KDS has issued both encodings: 64 (Turin: 8) raw bytes, and the same bytes wrapped
    # in a DER OCTET STRING. A raw value can start with 0x04 too, so the wrapped form is
    # recognised only when it parses exactly and the content has a valid hwID size.
    if der[:1] == b"\x04":
        try:
            inner = decode_der(bytes, der)
        except ValueError:
            inner = None
        if inner is not None and len(inner) in (8, 64):
            return inner
    if len(der) in (8, 64):
        return der
    raise CertificateFormatError(f"hwID extension is {len(der)} bytes; expected 64 (8 on Turin), raw or DER-wrapped")


def parse_leaf(cert: x509.Certificate) -> AmdLeafInfo:
    """Read AMD's extensions from a VCEK or VLEK. Raises CertificateFormatError if they are not there."""
    pname = _str_ext(cert, OID_PRODUCT_NAME, "productName")
    if pname is None:
        raise CertificateFormatError("certificate lacks AMD's productName extension: not a VCEK or VLEK")
    try:
        product = Product.parse(pname)
    except Exception as exc:
        raise CertificateFormatError(f"productName {pname!r} names no product firmgate knows") from exc
    hwid = _hwid(cert)
    csp = _str_ext(cert, OID_CSP_ID, "cspId")
    if hwid is not None and csp is not None:
        raise CertificateFormatError("certificate carries both hwID (VCEK) and cspId (VLEK)")
    if hwid is None and csp is None:
        raise CertificateFormatError("certificate carries neither hwID (VCEK) nor cspId (VLEK)")
    if hwid is not None and len(hwid) != HWID_SIZE[product]:
        raise CertificateFormatError(f"hwID is {len(hwid)} bytes; a {product} VCEK has {HWID_SIZE[product]}")
    fmc = _int_ext(cert, OID_FMC_SPL, "fmcSPL", required=product is Product.TURIN)
    if fmc is not None and product is not Product.TURIN:
        raise CertificateFormatError(f"fmcSPL present in a {product} certificate (Turin only)")
    return AmdLeafInfo(
        kind="VCEK" if hwid is not None else "VLEK",
        struct_version=_int_ext(cert, OID_STRUCT_VERSION, "structVersion", required=False),
        product_name=pname,
        product=product,
        bl_spl=_int_ext(cert, OID_BL_SPL, "blSPL", required=True) or 0,
        tee_spl=_int_ext(cert, OID_TEE_SPL, "teeSPL", required=True) or 0,
        snp_spl=_int_ext(cert, OID_SNP_SPL, "snpSPL", required=True) or 0,
        ucode_spl=_int_ext(cert, OID_UCODE_SPL, "ucodeSPL", required=True) or 0,
        fmc_spl=fmc,
        hwid=hwid,
        csp_id=csp,
    )


def vcek_url(product: Product, chip_id: bytes, tcb: TcbVersion) -> str:
    """KDS URL of the VCEK for this chip at this TCB (Turin: 8-byte chip id and fmcSPL)."""
    if product is Product.TURIN:
        path = chip_id[:8].hex()
        query = f"fmcSPL={tcb.fmc or 0:02d}&blSPL={tcb.bootloader:02d}&teeSPL={tcb.tee:02d}" \
                f"&snpSPL={tcb.snp:02d}&ucodeSPL={tcb.microcode:02d}"
    else:
        path = chip_id.hex()
        query = f"blSPL={tcb.bootloader:02d}&teeSPL={tcb.tee:02d}&snpSPL={tcb.snp:02d}&ucodeSPL={tcb.microcode:02d}"
    return f"{KDS_BASE}/vcek/v1/{product.value}/{path}?{query}"


def chain_url(product: Product, signer: str) -> str:
    """ASK+ARK (VCEK) or ASVK+ARK (VLEK) chain, PEM, intermediate first."""
    return f"{KDS_BASE}/{signer.lower()}/v1/{product.value}/cert_chain"


def crl_url(product: Product, signer: str) -> str:
    return f"{KDS_BASE}/{signer.lower()}/v1/{product.value}/crl"
