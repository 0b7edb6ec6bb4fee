"""`firmgate policy export --corim TENANT`: a tenant's reference table as a CoRIM, for other verifiers.

One concise-mid-tag per firmware build the table holds (listed by digest, or admitted on
an endorsement), in the same shape as an endorsement (corim.py): the firmware build
(fwid, svn, SHA-384 of the image) and, per allowed VM shape, the launch MEASUREMENT as
the AMD SEV-SNP CoRIM profile's "mkey 0" reference value ([[7, MEASUREMENT]]), named by
the shape. Unsigned (tag 501) by default; with a key, a COSE_Sign1 like an endorsement
(the signer then vouches for the table, e.g. the policy repository's CI key).
"""
from __future__ import annotations

import time
from typing import Any

from cbor2 import CBORTag
from cryptography.hazmat.primitives.asymmetric import ec

from .cbor import dumps
from .corim import (
    CONTENT_TYPE,
    HDR_CORIM_META,
    HDR_SPKI,
    PROFILE,
    ROLE_MANIFEST_CREATOR,
    TAG_COMID,
    TAG_CORIM,
    TAG_URI,
    Endorsement,
    _entity,
    _validity,
    comid_map,
)
from .cose import HDR_CONTENT_TYPE, sign1, spki_der

EXPORT_VALIDITY_S = 30 * 86400


def table_corim(tenant: str, policy_id: str, rows: list[tuple[str, str, int, list[tuple[str, bytes]]]],
                now: int | None = None) -> dict[int, Any]:
    """rows: (fwid, sha384 hex, svn, [(shape key, MEASUREMENT)]) per firmware; -> unsigned corim-map."""
    now = int(time.time()) if now is None else now
    creator = f"firmgate policy {tenant}"
    tags = []
    for fwid, sha384, svn, shapes in rows:
        e = Endorsement(f"{policy_id}:{fwid}", fwid, sha384, svn, creator, now, now + EXPORT_VALIDITY_S,
                        measurements=tuple(sorted(shapes)))
        tags.append(CBORTag(TAG_COMID, dumps(comid_map(e))))
    out: dict[int, Any] = {0: f"firmgate-policy:{policy_id}", 1: tags, 3: CBORTag(TAG_URI, PROFILE),
                           5: [_entity(creator, [ROLE_MANIFEST_CREATOR])]}
    return out


def export_bytes(corim: dict[int, Any], key: ec.EllipticCurvePrivateKey | None = None, now: int | None = None
                 ) -> bytes:
    payload = dumps(CBORTag(TAG_CORIM, corim))
    if key is None:
        return payload
    now = int(time.time()) if now is None else now
    signer = corim[5][0][0]
    meta = {0: {0: signer}, 1: _validity(now, now + EXPORT_VALIDITY_S)}
    return sign1(key, {HDR_CONTENT_TYPE: CONTENT_TYPE, HDR_CORIM_META: dumps(meta), HDR_SPKI: spki_der(key.public_key())},
                 payload)


def rows_of(loaded: Any) -> list[tuple[str, str, int, list[tuple[str, bytes]]]]:
    """(fwid, sha384, svn, [(shape, MEASUREMENT)]) per firmware of a LoadedPolicy's reference table."""
    by_fw: dict[str, tuple[str, str, int, list[tuple[str, bytes]]]] = {}
    for m, match in loaded.table.entries():
        fw = match.firmware
        row = by_fw.setdefault(fw.sha384, (fw.id, fw.sha384, fw.svn, []))
        row[3].append((match.shape.key(), bytes(m)))
    return sorted(by_fw.values())
