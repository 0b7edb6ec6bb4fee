"""ADMISSION: may a firmware build that the policy does not list by digest be appraised, on a publisher's word?

`admit(publishers, endorsement_bytes, firmware_sha384, now)` is the whole rule and
a separate step from measuring: it returns an `Admission` naming the policy's
publisher and the endorsement, or raises `EndorsementRefused` whose message names
the endorsement and the reason. Order matters for hostile input: the envelope is
parsed, the signer found by kid among the TRUSTED keys, the signature checked, and
only then is the payload read. An admitted build still has its MEASUREMENT
recomputed from its bytes for every allowed shape (reference.py): an endorsement
vouches for the build, never for a measurement. The endorsement's own measurements
are only cross-checked (a mismatch refuses the endorsement).

Refusals, each by name: signed by no trusted publisher; bad signature; not this
firmware's digest; not yet valid / expired (the endorsement's validity); the trust
in the publisher expired (policy `expires`); fwid outside the publisher's pattern;
svn below the publisher's `min_svn`; revoked by the publisher's signed revocation
list (by endorsement id or by firmware digest).
"""
from __future__ import annotations

import fnmatch
import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import FirmgateError, TrustError
from .corim import (
    Endorsement,
    Revocations,
    SignedEndorsement,
    parse_signed,
    read_payload,
)
from .cose import load_public_key


class EndorsementRefused(TrustError):
    """An endorsement that does not admit the firmware (exit 1: rejected)."""


@dataclass(frozen=True)
class PublisherRule:
    """One `[[firmware.publishers]]` entry of a policy."""

    name: str
    key_sha256: str                                   # hex SHA-256 of the SPKI DER (the COSE kid)
    fwid_pattern: str = "*"                           # fnmatch glob over the endorsed fwid
    min_svn: int | None = None
    expires: int | None = None                        # trust in this publisher ends (epoch seconds)
    key: ec.EllipticCurvePublicKey | None = field(default=None, compare=False, repr=False)
    revocations: Revocations | None = None
    # The owner's statement that this publisher's builds pin what they boot (verifier/appraise/binding.py).
    enforces_boot_chain: str | None = None


@dataclass(frozen=True)
class Admission:
    publisher: str                  # the policy's name for the publisher
    key_sha256: str
    endorsement: Endorsement

    def to_dict(self) -> dict[str, object]:
        e = self.endorsement
        return {"publisher": self.publisher, "key_sha256": self.key_sha256, "endorsement": e.id,
                "fwid": e.fwid, "svn": e.svn, "not_after": _iso(e.not_after)}


def _iso(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def verify_with(data: bytes, publishers: Iterable[PublisherRule]) -> tuple[PublisherRule, SignedEndorsement]:
    """The trusted publisher that signed `data`, and the endorsement read after the signature checked."""
    try:
        signed = parse_signed(data)
    except FirmgateError as exc:
        raise EndorsementRefused(f"endorsement refused: {exc.diagnostics()}") from None
    kid = signed.kid_hex
    name = f"endorsement sha256:{hashlib.sha256(data).hexdigest()[:16]}"
    rule = next((p for p in publishers if p.key_sha256 == kid), None)
    if rule is None:
        raise EndorsementRefused(f"{name} is signed by key sha256:{kid[:16]}..., which is no trusted publisher")
    key = rule.key
    if key is None:   # pinned by fingerprint: the endorsement carries the key, bound by its kid
        if signed.spki is None or hashlib.sha256(signed.spki).hexdigest() != kid:
            raise EndorsementRefused(f"{name}: publisher {rule.name} is pinned by fingerprint, and the "
                                     "endorsement does not carry the matching public key")
        try:
            key = load_public_key(signed.spki, "the endorsement's public key")
        except FirmgateError as exc:
            raise EndorsementRefused(f"{name}: {exc.diagnostics()}") from None
    try:
        signed.sign1.verify(key)
    except FirmgateError as exc:
        raise EndorsementRefused(f"{name} (publisher {rule.name}): {exc.diagnostics()}") from None
    try:
        return rule, read_payload(signed)
    except FirmgateError as exc:
        raise EndorsementRefused(f"{name} (publisher {rule.name}): {exc.diagnostics()}") from None


def constraint_failure(rule: PublisherRule, e: Endorsement, now: int) -> str | None:
    """Why `rule` does not (or no longer) admit `e` at time `now`; None when it does."""
    who = f"endorsement {e.id} of {e.fwid} (svn {e.svn}) by publisher {rule.name}"
    if now < e.not_before:
        return f"{who} is not valid before {_iso(e.not_before)}"
    if now >= e.not_after:
        return f"{who} expired at {_iso(e.not_after)}"
    if rule.expires is not None and now >= rule.expires:
        return f"{who}: the policy's trust in publisher {rule.name} expired at {_iso(rule.expires)}"
    if not fnmatch.fnmatchcase(e.fwid, rule.fwid_pattern):
        return f"{who}: fwid {e.fwid} is outside the publisher's pattern {rule.fwid_pattern!r}"
    if rule.min_svn is not None and e.svn < rule.min_svn:
        return f"{who}: svn {e.svn} is below the publisher's minimum {rule.min_svn}"
    r = rule.revocations
    if r is not None and (e.id in r.ids or e.sha384 in r.digests):
        return f"{who} is revoked by the publisher's revocation list of {_iso(r.issued)}"
    return None


def admit(publishers: Iterable[PublisherRule], data: bytes, firmware_sha384: str, now: int | None = None
          ) -> Admission:
    """Admission of the firmware whose image has SHA-384 `firmware_sha384`, on endorsement `data`."""
    now = int(time.time()) if now is None else now
    rule, signed = verify_with(data, publishers)
    e = signed.endorsement
    if e.sha384 != firmware_sha384.lower():
        raise EndorsementRefused(f"endorsement {e.id} of {e.fwid} by publisher {rule.name} is for firmware "
                                 f"sha384 {e.sha384[:16]}..., not {firmware_sha384[:16]}...")
    why = constraint_failure(rule, e, now)
    if why is not None:
        raise EndorsementRefused(why)
    return Admission(rule.name, rule.key_sha256, e)


def recheck(publishers: Iterable[PublisherRule], admission: Admission, now: int | None = None) -> str | None:
    """Is an earlier admission still good under the policy in force now? None, or the reason it is not."""
    now = int(time.time()) if now is None else now
    rule = next((p for p in publishers if p.key_sha256 == admission.key_sha256), None)
    if rule is None:
        return (f"endorsement {admission.endorsement.id}: publisher {admission.publisher} is no longer trusted "
                "by the policy")
    return constraint_failure(rule, admission.endorsement, now)
