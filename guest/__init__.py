"""firmgate's guest client: evidence from configfs-tsm or /dev/sev-guest, the KBS exchange, the secret.

Public API:
    TeeKey.generate(key_type="p256")                       one run's key pair (p256, p384, p521, rsa)
    KbsSession(broker_url)                                 one attestation session (cookie kept)
    attest(session, source, key, addon=None, evidence_shape="snp", tenant=None) -> Attestation
    fetch_resource(session, "REPO/TYPE/TAG", key, bearer=None) -> bytes
    write_secret(path, data)                               mode 0600 from the first byte
    default_source(tsm_root=None), TsmSource(backend), SevGuestSource(device)
    tsm.TsmBackend / tsm.FsTsmBackend                      the configfs-tsm seam (sim.host implements it)
    guest.update.request_update / guest.boot.main          the host's update channel (stdlib + pefile only)

The names are imported lazily, so that `guest.boot` and `guest.update` (which a
minimal guest image runs with the standard library and pefile alone) do not pull
in cryptography and the HTTP client.
"""
from __future__ import annotations

from typing import Any

_LAZY = {
    "Attestation": "guest.client", "attest": "guest.client", "auth": "guest.client",
    "fetch_resource": "guest.client", "report_data_for": "guest.client", "write_secret": "guest.client",
    "BadResponse": "guest.errors", "BrokerDenied": "guest.errors", "BrokerUnreachable": "guest.errors",
    "EvidenceUnavailable": "guest.errors", "GuestError": "guest.errors", "TsmRace": "guest.errors",
    "SevGuestSource": "guest.evidence", "TsmSource": "guest.evidence", "default_source": "guest.evidence",
    "evidence_json": "guest.evidence", "KbsSession": "guest.http", "parse_resource_path": "guest.http",
    "TeeKey": "guest.keys",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'guest' has no attribute {name!r}")
