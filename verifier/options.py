"""VerifyOptions: what a verification allows, said explicitly. Time and network come in from outside."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from .abi.fields import Product
from .kds.fetch import CertFetcher, DirFetcher, FirstOf, HttpFetcher
from .trust import DEFAULT_TRUST_STORE, TrustStore


@dataclass(frozen=True)
class VerifyOptions:
    now: dt.datetime | None = None          # None: the time of each call (certificate validity is checked at it)
    trust_store: TrustStore = DEFAULT_TRUST_STORE
    fetcher: CertFetcher | None = None      # None: no I/O, only certificates given here or in the evidence
    certs: tuple[x509.Certificate, ...] = ()   # extra certificates (--certs): leaf, ASK/ASVK, ARK
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    product: Product | None = None          # --product; must agree with CPUID and the certificate
    allow_provisional: bool = True          # False: COMMITTED_TCB != CURRENT_TCB fails instead of warning
    check_crl: bool = False                 # True: a CRL must be found (given, in evidence, or fetched)
    report_data: bytes | None = None        # expected REPORT_DATA (zero-padded to 64); None = not checked
    min_report_version: int = 2
    vmpl: int | None = None                 # expected VMPL; None = any of 0..3


def default_options(*, now: dt.datetime | None = None, trust_root: x509.Certificate | None = None,
                    certs: tuple[x509.Certificate, ...] = (), crls: tuple[x509.CertificateRevocationList, ...] = (),
                    product: Product | str | None = None, kds_cache: Path | None = None, offline: bool = True,
                    fetcher: CertFetcher | None = None, allow_provisional: bool = True, check_crl: bool = False,
                    report_data: bytes | None = None, trust_dir: Path | None = None) -> VerifyOptions:
    """Options with AMD's pins. Certificates missing from the evidence come from `trust_dir`
    (`<dir>/<product>/{ark,ask,asvk}.pem`, see DirFetcher), then from KDS if a cache dir is
    given (offline unless offline=False). Without either, no I/O at all."""
    store = DEFAULT_TRUST_STORE if trust_root is None else DEFAULT_TRUST_STORE.with_simulated_root(trust_root)
    if fetcher is None:
        sources: list[CertFetcher] = []
        if trust_dir is not None:
            sources.append(DirFetcher(trust_dir))
        if kds_cache is not None:
            sources.append(HttpFetcher(kds_cache, offline=offline))
        fetcher = sources[0] if len(sources) == 1 else FirstOf(*sources) if sources else None
    prod = Product.parse(product) if isinstance(product, str) else product
    return VerifyOptions(now=now, trust_store=store, fetcher=fetcher, certs=certs, crls=crls, product=prod,
                         allow_provisional=allow_provisional, check_crl=check_crl, report_data=report_data)
