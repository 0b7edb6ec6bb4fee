"""Endorsements as CoRIM in COSE_Sign1: what we write validates against the drafts' CDDL; what we read
is checked strictly (signature before payload, exact header, no unknown keys); hostile CBOR fails cleanly."""
from __future__ import annotations

import hashlib
import time

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.endorse_helpers import endorsement, new_key, schema, signed
from verifier.endorse.admit import EndorsementRefused, PublisherRule, admit, verify_with
from verifier.endorse.cbor import EndorsementFormatError, loads
from verifier.endorse.corim import (
    MAX_ENDORSEMENT_SIZE,
    Revocations,
    parse_revocations,
    parse_signed,
    read_payload,
    read_revocations,
    sign_endorsement,
    sign_revocations,
)
from verifier.endorse.cose import ES256, ES384, key_id, parse_sign1
from verifier.endorse.export import export_bytes, table_corim
from verifier.errors import FirmgateError, SignatureError

DIGEST = hashlib.sha384(b"firmware").hexdigest()
SHAPE = "vcpus=1,vcpu_type=EPYC-v4,vmm=qemu,guest_features=0x1"


def _rule(key: ec.EllipticCurvePrivateKey, **kw: object) -> PublisherRule:
    return PublisherRule(name="acme", key_sha256=key_id(key.public_key()).hex(), key=key.public_key(), **kw)  # type: ignore[arg-type]


def _parts(raw: bytes) -> tuple[bytes, dict[object, object], bytes, bytes]:
    env = cbor2.loads(raw)
    assert env.tag == 18
    prot, unprot, payload, sig = env.value
    return prot, unprot, payload, sig


@pytest.mark.parametrize("curve,alg", [(ec.SECP256R1(), ES256), (ec.SECP384R1(), ES384)])
def test_signed_endorsement_validates_against_the_corim_cddl(curve: ec.EllipticCurve, alg: int) -> None:
    key = new_key(curve)
    raw = signed(key, DIGEST, measurements=((SHAPE, b"\x11" * 48),))
    prot, _, payload, _ = _parts(raw)
    schema("signed-corim", flat=True).validate_cbor(raw)
    schema("protected-corim-header-map", flat=True).validate_cbor(prot)
    header = cbor2.loads(prot)
    assert header[1] == alg and header[3] == "application/rim+cbor" and header[4] == key_id(key.public_key())
    schema("corim-meta-map").validate_cbor(header[8])
    schema("tagged-unsigned-corim-map", flat=True).validate_cbor(payload)
    for tag in cbor2.loads(payload).value[1]:
        assert tag.tag == 506
        schema("concise-mid-tag").validate_cbor(tag.value)


def test_the_cddl_refuses_what_the_profile_forbids() -> None:
    """The schema is not vacuous: a wrong content type and a non-map protected header are refused."""
    import pycddl
    raw = signed(new_key(), DIGEST)
    prot, _, _, _ = _parts(raw)
    header = cbor2.loads(prot)
    header[3] = "application/json"
    with pytest.raises(pycddl.ValidationError):
        schema("protected-corim-header-map", flat=True).validate_cbor(cbor2.dumps(header))
    with pytest.raises(pycddl.ValidationError):
        schema("signed-corim", flat=True).validate_cbor(cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b""])))


def test_export_validates_against_the_corim_cddl() -> None:
    corim = table_corim("acme", "acme@abc", [("fw-1", DIGEST, 2, [(SHAPE, b"\x22" * 48)])], now=1_800_000_000)
    raw = export_bytes(corim)
    schema("tagged-unsigned-corim-map", flat=True).validate_cbor(raw)
    for tag in cbor2.loads(raw).value[1]:
        schema("concise-mid-tag").validate_cbor(tag.value)
    key = new_key(ec.SECP256R1())
    signed_raw = export_bytes(corim, key)
    schema("signed-corim", flat=True).validate_cbor(signed_raw)
    parse_sign1(signed_raw, "export", 1 << 20).verify(key.public_key())


def test_round_trip_reads_back_every_field() -> None:
    key = new_key()
    e = endorsement(DIGEST, measurements=((SHAPE, b"\x11" * 48),))
    adm = admit([_rule(key)], sign_endorsement(e, key), DIGEST)
    assert adm.endorsement == e and adm.publisher == "acme"
    assert adm.to_dict()["endorsement"] == e.id


def test_tampered_payload_fails_the_signature() -> None:
    key = new_key()
    prot, unprot, payload, sig = _parts(signed(key, DIGEST, svn=3))
    forged = payload.replace(cbor2.dumps(cbor2.CBORTag(552, 3)), cbor2.dumps(cbor2.CBORTag(552, 9)))
    assert forged != payload
    raw = cbor2.dumps(cbor2.CBORTag(18, [prot, unprot, forged, sig]))
    with pytest.raises(EndorsementRefused, match="does not verify"):
        admit([_rule(key)], raw, DIGEST)


def test_untrusted_key_is_refused_by_fingerprint() -> None:
    raw = signed(new_key(), DIGEST)
    with pytest.raises(EndorsementRefused, match="no trusted publisher"):
        admit([_rule(new_key())], raw, DIGEST)


def test_algorithm_must_match_the_key_curve() -> None:
    """A P-384 publisher key with a protected header claiming ES256: refused, never checked with SHA-256."""
    key = new_key()
    prot, unprot, payload, sig = _parts(signed(key, DIGEST))
    header = cbor2.loads(prot)
    header[1] = ES256
    raw = cbor2.dumps(cbor2.CBORTag(18, [cbor2.dumps(header), unprot, payload, sig]))
    with pytest.raises(SignatureError, match="ES256"):
        parse_signed(raw).sign1.verify(key.public_key())


def test_unprotected_header_must_be_empty() -> None:
    prot, _, payload, sig = _parts(signed(new_key(), DIGEST))
    raw = cbor2.dumps(cbor2.CBORTag(18, [prot, {4: b"x" * 32}, payload, sig]))
    with pytest.raises(EndorsementFormatError, match="unprotected"):
        parse_signed(raw)


def test_fingerprint_pin_uses_the_key_the_endorsement_carries() -> None:
    key = new_key(ec.SECP256R1())
    raw = signed(key, DIGEST)
    rule = PublisherRule(name="acme", key_sha256=key_id(key.public_key()).hex())   # no key file: fingerprint only
    assert admit([rule], raw, DIGEST).endorsement.sha384 == DIGEST


@pytest.mark.parametrize("why,kw,now_shift", [
    ("expired", {"valid": (1_000, 2_000)}, 0),
    ("not valid before", {"valid": (int(time.time()) + 3600, int(time.time()) + 7200)}, 0),
    ("outside the publisher's pattern", {"fwid": "evil-1.0"}, 0),
    ("below the publisher's minimum", {"svn": 1}, 0),
])
def test_constraints_refuse_by_name(why: str, kw: dict[str, object], now_shift: int) -> None:
    key = new_key()
    raw = signed(key, DIGEST, **kw)  # type: ignore[arg-type]
    with pytest.raises(EndorsementRefused, match=why) as ei:
        admit([_rule(key, fwid_pattern="edk2-*-acme.*", min_svn=2)], raw, DIGEST)
    assert "publisher acme" in str(ei.value)


def test_trust_in_a_publisher_expires() -> None:
    key = new_key()
    with pytest.raises(EndorsementRefused, match="trust in publisher acme expired"):
        admit([_rule(key, expires=int(time.time()) - 1)], signed(key, DIGEST), DIGEST)


def test_endorsement_for_other_bytes_is_refused() -> None:
    key = new_key()
    with pytest.raises(EndorsementRefused, match="is for firmware sha384"):
        admit([_rule(key)], signed(key, DIGEST), hashlib.sha384(b"other").hexdigest())


@pytest.mark.parametrize("by", ["id", "digest"])
def test_revocation_list_revokes_by_id_and_by_digest(by: str) -> None:
    key = new_key()
    e = endorsement(DIGEST)
    raw = sign_endorsement(e, key)
    rev = Revocations("Acme", int(time.time()), frozenset({e.id} if by == "id" else set()),
                      frozenset({DIGEST} if by == "digest" else set()))
    s1 = parse_revocations(sign_revocations(rev, key))
    s1.verify(key.public_key())
    with pytest.raises(EndorsementRefused, match="revoked by the publisher's revocation list"):
        admit([_rule(key, revocations=read_revocations(s1))], raw, DIGEST)


def test_revocation_list_signed_by_another_key_does_not_verify() -> None:
    key, other = new_key(), new_key()
    s1 = parse_revocations(sign_revocations(Revocations("Acme", 1, frozenset({"x"}), frozenset()), other))
    with pytest.raises(SignatureError):
        s1.verify(key.public_key())


def test_unknown_payload_keys_are_refused_after_the_signature() -> None:
    """A signed endorsement with a key we do not understand is refused (it might carry a constraint)."""
    from cbor2 import CBORTag

    from verifier.endorse.corim import CONTENT_TYPE, HDR_CORIM_META, corim_map
    from verifier.endorse.cose import sign1
    key = new_key()
    e = endorsement(DIGEST)
    cmap = corim_map(e)
    cmap[99] = "surprise"
    meta = cbor2.dumps({0: {0: e.publisher}})
    raw = sign1(key, {3: CONTENT_TYPE, HDR_CORIM_META: meta}, cbor2.dumps(CBORTag(501, cmap)))
    with pytest.raises(EndorsementRefused, match="unknown key"):
        verify_with(raw, [_rule(key)])


# -- hostile CBOR: every one a clean EndorsementFormatError, none a crash ---------------------------------------
HOSTILE = {
    "empty": b"",
    "truncated": signed(new_key(), DIGEST)[:-10],
    "trailing bytes": signed(new_key(), DIGEST) + b"\x00",
    "huge declared bstr": bytes.fromhex("5b7fffffffffffffff00"),
    "huge declared array": bytes.fromhex("9b7fffffffffffffff"),
    "deep nesting": b"\x81" * 10_000 + b"\x00",
    "indefinite array": bytes.fromhex("9f01ff"),
    "duplicate map keys": bytes.fromhex("a201010102"),
    "shared reference cycle": bytes.fromhex("d81c81d81d00"),
    "bignum": bytes.fromhex("c249010000000000000000"),
    "not a tag": cbor2.dumps([b"", {}, b"", b""]),
    "wrong tag": cbor2.dumps(cbor2.CBORTag(98, [b"", {}, b"", b""])),
    "short array": cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b""])),
    "detached payload": cbor2.dumps(cbor2.CBORTag(18, [b"\xa0", {}, None, b""])),
    "protected not a map": cbor2.dumps(cbor2.CBORTag(18, [cbor2.dumps([1]), {}, b"", b""])),
    "bad alg": cbor2.dumps(cbor2.CBORTag(18, [cbor2.dumps({1: -257, 4: b"k" * 32}), {}, b"", b""])),
    "bool alg": cbor2.dumps(cbor2.CBORTag(18, [cbor2.dumps({1: True, 4: b"k" * 32}), {}, b"", b""])),
    "short kid": cbor2.dumps(cbor2.CBORTag(18, [cbor2.dumps({1: -35, 4: b"k"}), {}, b"", b""])),
    "too large": b"\x40" * (MAX_ENDORSEMENT_SIZE + 1),
    "corim-meta not a bstr": cbor2.dumps(cbor2.CBORTag(18, [cbor2.dumps(
        {1: -7, 3: "application/rim+cbor", 4: b"k" * 32, 8: cbor2.CBORTag(1, 5)}), {}, b"\xa0", b""])),
    "invalid utf-8": bytes.fromhex("62ff00"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_cbor_fails_cleanly(name: str) -> None:
    with pytest.raises(FirmgateError) as ei:
        parse_signed(HOSTILE[name])
    assert ei.value.exit_code == 2
    with pytest.raises(EndorsementRefused):   # through admission: a rejection (exit 1) with the reason
        admit([], HOSTILE[name], DIGEST)


def test_semantic_tags_stay_raw() -> None:
    """cbor2 would turn tag 1 into a datetime and 37 into a UUID; the reader must see the raw tag."""
    item = loads(bytes.fromhex("82c11a5f000000d8255001234567890123456789012345678901"), "x", 100)
    assert [t.tag for t in item] == [1, 37]


def test_read_payload_is_only_reached_through_a_verified_signature() -> None:
    """parse_signed reads the envelope only: its endorsement is a placeholder until read_payload."""
    raw = signed(new_key(), DIGEST)
    assert parse_signed(raw).endorsement.sha384 == "0" * 96
    assert read_payload(parse_signed(raw)).endorsement.sha384 == DIGEST
