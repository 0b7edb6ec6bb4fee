"""One firmware build's endorsement as a signed CoRIM, and a publisher's signed revocation list.

Encoding (draft-ietf-rats-corim; AMD SEV-SNP CoRIM profile, draft-deeglaze-amd-sev-snp-corim-profile):

  signed-corim = 18([protected, {}, payload, signature])        COSE_Sign1, ES256 or ES384
  protected    = {1: alg, 3: "application/rim+cbor", 4: kid = SHA-256(SPKI DER),
                  8: << corim-meta-map {0: {0: publisher}, 1: {0: 1(not-before), 1: 1(not-after)}} >>,
                  "firmgate-spki": SPKI DER}            (so a policy may pin the key by fingerprint)
  payload      = << 501(corim-map) >>
  corim-map    = {0: endorsement id (text), 1: [506(<< concise-mid-tag >>)],
                  3: 32("tag:amd.com,2025:snp-corim-profile"), 4: validity, 5: [{0: publisher, 2: [1]}]}
  concise-mid-tag = {1: {0: tag id, 1: 0}, 2: [{0: publisher, 2: [0, 1]}], 4: {0: reference-triples}}
  reference-triples:
    [{0: {0: 37(FIRMWARE_CLASS), 1: publisher, 2: fwid}},                the firmware build
     [{1: {0: {0: fwid}, 1: 552(svn), 2: [[7, SHA-384 of the image]], -70001: provenance}}]]
    and, per endorsed VM shape (optional, profile "mkey 0" with the MEASUREMENT digest):
    [{0: {0: 37(SNP_BY_CHIP_CLASS)}}, [{0: 0, 1: {2: [[7, MEASUREMENT]], 11: shape key}}]]

firmgate additions, which other CoRIM consumers may ignore: the firmware environment's
class id FIRMWARE_CLASS, and the provenance map under -70001 ({0: source repository
URI, 1: source commit, 2: build recipe}). The hash algorithm ids are IANA named
information (7 = sha-384). A reader here is strict: unknown keys, wrong types, bad
tags and sizes are refused with the field named, AFTER the signature was checked
(admit.py) -- nothing unsigned is interpreted.
"""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from cbor2 import CBORTag
from cryptography.hazmat.primitives.asymmetric import ec

from .cbor import EndorsementFormatError, dumps, loads
from .cose import HDR_CONTENT_TYPE, Sign1, parse_sign1, sign1, spki_der

MAX_ENDORSEMENT_SIZE = 64 * 1024      # a few shapes' measurements and provenance text fit in a few KiB
MAX_REVOCATIONS_SIZE = 256 * 1024
MAX_SHAPES = 256
MAX_REVOKED = 4096
MAX_TEXT = 512

CONTENT_TYPE = "application/rim+cbor"                          # draft-ietf-rats-corim, protected header
REVOCATIONS_CONTENT_TYPE = "application/vnd.firmgate.endorsement-revocations+cbor"
HDR_CORIM_META = 8
HDR_SPKI = "firmgate-spki"
TAG_CORIM = 501
TAG_COMID = 506
TAG_URI = 32
TAG_UUID = 37
TAG_EPOCH = 1
TAG_SVN = 552
SHA384_ALG = 7                                                  # IANA named information: sha-384
PROFILE = "tag:amd.com,2025:snp-corim-profile"                  # the SNP profile's identifier
SNP_BY_CHIP_CLASS = uuid.UUID("d05e6d1b-9f46-4ae2-a610-ce3e6ee7e153").bytes   # SNP profile: attestation by chip
FIRMWARE_CLASS = uuid.UUID("6c1f7e0c-2f5b-4d0e-9a57-3f2b1f9a6e21").bytes      # firmgate: a UEFI firmware build
PROVENANCE_KEY = -70001
ROLE_MANIFEST_CREATOR = 1
ROLE_TAG_CREATOR, ROLE_CREATOR = 0, 1

FWID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")     # the policy's firmware id rule
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{7,64}$")


@dataclass(frozen=True)
class Provenance:
    source_repo: str | None = None
    source_commit: str | None = None
    build_recipe: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {"source_repo": self.source_repo, "source_commit": self.source_commit,
                "build_recipe": self.build_recipe}


@dataclass(frozen=True)
class Endorsement:
    """What a publisher signed about one firmware build."""

    id: str
    fwid: str
    sha384: str                                  # lowercase hex of the firmware image
    svn: int
    publisher: str
    not_before: int                              # seconds since the epoch
    not_after: int
    provenance: Provenance = Provenance()
    measurements: tuple[tuple[str, bytes], ...] = ()   # (shape key, MEASUREMENT): never trusted blindly

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "fwid": self.fwid, "sha384": self.sha384, "svn": self.svn,
                "publisher": self.publisher, "not_before": self.not_before, "not_after": self.not_after,
                "provenance": self.provenance.to_dict(),
                "measurements": [{"shape": s, "measurement": m.hex()} for s, m in self.measurements]}


@dataclass(frozen=True)
class SignedEndorsement:
    endorsement: Endorsement
    sign1: Sign1 = field(repr=False)
    spki: bytes | None = field(repr=False)   # the signer's key as it claims it (bound by kid)
    raw: bytes = field(repr=False)

    @property
    def kid_hex(self) -> str:
        return self.sign1.kid.hex()


@dataclass(frozen=True)
class Revocations:
    publisher: str
    issued: int
    ids: frozenset[str]
    digests: frozenset[str]


# -- helpers -------------------------------------------------------------------------
def _fail(where: str, why: str) -> EndorsementFormatError:
    return EndorsementFormatError(f"endorsement {where}: {why}")


def _map(v: Any, where: str, required: set[Any], optional: set[Any] = frozenset()) -> dict[Any, Any]:  # type: ignore[assignment]
    if not isinstance(v, dict):
        raise _fail(where, "must be a map")
    missing = [k for k in required if k not in v]
    if missing:
        raise _fail(where, f"missing key(s) {sorted(missing, key=str)}")
    unknown = [k for k in v if k not in required and k not in optional]
    if unknown:
        raise _fail(where, f"unknown key(s) {sorted(unknown, key=str)[:5]}")
    return v


def _list(v: Any, where: str, lo: int = 1, hi: int = 64) -> list[Any]:
    if not isinstance(v, list) or not lo <= len(v) <= hi:
        raise _fail(where, f"must be an array of {lo}..{hi} items")
    return v


def _text(v: Any, where: str, rx: re.Pattern[str] | None = None, hi: int = MAX_TEXT) -> str:
    if not isinstance(v, str) or not 1 <= len(v) <= hi:
        raise _fail(where, f"must be text of 1..{hi} characters")
    if rx is not None and not rx.fullmatch(v):
        raise _fail(where, f"{v[:80]!r} is not allowed here")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in v):
        raise _fail(where, "contains control characters")
    return v


def _tag(v: Any, tag: int, where: str) -> Any:
    if not isinstance(v, CBORTag) or v.tag != tag:
        raise _fail(where, f"must be CBOR tag {tag}")
    return v.value


def _uint(v: Any, where: str, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
        raise _fail(where, f"must be an integer 0..{hi}")
    return v


def _epoch(v: Any, where: str) -> int:
    return _uint(_tag(v, TAG_EPOCH, where), where, 2**40)


def _digest(v: Any, where: str) -> bytes:
    entries = _list(v, where, 1, 1)
    e = entries[0]
    if not isinstance(e, list) or len(e) != 2 or e[0] != SHA384_ALG or isinstance(e[0], bool) \
            or not isinstance(e[1], bytes) or len(e[1]) != 48:
        raise _fail(where, "must be [[7, 48-byte SHA-384]]")
    return bytes(e[1])


def _entity(name: str, roles: list[int]) -> dict[int, Any]:
    return {0: name, 2: roles}


def _validity(nb: int, na: int) -> dict[int, Any]:
    return {0: CBORTag(TAG_EPOCH, nb), 1: CBORTag(TAG_EPOCH, na)}


# -- writing ---------------------------------------------------------------------------
def check_fields(e: Endorsement) -> None:
    """The rules the reader applies, applied before signing (a publisher must not sign what we refuse)."""
    _text(e.id, "id", ID_RE, 128)
    _text(e.fwid, "fwid", FWID_RE, 64)
    _text(e.publisher, "publisher", None, 128)
    if not re.fullmatch(r"[0-9a-f]{96}", e.sha384):
        raise _fail("sha384", "must be 96 lowercase hex digits")
    _uint(e.svn, "svn", 2**32 - 1)
    if not 0 <= e.not_before < e.not_after <= 2**40:
        raise _fail("validity", "not-before must come before not-after")
    if e.provenance.source_repo is not None:
        _text(e.provenance.source_repo, "provenance.source_repo")
    if e.provenance.source_commit is not None:
        _text(e.provenance.source_commit, "provenance.source_commit", COMMIT_RE, 64)
    if e.provenance.build_recipe is not None:
        _text(e.provenance.build_recipe, "provenance.build_recipe", None, 4096)
    if len(e.measurements) > MAX_SHAPES:
        raise _fail("measurements", f"at most {MAX_SHAPES} shapes")
    for s, m in e.measurements:
        _text(s, "measurement shape", None, 1024)
        if len(m) != 48:
            raise _fail("measurement", "must be 48 bytes")


def corim_map(e: Endorsement) -> dict[int, Any]:
    """The unsigned corim-map (without its tag 501) of endorsement `e`."""
    return {0: e.id, 1: [CBORTag(TAG_COMID, dumps(comid_map(e)))], 3: CBORTag(TAG_URI, PROFILE),
            4: _validity(e.not_before, e.not_after), 5: [_entity(e.publisher, [ROLE_MANIFEST_CREATOR])]}


def comid_map(e: Endorsement) -> dict[int, Any]:
    """The concise-mid-tag stating one firmware build and, per shape, its launch MEASUREMENT."""
    prov: dict[int, str] = {}
    for k, v in ((0, e.provenance.source_repo), (1, e.provenance.source_commit), (2, e.provenance.build_recipe)):
        if v is not None:
            prov[k] = v
    mval: dict[int, Any] = {0: {0: e.fwid}, 1: CBORTag(TAG_SVN, e.svn), 2: [[SHA384_ALG, bytes.fromhex(e.sha384)]]}
    if prov:
        mval[PROVENANCE_KEY] = prov
    triples: list[Any] = [[{0: {0: CBORTag(TAG_UUID, FIRMWARE_CLASS), 1: e.publisher, 2: e.fwid}}, [{1: mval}]]]
    for shape, m in e.measurements:
        triples.append([{0: {0: CBORTag(TAG_UUID, SNP_BY_CHIP_CLASS)}},
                        [{0: 0, 1: {2: [[SHA384_ALG, bytes(m)]], 11: shape}}]])
    return {1: {0: f"firmgate:{e.fwid}:{e.sha384[:32]}", 1: 0},
            2: [_entity(e.publisher, [ROLE_TAG_CREATOR, ROLE_CREATOR])],
            4: {0: triples}}


def sign_endorsement(e: Endorsement, key: ec.EllipticCurvePrivateKey) -> bytes:
    check_fields(e)
    meta = {0: {0: e.publisher}, 1: _validity(e.not_before, e.not_after)}
    protected = {HDR_CONTENT_TYPE: CONTENT_TYPE, HDR_CORIM_META: dumps(meta), HDR_SPKI: spki_der(key.public_key())}
    payload = dumps(CBORTag(TAG_CORIM, corim_map(e)))
    if len(payload) > MAX_ENDORSEMENT_SIZE - 1024:
        raise _fail("payload", f"{len(payload)} bytes; at most {MAX_ENDORSEMENT_SIZE - 1024}")
    return sign1(key, protected, payload)


def new_id() -> str:
    return str(uuid.uuid4())


# -- reading ---------------------------------------------------------------------------
def parse_signed(data: bytes) -> SignedEndorsement:
    """Parse the COSE envelope only (signature unchecked). The payload is read by read_payload."""
    s1 = parse_sign1(data, "endorsement", MAX_ENDORSEMENT_SIZE)
    if s1.protected.get(HDR_CONTENT_TYPE) != CONTENT_TYPE:
        raise _fail("protected header", f"content type must be {CONTENT_TYPE!r}")
    if not isinstance(s1.protected.get(HDR_CORIM_META), bytes):
        raise _fail("protected header", "corim-meta (8) must be a byte string (bstr .cbor corim-meta-map)")
    spki = s1.protected.get(HDR_SPKI)
    if spki is not None and (not isinstance(spki, bytes) or len(spki) > 1024):
        raise _fail("protected header", f"{HDR_SPKI} must be a SubjectPublicKeyInfo DER byte string")
    unknown = set(s1.protected) - {1, HDR_CONTENT_TYPE, 4, HDR_CORIM_META, HDR_SPKI}
    if unknown:
        raise _fail("protected header", f"unknown label(s) {sorted(unknown, key=str)[:5]}")
    placeholder = Endorsement("-", "-", "0" * 96, 0, "-", 0, 1)
    return SignedEndorsement(placeholder, s1, spki, bytes(data))


def read_payload(signed: SignedEndorsement) -> SignedEndorsement:
    """The endorsement the (already verified) payload and protected header state; strict."""
    s1 = signed.sign1
    meta = _map(loads(s1.protected[HDR_CORIM_META], "corim-meta", 4096), "corim-meta", {0}, {1})
    signer = _map(meta[0], "corim-meta.signer", {0}, {1})
    publisher = _text(signer[0], "corim-meta.signer.name", None, 128)
    top = loads(s1.payload, "endorsement payload", MAX_ENDORSEMENT_SIZE)
    cmap = _map(_tag(top, TAG_CORIM, "payload"), "corim-map", {0, 1, 3, 4, 5})
    eid = _text(cmap[0], "corim-map.id", ID_RE, 128)
    if _tag(cmap[3], TAG_URI, "corim-map.profile") != PROFILE:
        raise _fail("corim-map.profile", f"must be {PROFILE!r}")
    val = _map(cmap[4], "corim-map.rim-validity", {0, 1})
    nb, na = _epoch(val[0], "rim-validity.not-before"), _epoch(val[1], "rim-validity.not-after")
    if nb >= na:
        raise _fail("rim-validity", "not-before must come before not-after")
    if 1 in meta:   # signature-validity, when present, must say the same (one validity, no ambiguity)
        sv = _map(meta[1], "corim-meta.signature-validity", {1}, {0})
        if _epoch(sv[1], "signature-validity.not-after") != na or \
                (0 in sv and _epoch(sv[0], "signature-validity.not-before") != nb):
            raise _fail("corim-meta.signature-validity", "differs from rim-validity")
    ents = _list(cmap[5], "corim-map.entities", 1, 1)
    ent = _map(ents[0], "corim-map.entities[0]", {0, 2})
    if ent[0] != publisher:
        raise _fail("corim-map.entities[0]", "the manifest creator is not the signer named in corim-meta")
    tags = _list(cmap[1], "corim-map.tags", 1, 1)
    inner = _tag(tags[0], TAG_COMID, "corim-map.tags[0]")
    if not isinstance(inner, bytes):
        raise _fail("corim-map.tags[0]", "must be 506(bstr .cbor concise-mid-tag)")
    comid = _map(loads(inner, "concise-mid-tag", MAX_ENDORSEMENT_SIZE), "concise-mid-tag", {1, 4}, {2})
    triples = _map(comid[4], "triples-map", {0})
    refs = _list(triples[0], "reference-triples", 1, MAX_SHAPES + 1)
    fw_env, fw_meas = _triple(refs[0], "reference-triples[0]")
    fw_class = _map(_map(fw_env, "firmware environment", {0})[0], "firmware class", {0, 1, 2})
    if _tag(fw_class[0], TAG_UUID, "firmware class-id") != FIRMWARE_CLASS:
        raise _fail("firmware class-id", "is not firmgate's firmware class")
    if fw_class[1] != publisher:
        raise _fail("firmware class vendor", "is not the signer named in corim-meta")
    fwid = _text(fw_class[2], "firmware class model (fwid)", FWID_RE, 64)
    mm = _map(_list(fw_meas, "firmware measurements", 1, 1)[0], "firmware measurement-map", {1})
    mval = _map(mm[1], "firmware measurement-values", {0, 1, 2}, {PROVENANCE_KEY})
    if _map(mval[0], "firmware version", {0})[0] != fwid:
        raise _fail("firmware version", "differs from the environment's fwid")
    svn = _uint(_tag(mval[1], TAG_SVN, "firmware svn"), "firmware svn", 2**32 - 1)
    digest = _digest(mval[2], "firmware digests").hex()
    prov = Provenance()
    if PROVENANCE_KEY in mval:
        p = _map(mval[PROVENANCE_KEY], "provenance", set(), {0, 1, 2})
        prov = Provenance(_text(p[0], "provenance.source_repo") if 0 in p else None,
                          _text(p[1], "provenance.source_commit", COMMIT_RE, 64) if 1 in p else None,
                          _text(p[2], "provenance.build_recipe", None, 4096) if 2 in p else None)
    shapes: list[tuple[str, bytes]] = []
    for i, t in enumerate(refs[1:], 1):
        env, meas = _triple(t, f"reference-triples[{i}]")
        cls = _map(_map(env, "SNP environment", {0})[0], "SNP class", {0})
        if _tag(cls[0], TAG_UUID, "SNP class-id") != SNP_BY_CHIP_CLASS:
            raise _fail(f"reference-triples[{i}]", "class-id is not the SNP profile's by-chip class")
        m = _map(_list(meas, "SNP measurements", 1, 1)[0], "SNP measurement-map", {0, 1})
        if m[0] != 0 or isinstance(m[0], bool):
            raise _fail(f"reference-triples[{i}]", "mkey must be 0 (the profile's guest measurements)")
        v = _map(m[1], "SNP measurement-values", {2, 11})
        shapes.append((_text(v[11], "shape name", None, 1024), _digest(v[2], "MEASUREMENT digests")))
    e = Endorsement(eid, fwid, digest, svn, publisher, nb, na, prov, tuple(shapes))
    return SignedEndorsement(e, s1, signed.spki, signed.raw)


def _triple(t: Any, where: str) -> tuple[Any, Any]:
    if not isinstance(t, list) or len(t) != 2:
        raise _fail(where, "must be [environment-map, [measurement-map]]")
    return t[0], t[1]


# -- revocation lists ------------------------------------------------------------------------------
def sign_revocations(r: Revocations, key: ec.EllipticCurvePrivateKey) -> bytes:
    _text(r.publisher, "publisher", None, 128)
    if len(r.ids) + len(r.digests) > MAX_REVOKED:
        raise _fail("revocations", f"at most {MAX_REVOKED} entries")
    body = {0: r.publisher, 1: CBORTag(TAG_EPOCH, r.issued), 2: sorted(r.ids),
            3: [bytes.fromhex(d) for d in sorted(r.digests)]}
    return sign1(key, {HDR_CONTENT_TYPE: REVOCATIONS_CONTENT_TYPE}, dumps(body))


def parse_revocations(data: bytes) -> Sign1:
    s1 = parse_sign1(data, "revocation list", MAX_REVOCATIONS_SIZE)
    if s1.protected.get(HDR_CONTENT_TYPE) != REVOCATIONS_CONTENT_TYPE or set(s1.protected) != {1, 3, 4}:
        raise EndorsementFormatError(f"revocation list: protected header must be exactly alg, kid and "
                                     f"content type {REVOCATIONS_CONTENT_TYPE!r}")
    return s1


def read_revocations(s1: Sign1) -> Revocations:
    """The list a verified Sign1 states (call after s1.verify)."""
    body = _map(loads(s1.payload, "revocation list payload", MAX_REVOCATIONS_SIZE), "revocation list", {0, 1, 2, 3})
    publisher = _text(body[0], "revocations.publisher", None, 128)
    issued = _epoch(body[1], "revocations.issued")
    ids = body[2]
    digests = body[3]
    if not isinstance(ids, list) or not isinstance(digests, list) or len(ids) + len(digests) > MAX_REVOKED:
        raise _fail("revocations", f"ids and digests must be arrays, at most {MAX_REVOKED} entries")
    out_ids = frozenset(_text(x, "revoked id", ID_RE, 128) for x in ids)
    out_d: set[str] = set()
    for d in digests:
        if not isinstance(d, bytes) or len(d) != 48:
            raise _fail("revoked digest", "must be a 48-byte SHA-384")
        out_d.add(d.hex())
    return Revocations(publisher, issued, out_ids, frozenset(out_d))
