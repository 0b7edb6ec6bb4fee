"""Shared helpers for the endorsement tests: publisher keys, signed endorsements, the CDDL schemas."""
from __future__ import annotations

import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from verifier.endorse.corim import Endorsement, Provenance, new_id, sign_endorsement

CDDL = Path(__file__).resolve().parent / "vectors" / "corim" / "corim-subset.cddl"


def new_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP384R1())


def pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def pem_public(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def endorsement(sha384: str, *, fwid: str = "edk2-2026.08-acme.3", svn: int = 3, publisher: str = "Acme Firmware",
                valid: tuple[int, int] | None = None, measurements: tuple[tuple[str, bytes], ...] = (),
                eid: str | None = None) -> Endorsement:
    now = int(time.time())
    nb, na = valid or (now - 60, now + 86400)
    return Endorsement(eid or new_id(), fwid, sha384, svn, publisher, nb, na,
                       Provenance("https://example.com/edk2.git", "0123456789abcdef", "make -C OvmfPkg"),
                       measurements)


def signed(key: ec.EllipticCurvePrivateKey, sha384: str, **kw: Any) -> bytes:
    return sign_endorsement(endorsement(sha384, **kw), key)


def cddl_text() -> str:
    """The drafts' CDDL in the form pycddl 0.6.4 parses: its parser lacks `&(name: value)` keys (the value
    alone is the same key), the `non-empty<M>` generic with `.and` (firmgate's reader enforces non-empty),
    and several `$socket /=` lines for one socket (merged into one augmentation)."""
    src = CDDL.read_text()
    src = re.sub(r"&\(\s*[\w-]+\s*:\s*(-?\d+)\s*\)", r"\1", src)
    src = src.replace("non-empty<{", "{").replace("}>", "}")
    src = re.sub(r"^non-empty<M>.*$", "", src, flags=re.MULTILINE)
    socks: dict[str, list[str]] = defaultdict(list)
    out = []
    for line in src.splitlines():
        m = re.match(r"^(\$[\w-]+)\s*/=\s*(.+?)\s*(;.*)?$", line)
        if m:
            socks[m[1]].append(m[2])
        else:
            out.append(line)
    out += [f"{k} /= {' / '.join(v)}" for k, v in socks.items()]
    return "\n".join(out)


def schema(root: str, *, flat: bool = False) -> Any:
    """A pycddl schema rooted at `root`. flat: `bstr .cbor X` as plain bstr (pycddl 0.6.4 applies `.cbor`
    inside arrays to the wrong items), the embedded items then validated on their own."""
    import pycddl
    text = cddl_text()
    if flat:
        text = re.sub(r"(bstr|bytes) \.cbor [\w-]+", "bstr", text)
    return pycddl.Schema(f"firmgate-root = {root}\n" + text)
