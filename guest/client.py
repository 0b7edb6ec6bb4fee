"""The guest's side of the KBS exchange: auth -> attest -> resource, and writing the secret.

    key = TeeKey.generate("p256")
    s = KbsSession("http://broker:8080")
    att = attest(s, source, key, addon=addon_bytes)     # evidence for this session's nonce
    secret = fetch_resource(s, "acme/disk/root", key)   # cookie mode (or bearer=att.token)

REPORT_DATA = SHA-384(JCS({"additional-evidence", "nonce", "tee-pubkey"}))
zero-padded to 64 bytes (KBS-FACTS section 3). With `addon`, the firmware add-on
rides in additional_evidence as {"firmgate-firmware": {"addon": base64}}, so
REPORT_DATA binds it (DESIGN.md, key broker protocol).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rfc8785

from .errors import BadResponse, GuestError
from .evidence import ReportSource, check_report, evidence_json
from .http import KbsSession, parse_resource_path
from .keys import TeeKey

PROTOCOL_VERSION = "0.4.0"
FIRMWARE_KEY = "firmgate-firmware"
HASH_ALGORITHMS = ["sha256", "sha384", "sha512", "sm3"]  # what the Trustee guest announces
MAX_NONCE = 1024


@dataclass(frozen=True)
class Attestation:
    nonce: str
    token: str
    report: bytes
    request: dict[str, Any] = field(repr=False)   # the /attest body as sent (a demo replays it)
    claims: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def status(self) -> str:
        """The EAR status the broker gave (affirming / warning / contraindicated), or "unknown"."""
        sub = self.claims.get("submods", {}).get("cpu0", {}) if isinstance(self.claims.get("submods"), dict) else {}
        st = sub.get("ear.status") if isinstance(sub, dict) else None
        return st if isinstance(st, str) else "unknown"


def report_data_for(nonce: str, tee_pubkey: dict[str, Any], additional_evidence: str) -> bytes:
    obj: dict[str, Any] = {"additional-evidence": additional_evidence, "nonce": nonce, "tee-pubkey": tee_pubkey}
    return hashlib.sha384(rfc8785.dumps(obj)).digest().ljust(64, b"\0")


def additional_for(addon: bytes | None, endorsement: bytes | None = None) -> str:
    """additional_evidence carrying our add-on and, optionally, a publisher's endorsement of its firmware
    (when the add-on has no `.corim` section of its own; docs/endorsements.md)."""
    if addon is None:
        return ""
    item = {"addon": base64.b64encode(addon).decode()}
    if endorsement is not None:
        item["endorsement"] = base64.b64encode(endorsement).decode()
    return json.dumps({FIRMWARE_KEY: item}, separators=(",", ":"))


def token_claims(token: str) -> dict[str, Any]:
    """The payload of the EAR JWT, read as the Trustee guest reads it (it never checks the signature:
    the token is the broker's own statement, handed back to the broker)."""
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        raise BadResponse("attest: the token is not a JWT (three dot-separated parts)")
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError, RecursionError):
        raise BadResponse("attest: the token payload is not base64url JSON") from None
    if not isinstance(payload, dict):
        raise BadResponse("attest: the token payload is not a JSON object")
    return payload


def auth(session: KbsSession, *, tenant: str | None = None) -> str:
    extra: dict[str, Any] = {"supported-hash-algorithms": HASH_ALGORITHMS}
    if tenant:
        extra["tenant"] = tenant
    ch = session.request("auth", "POST", "/auth", {"version": PROTOCOL_VERSION, "tee": "snp", "extra-params": extra})
    nonce = ch.get("nonce") if isinstance(ch, dict) else None
    if not isinstance(nonce, str) or not nonce or len(nonce) > MAX_NONCE:
        raise BadResponse("auth: the challenge has no nonce string")
    if session.cookie is None:
        raise BadResponse("auth: the broker set no kbs-session-id cookie")
    ep = ch.get("extra-params")
    algo = ep.get("selected-hash-algorithm") if isinstance(ep, dict) else None
    if algo not in (None, "sha384"):  # the guest defaults to sha384; SNP brokers never select another
        raise BadResponse(f"auth: the broker selected hash {algo!r}; an SNP guest binds with sha384")
    return nonce


def attest(session: KbsSession, source: ReportSource, key: TeeKey, *, addon: bytes | None = None,
           evidence_shape: str = "snp", tenant: str | None = None, init_data: dict[str, str] | None = None,
           endorsement: bytes | None = None) -> Attestation:
    nonce = auth(session, tenant=tenant)
    additional = additional_for(addon, endorsement)
    report_data = report_data_for(nonce, key.jwk, additional)
    report, table = source.get(report_data)
    check_report(report, report_data)
    body = {"init-data": init_data,
            "runtime-data": {"nonce": nonce, "tee-pubkey": key.jwk},
            "tee-evidence": {"primary_evidence": evidence_json(report, table, evidence_shape),
                             "additional_evidence": additional}}
    answer = session.request("attest", "POST", "/attest", body)
    token = answer.get("token") if isinstance(answer, dict) else None
    if not isinstance(token, str):
        raise BadResponse("attest: the answer has no token")
    return Attestation(nonce, token, report, body, token_claims(token))


def fetch_resource(session: KbsSession, resource: str, key: TeeKey, *, bearer: str | None = None) -> bytes:
    """GET the resource (cookie mode, or Bearer token and no cookie) and decrypt it with this run's key."""
    repo, rtype, tag = parse_resource_path(resource)
    body = session.request("resource", "GET", f"/resource/{repo}/{rtype}/{tag}", bearer=bearer,
                           send_cookie=bearer is None)
    return key.decrypt(body)


def write_secret(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path` with mode 0600 from the first byte on: a 0600 temporary file (O_EXCL)
    in the same directory, fsync'd, renamed over `path`."""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=directory)  # mkstemp: O_EXCL, mode 0600
    except OSError as exc:
        raise GuestError(f"cannot write the secret in {directory}: {exc.strerror or exc}") from exc
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise GuestError(f"cannot write the secret to {target}: {exc.strerror or exc}") from exc
    return target
