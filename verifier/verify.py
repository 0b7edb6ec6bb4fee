"""VERIFY: the ARK -> ASK/ASVK -> VCEK/VLEK chain, its validity and revocation, and the report signature.

Cryptography only (pyca `cryptography`); no X.509 or signature code of our own.
Chain signatures are RSASSA-PSS with exactly SHA-384, MGF1-SHA-384, salt 48 (AMD
VCEK spec 57230, section 2.2); the report is ECDSA P-384 over the raw bytes
0x000-0x29F (SNP ABI 56860, Table 23 / section 7.3). Chain and signature
failures raise (nothing is judged from evidence that cannot be trusted); the
consistency checks (verifier.snpchecks) come back as named CheckResults.

The chain's signatures are checked once per (leaf, intermediate, root) and
cached; validity and revocation are re-checked on every call (they depend on time).
verifier.certs hands out one parsed object per distinct certificate/CRL byte string,
so a handshake that brings the same chain bytes as an earlier one (a broker's normal
case: a fresh report, the same ARK/ASK/VCEK) hits the selection memo below and
repeats no chain work; only the validity windows, revocation, the report signature
and the report's own checks run again.
"""
from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import SignatureAlgorithmOID

from .abi.fields import Product, SigningKey, TcbVersion
from .abi.report import SIGNED_SIZE, AttestationReport
from .certs import LAZY_PARSE_ERRORS, Lru, clear_parsed_cache, common_name, load_certificates, load_crl, serial_number
from .errors import CertificateFormatError, ChainError, ExpiredError, FetchError, RevokedError, SignatureError
from .evidence import Evidence
from .evidence import clear_caches as _clear_evidence_caches
from .kds import AmdLeafInfo, parse_leaf
from .options import VerifyOptions
from .snpchecks import cert_tcb_for, chain_checks, report_checks
from .verdict import CheckResult, Outcome

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_ECDSA = ec.ECDSA(hashes.SHA384())


@dataclass(frozen=True)
class VerifiedReport:
    """A report whose signature and chain verified, with every consistency check's result."""

    report: AttestationReport
    product: Product
    signer: str                      # "VCEK" | "VLEK" (the leaf's kind)
    leaf: x509.Certificate
    leaf_info: AmdLeafInfo
    intermediate: x509.Certificate
    root: x509.Certificate
    tcb: dict[str, TcbVersion]       # current/reported/committed/launch decoded for `product`
    simulated: bool                  # the chain ends in a --trust-root, not a pinned AMD ARK
    checks: tuple[CheckResult, ...]

    @property
    def accepted(self) -> bool:
        return bool(self.checks) and all(c.outcome is not Outcome.FAIL for c in self.checks)

    def facts(self) -> dict[str, Any]:
        return {
            "product": self.product.value,
            "signer": self.signer,
            "simulated": self.simulated,
            "root": common_name(self.root),
            "report_version": self.report.version,
            "measurement": self.report.measurement.hex(),
            "tcb": {k: v.to_dict() for k, v in self.tcb.items()},
            "vmpl": self.report.vmpl,
            "debug": self.report.policy.debug,
        }


# -- caches (bounded; shared by a gunicorn worker's threads) ----------------------------------
# Certificates and CRLs come from verifier.certs already parsed, and the same input bytes give
# the same object (certs.PARSED_CACHE), so the identity-keyed caches below hit on every
# handshake that brings the same chain bytes.


@dataclass(frozen=True)
class _ChainFacts:
    leaf_key: ec.EllipticCurvePublicKey


_CHAIN_CACHE = Lru(1024)     # (leaf, intermediate, root) -> _ChainFacts, signatures already checked
_INFO_CACHE = Lru(4096)      # leaf cert -> AmdLeafInfo | CertificateFormatError
_SHA_CACHE = Lru(4096)       # cert -> sha256(DER) hex
_CRL_CACHE = Lru(256)        # (sha256(CRL DER), root) -> True when its signature verified
_CRL_SHA_CACHE = Lru(256)    # id(crl) -> (crl, sha256 of its DER); the entry holds the object, so the id stays its


def clear_caches() -> None:
    """Forget everything memoised, parsed certificates and CRLs included (tests; a trust change)."""
    for c in (_CHAIN_CACHE, _INFO_CACHE, _SHA_CACHE, _CRL_CACHE, _SELECT_CACHE, _CRL_SHA_CACHE):
        c.clear()
    clear_parsed_cache()
    _clear_evidence_caches()


def _sha(cert: x509.Certificate) -> str:
    v = _SHA_CACHE.get(cert)
    if v is None:
        v = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
        _SHA_CACHE.put(cert, v)
    return str(v)


def _leaf_info(cert: x509.Certificate) -> AmdLeafInfo | None:
    v = _INFO_CACHE.get(cert)
    if v is None:
        try:
            v = parse_leaf(cert)
        except CertificateFormatError as exc:
            v = exc
        _INFO_CACHE.put(cert, v)
    return v if isinstance(v, AmdLeafInfo) else None


# -- chain --------------------------------------------------------------------------------
def _check_pss_signed(cert: x509.Certificate | x509.CertificateRevocationList, issuer: x509.Certificate,
                      what: str) -> None:
    """`cert` signed by `issuer` with RSASSA-PSS SHA-384 / MGF1-SHA-384 / salt 48, nothing else."""
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS:
        raise ChainError(f"{what}: signature algorithm is {cert.signature_algorithm_oid.dotted_string}; "
                         "AMD's chain uses RSASSA-PSS")
    try:
        hash_alg = cert.signature_hash_algorithm
    except UnsupportedAlgorithm as exc:
        raise ChainError(f"{what}: unsupported signature hash") from exc
    if not isinstance(hash_alg, hashes.SHA384):
        raise ChainError(f"{what}: signature hash is {getattr(hash_alg, 'name', hash_alg)}; expected sha384")
    try:
        params = cert.signature_algorithm_parameters
    except LAZY_PARSE_ERRORS as exc:
        raise ChainError(f"{what}: RSASSA-PSS parameters do not parse ({exc})") from None
    if not isinstance(params, padding.PSS) or not isinstance(params.mgf, padding.MGF1):
        raise ChainError(f"{what}: RSASSA-PSS parameters are not MGF1")
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise ChainError(f"{what}: issuer {common_name(issuer)!r} does not have an RSA key")
    tbs = cert.tbs_certlist_bytes if isinstance(cert, x509.CertificateRevocationList) else cert.tbs_certificate_bytes
    try:
        # The explicit salt length makes OpenSSL reject any other salt (and MGF1-SHA-384 is fixed).
        key.verify(cert.signature, tbs, _PSS, hashes.SHA384())
    except InvalidSignature:
        raise ChainError(f"{what}: signature by {common_name(issuer)!r} does not verify "
                         "(RSASSA-PSS SHA-384, MGF1-SHA-384, salt 48)") from None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    except LAZY_PARSE_ERRORS as exc:
        raise CertificateFormatError(f"{common_name(cert)!r}: extensions do not parse ({exc})") from None
    return bool(bc.ca)


def _validate_chain(leaf: x509.Certificate, inter: x509.Certificate, root: x509.Certificate,
                    leaf_kind: str) -> _ChainFacts:
    key = (leaf, inter, root)
    facts = _CHAIN_CACHE.get(key)
    if facts is not None:
        return facts  # type: ignore[no-any-return]
    inter_name = "ASK" if leaf_kind == "VCEK" else "ASVK"
    if root.issuer != root.subject:
        raise ChainError(f"root {common_name(root)!r} is not self-signed")
    _check_pss_signed(root, root, f"ARK {common_name(root)!r}")
    if inter.issuer != root.subject:
        raise ChainError(f"{inter_name} {common_name(inter)!r} is issued by {inter.issuer.rfc4514_string()!r}, "
                         f"not by the ARK {common_name(root)!r}")
    _check_pss_signed(inter, root, f"{inter_name} {common_name(inter)!r}")
    if leaf.issuer != inter.subject:
        raise ChainError(f"{leaf_kind} is issued by {leaf.issuer.rfc4514_string()!r}, "
                         f"not by the {inter_name} {common_name(inter)!r}")
    _check_pss_signed(leaf, inter, leaf_kind)
    # AMD's ARK/ASK carry BasicConstraints CA=true; a leaf must not be a CA.
    for cert, name in ((root, "ARK"), (inter, inter_name)):
        if not _is_ca(cert):
            raise ChainError(f"{name} {common_name(cert)!r} is not a CA certificate")
    if _is_ca(leaf):
        raise ChainError(f"{leaf_kind} certificate claims to be a CA")
    try:
        pub = leaf.public_key()
    except LAZY_PARSE_ERRORS as exc:
        raise CertificateFormatError(f"{leaf_kind} public key does not parse ({exc})") from None
    if not isinstance(pub, ec.EllipticCurvePublicKey) or not isinstance(pub.curve, ec.SECP384R1):
        raise ChainError(f"{leaf_kind} key is not ECDSA P-384")
    facts = _ChainFacts(leaf_key=pub)
    _CHAIN_CACHE.put(key, facts)
    return facts


# -- selecting certificates ------------------------------------------------------------------
def _pick_leaf(pool: list[x509.Certificate], report: AttestationReport
               ) -> tuple[x509.Certificate, AmdLeafInfo] | None:
    want = "VCEK" if report.key_info.signing_key is SigningKey.VCEK else "VLEK"
    leaves = [(c, i) for c in pool if (i := _leaf_info(c)) is not None]
    if not leaves:
        return None
    same = [(c, i) for c, i in leaves if i.kind == want]
    if same:
        # Several VCEKs (e.g. a KDS cache dir): the one for this chip, else the first.
        for c, i in same:
            if i.hwid is not None and report.chip_id.startswith(i.hwid):
                return c, i
        return same[0]
    return leaves[0]   # wrong kind: report.signing_key will say so after the signature verifies


def _find_chain(pool: list[x509.Certificate], options: VerifyOptions, product: Product, leaf: x509.Certificate,
                kind: str) -> tuple[x509.Certificate, x509.Certificate, bool] | None:
    """(intermediate, root, simulated): AMD's pinned ARK + ASK/ASVK (from the pool or shipped in
    the package), or a --trust-root chain when the leaf was issued inside one. When neither issued
    the leaf, AMD's chain is returned anyway, so that the caller rejects the leaf by name
    ("not signed by AMD's ASK/ARK") instead of going to KDS for a chain that cannot help."""
    store = options.trust_store
    role = "ask" if kind == "VCEK" else "asvk"
    amd: tuple[x509.Certificate, x509.Certificate, bool] | None = None
    if product in store.pins:
        ark_pin, int_pin = store.pin_for(product, "ark"), store.pin_for(product, role)
        candidates = pool + list(store.anchors())
        ark = next((c for c in candidates if _sha(c) == ark_pin), None)
        inter = next((c for c in candidates if _sha(c) == int_pin), None)
        if ark is not None and inter is not None:
            amd = (inter, ark, False)
            if leaf.issuer == inter.subject:
                return amd
    for root in store.simulated_roots:
        inter = next((c for c in pool if c.issuer == root.subject and c.subject == leaf.issuer
                      and c.subject != root.subject), None)
        if inter is not None:
            return inter, root, True
    return amd


def _fetched_certs(options: VerifyOptions, product: Product, kind: str) -> list[x509.Certificate]:
    if options.fetcher is None:
        return []
    return load_certificates(options.fetcher.chain(product, kind), f"{kind} chain from {type(options.fetcher).__name__}")


def _product_for_chain(report: AttestationReport, options: VerifyOptions, info: AmdLeafInfo | None) -> Product:
    # Precedence only picks which pins to try; report.product then requires that all sources agree.
    if options.product is not None:
        return options.product
    if report.cpuid_product is not None:
        return report.cpuid_product
    if info is not None:
        return info.product
    raise ChainError("the product is unknown: a version 2 report has no CPUID and no VCEK/VLEK was given; "
                     "pass --product or the certificate (never guessed from the chip id)")


def _crl_sha(crl: x509.CertificateRevocationList) -> bytes:
    """sha256 of the CRL's DER (CRLs are not hashable; re-serialising one costs more than a lookup)."""
    hit = _CRL_SHA_CACHE.get(id(crl))
    if hit is not None and hit[0] is crl:
        return hit[1]  # type: ignore[no-any-return]
    digest = hashlib.sha256(crl.public_bytes(Encoding.DER)).digest()
    _CRL_SHA_CACHE.put(id(crl), (crl, digest))
    return digest


def _revocation(options: VerifyOptions, evidence: Evidence, product: Product, kind: str, root: x509.Certificate,
                inter: x509.Certificate, leaf: x509.Certificate, now: dt.datetime) -> CheckResult:
    crls = list(evidence.crls) + list(options.crls)
    if not crls and options.fetcher is not None:
        # A CRL already on disk (KDS cache, trust directory) is used even when not asked for;
        # the network is asked only with check_crl.
        local = getattr(options.fetcher, "local_crl", None)
        data = local(product, kind) if local is not None else None
        if data is None and options.check_crl:
            data = options.fetcher.crl(product, kind)
        if data is not None:
            # load_crl memoises by the bytes' digest: a cached CRL is not re-parsed on every verify.
            crls.append(load_crl(data, f"{kind} CRL from {type(options.fetcher).__name__}"))
    mine = [c for c in crls if c.issuer == root.subject]
    if not mine:
        if options.check_crl:
            raise ChainError(f"no CRL issued by {common_name(root)!r} was given or found, and a CRL check was asked for")
        return CheckResult("cert.revocation", Outcome.SKIP, "no CRL given; revocation not checked")
    for crl in mine:
        crl_key = (_crl_sha(crl), root)
        if _CRL_CACHE.get(crl_key) is None:
            _check_pss_signed(crl, root, "CRL")
            _CRL_CACHE.put(crl_key, True)
        if crl.next_update_utc is not None and now > crl.next_update_utc and options.check_crl:
            raise ChainError(f"the CRL from {common_name(root)!r} is stale (next update {crl.next_update_utc:%Y-%m-%d})")
        for name, cert in (("ASK/ASVK", inter), (kind, leaf)):
            serial = serial_number(cert)
            if crl.get_revoked_certificate_by_serial_number(serial) is not None:
                raise RevokedError(f"{name} {common_name(cert)!r} (serial {serial}) is revoked by the "
                                   f"CRL of {common_name(root)!r}")
    return CheckResult("cert.revocation", Outcome.PASS, f"not revoked (CRL of {common_name(root)!r})")


_NO_CRL = CheckResult("cert.revocation", Outcome.SKIP, "no CRL given; revocation not checked")


# -- the entry point -------------------------------------------------------------------------
@dataclass(frozen=True)
class _Selected:
    """The chain chosen for a report and what the hot path needs from it (all computed once)."""

    pool: tuple[x509.Certificate, ...]   # the exact objects the selection was made from (identity-checked)
    store: Any
    leaf: x509.Certificate
    info: AmdLeafInfo
    inter: x509.Certificate
    root: x509.Certificate
    simulated: bool
    product: Product
    leaf_key: ec.EllipticCurvePublicKey
    windows: tuple[tuple[str, str, dt.datetime, dt.datetime], ...]   # (role, CN, not before, not after)
    leaf_cn: str
    inter_cn: str
    root_cn: str
    root_sha: str
    cert_tcb: TcbVersion
    head_checks: tuple[CheckResult, ...]    # report.signature, cert.chain (+ trust.simulated)
    fixed_checks: tuple[CheckResult, ...]   # signing key, product, chip id: fixed by the select key
    validity_text: str


# Selection memo keyed by the *identity* of the certificate objects (hashing a Certificate costs
# ~15 us, more than the rest of the hot path); entries hold strong references, so ids stay unique.
_SELECT_CACHE = Lru(256)


def _select(evidence: Evidence, options: VerifyOptions) -> _Selected:
    report = evidence.report
    pool = list(evidence.certs) + list(options.certs)
    key = (tuple(map(id, pool)), id(options.trust_store), options.product, report.cpuid_fam_id,
           report.cpuid_mod_id, report.key_info.raw, report.chip_id)
    hit = _SELECT_CACHE.get(key)
    if hit is not None and hit.store is options.trust_store and len(hit.pool) >= len(pool) and all(
            a is b for a, b in zip(hit.pool, pool, strict=False)):
        return hit  # type: ignore[no-any-return]

    picked = _pick_leaf(pool, report)
    product = _product_for_chain(report, options, picked[1] if picked else None)
    if picked is None:
        if report.key_info.signing_key is SigningKey.VLEK:
            raise ChainError("the report is VLEK-signed and no VLEK certificate was given "
                             "(a VLEK cannot be fetched by chip id)")
        if report.key_info.mask_chip_key:
            raise ChainError("no VCEK was given and CHIP_ID is masked, so KDS cannot be asked for one")
        if options.fetcher is None:
            raise ChainError("no VCEK was given (in the evidence or with --certs) and no KDS access was allowed")
        tcb = TcbVersion.from_u64(report.reported_tcb, product)
        pool += load_certificates(options.fetcher.vcek(product, report.chip_id, tcb), "VCEK from KDS")
        picked = _pick_leaf(pool, report)
        if picked is None:
            raise CertificateFormatError("the certificate fetched as a VCEK has no AMD VCEK extensions")
    leaf, info = picked

    found = _find_chain(pool, options, product, leaf, info.kind)
    if found is None:
        pool += _fetched_certs(options, product, info.kind)
        found = _find_chain(pool, options, product, leaf, info.kind)
    elif not found[2] and leaf.issuer != found[0].subject and options.trust_store.simulated_roots:
        # Not AMD's: a configured simulated platform's chain may still come from its fetcher
        # (sim.SimFetcher). If that fails, AMD's chain stays and rejects the leaf by name.
        try:
            extra = _fetched_certs(options, product, info.kind)
        except FetchError:
            extra = []
        found = _find_chain(pool + extra, options, product, leaf, info.kind) or found
        pool += extra
    if found is None:
        role = "ASK" if info.kind == "VCEK" else "ASVK"
        raise ChainError(f"no {product} ARK and {role} matching firmgate's pins were given or found "
                         f"(ARK sha256 {options.trust_store.pin_for(product, 'ark')[:16]}...); pass them with "
                         "--certs, allow KDS, or --trust-root for a simulated platform")
    inter, root, simulated = found
    inter_role = "ASK" if info.kind == "VCEK" else "ASVK"
    try:
        facts = _validate_chain(leaf, inter, root, info.kind)
    except ChainError as exc:
        if simulated:
            raise
        # A chain that does not lead to AMD's root is a rejection (exit 1), never "ask KDS" (exit 3).
        raise ChainError(f"the {info.kind} is not signed by AMD's {inter_role}/ARK for {product}: "
                         f"{exc.diagnostics()}") from exc
    windows = tuple((role, common_name(c), c.not_valid_before_utc, c.not_valid_after_utc)
                    for role, c in (("ARK", root), (inter_role, inter), (info.kind, leaf)))
    root_cn, inter_cn = common_name(root), common_name(inter)
    root_sha = _sha(root)
    root_desc = (f"SIMULATED root {root_cn!r} trusted by --trust-root" if simulated else f"pinned AMD {root_cn!r}")
    head = [CheckResult("report.signature", Outcome.PASS, f"ECDSA P-384 signature verifies with the {info.kind}"),
            CheckResult("cert.chain", Outcome.PASS, f"{info.kind} <- {inter_cn!r} <- {root_desc}", actual=root_sha)]
    if simulated:
        head.append(CheckResult("trust.simulated", Outcome.WARN,
                                "the chain ends in a simulated root, not AMD's: this is not a real AMD platform",
                                expected="AMD ARK", actual=root_cn))
    # For AMD chains the intermediate was selected by the pin of the leaf's role (ASK for a VCEK,
    # ASVK for a VLEK) and the leaf's issuer name matched it; a simulated chain has no pinned role.
    fixed = chain_checks(report, info, product, options, None if simulated else inter_role)
    sel = _Selected(pool=tuple(pool), store=options.trust_store, leaf=leaf, info=info, inter=inter, root=root,
                    simulated=simulated, product=product, leaf_key=facts.leaf_key, windows=windows,
                    leaf_cn=common_name(leaf), inter_cn=inter_cn, root_cn=root_cn, root_sha=root_sha,
                    cert_tcb=cert_tcb_for(info, product), head_checks=tuple(head), fixed_checks=tuple(fixed),
                    validity_text=f"ARK, {inter_role} and {info.kind} valid at ")
    _SELECT_CACHE.put(key, sel)
    return sel


def _check_windows(windows: tuple[tuple[str, str, dt.datetime, dt.datetime], ...], now: dt.datetime) -> None:
    for role, cn, nb, na in windows:
        if now > na:
            raise ExpiredError(f"{role} certificate {cn!r} expired {na:%Y-%m-%d %H:%M:%S}Z "
                               f"(checked at {now:%Y-%m-%d %H:%M:%S}Z)")
        if now < nb:
            raise ExpiredError(f"{role} certificate {cn!r} is not valid before "
                               f"{nb:%Y-%m-%d %H:%M:%S}Z (checked at {now:%Y-%m-%d %H:%M:%S}Z)")


def verify_report(evidence: Evidence, options: VerifyOptions) -> VerifiedReport:
    """Verify the chain and the signature (raising on failure), then run every consistency check."""
    report = evidence.report
    now = options.now or dt.datetime.now(dt.UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=dt.UTC)
    sel = _select(evidence, options)
    leaf, info, inter, root, simulated, product = sel.leaf, sel.info, sel.inter, sel.root, sel.simulated, sel.product
    _check_windows(sel.windows, now)
    if evidence.crls or options.crls or options.check_crl or options.fetcher is not None:
        revocation = _revocation(options, evidence, product, info.kind, root, inter, leaf, now)
    else:
        revocation = _NO_CRL

    # ECDSA P-384 / SHA-384 over the raw signed bytes, never a re-serialised struct.
    try:
        sel.leaf_key.verify(encode_dss_signature(report.signature_r, report.signature_s),
                              report.raw[:SIGNED_SIZE], _ECDSA)
    except InvalidSignature:
        raise SignatureError(f"the report signature does not verify with the {info.kind} "
                             f"({sel.leaf_cn!r}, {product})") from None

    tcb = {"current": TcbVersion.from_u64(report.current_tcb, product),
           "reported": TcbVersion.from_u64(report.reported_tcb, product),
           "committed": TcbVersion.from_u64(report.committed_tcb, product),
           "launch": TcbVersion.from_u64(report.launch_tcb, product)}
    checks = [*sel.head_checks,
              CheckResult("cert.validity", Outcome.PASS, sel.validity_text + now.isoformat(timespec="seconds")),
              revocation, *sel.fixed_checks, *report_checks(report, tcb, sel.cert_tcb, options)]
    return VerifiedReport(report=report, product=product, signer=info.kind, leaf=leaf, leaf_info=info,
                          intermediate=inter, root=root, tcb=tcb, simulated=simulated, checks=tuple(checks))
