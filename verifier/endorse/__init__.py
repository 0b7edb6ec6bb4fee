"""Signed firmware endorsements: a publisher vouches for one firmware build (docs/endorsements.md).

cbor.py     strict, bounded CBOR decoding of hostile input (no semantic tags, no duplicates)
cose.py     COSE_Sign1 (RFC 9052) with ES256 / ES384, key ids, public-key loading
corim.py    the endorsement as a CoRIM (draft-ietf-rats-corim) following the AMD SEV-SNP
            CoRIM profile where it applies; the publisher's revocation list
admit.py    ADMISSION: a policy's trusted publishers + an endorsement + the firmware digest
            -> Admission, or the named reason it is refused. No measuring, no I/O.
export.py   a tenant's reference table as an (unsigned or signed) CoRIM for other verifiers
"""
