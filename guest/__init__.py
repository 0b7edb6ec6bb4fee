"""firmgate's guest client: evidence from configfs-tsm or /dev/sev-guest, the KBS exchange, the secret.

Public API:
    TeeKey.generate(key_type="p256")                       one run's key pair (p256, p384, p521, rsa)
    KbsSession(broker_url)                                 one attestation session (cookie kept)
    attest(session, source, key, addon=None, evidence_shape="snp", tenant=None) -> Attestation
    fetch_resource(session, "REPO/TYPE/TAG", key, bearer=None) -> bytes
    write_secret(path, data)                               mode 0600 from the first byte
    default_source(tsm_root=None), TsmSource(backend), SevGuestSource(device)
    tsm.TsmBackend / tsm.FsTsmBackend                      the configfs-tsm seam (sim.host implements it)
"""
from __future__ import annotations

from .client import Attestation, attest, auth, fetch_resource, report_data_for, write_secret
from .errors import BadResponse, BrokerDenied, BrokerUnreachable, EvidenceUnavailable, GuestError, TsmRace
from .evidence import SevGuestSource, TsmSource, default_source, evidence_json
from .http import KbsSession, parse_resource_path
from .keys import TeeKey

__all__ = ["Attestation", "attest", "auth", "fetch_resource", "report_data_for", "write_secret",
           "BadResponse", "BrokerDenied", "BrokerUnreachable", "EvidenceUnavailable", "GuestError", "TsmRace",
           "SevGuestSource", "TsmSource", "default_source", "evidence_json", "KbsSession", "parse_resource_path",
           "TeeKey"]
