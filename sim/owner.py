"""A tenant (owner) for tests and the demo: its ID and author keys, its signed launches, its bound policy.

`Owner(label)` has deterministic-per-process P-384 keys; `launch_fields` signs an ID block
for a measurement and runs it through the simulated PSP (sim.psp), giving the report fields
a bound launch has. `bound_policy` writes a policy TOML whose secrets are released only to
the owner's own launch (verifier/appraise/binding.py): the firmware says
`enforces_boot_chain` (or the shape has kernel hashes) and [id_block] trusts the owner's
author key. Several test files build policies; this is the one place that knows the bound form.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)

from verifier.idblock import IdBlock, key_digest, sign
from verifier.idblockset import IdBlockSet, sign_table
from verifier.measure.launch import Shape, expected_measurement

from .psp import DEFAULT_GUEST_POLICY, launch_fields

if TYPE_CHECKING:
    from .platform import SimPlatform

_KEYS: dict[str, ec.EllipticCurvePrivateKey] = {}
BOOT_CHAIN_REASON = "test firmware: Secure Boot db holds only the owner's key"


def _key(label: str) -> ec.EllipticCurvePrivateKey:
    if label not in _KEYS:
        _KEYS[label] = ec.generate_private_key(ec.SECP384R1())
    return _KEYS[label]


@dataclass
class Owner:
    label: str
    family_id: bytes = bytes(16)
    image_id: bytes = bytes(16)
    guest_svn: int = 1
    id_key: ec.EllipticCurvePrivateKey = field(init=False)
    author_key: ec.EllipticCurvePrivateKey = field(init=False)

    def __post_init__(self) -> None:
        self.id_key = _key(f"id-{self.label}")
        self.author_key = _key(f"author-{self.label}")

    @property
    def id_digest(self) -> bytes:
        return key_digest(self.id_key.public_key())

    @property
    def author_digest(self) -> bytes:
        return key_digest(self.author_key.public_key())

    def pem(self, which: str) -> bytes:
        key = self.id_key if which == "id" else self.author_key
        return key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())

    def sign(self, measurement: bytes, guest_policy: int = DEFAULT_GUEST_POLICY,
             with_author: bool = True) -> tuple[bytes, bytes]:
        block = IdBlock(measurement, self.family_id, self.image_id, self.guest_svn, guest_policy)
        return sign(block, self.id_key, self.author_key if with_author else None)

    def launch_fields(self, platform: SimPlatform, measurement: bytes,
                      guest_policy: int = DEFAULT_GUEST_POLICY) -> dict[str, Any]:
        """Report fields of this owner's signed launch of `measurement` (the simulated PSP checked it)."""
        block, auth = self.sign(measurement, guest_policy)
        return launch_fields(platform, measurement, guest_policy=guest_policy, id_block=block, id_auth=auth,
                             author_key_enabled=True)

    def sign_set(self, tenant: str, images: Mapping[str, bytes], shapes: Sequence[Shape],
                 guest_policy: int = DEFAULT_GUEST_POLICY) -> IdBlockSet:
        """The owner's `firmgate idblock sign` output for these firmware images (fwid -> bytes) and shapes."""
        entries = [(expected_measurement(img, sh), fwid, hashlib.sha384(img).hexdigest(), sh.key())
                   for fwid, img in images.items() for sh in shapes]
        return sign_table(tenant, "00" * 32, entries, self.id_key, self.author_key, family_id=self.family_id,
                          image_id=self.image_id, guest_svn=self.guest_svn, guest_policy=guest_policy)

    def id_block_toml(self) -> str:
        return f'[id_block]\ntrusted_author_keys = ["{self.author_digest.hex()}"]\n'


def bound_policy(owner: Owner, tenant: str, firmware: Sequence[tuple[str, str, int, str]], *,
                 secrets: Sequence[str] = (), shapes: str | None = None, extra: str = "",
                 description: str = "") -> str:
    """A policy TOML for `tenant`: firmware (id, sha384, svn, bytes) marked enforces_boot_chain,
    the given [[shapes]] (default: qemu, 1-2 vCPUs, EPYC-v4), the simulated platform allowed,
    `owner`'s author key trusted, and `secrets` (paths) released only to a bound launch."""
    out = ["version = 1", f'description = "{description or "bound test policy of " + tenant}"', "[firmware]"]
    for fwid, digest, svn, loc in firmware:
        out += ["[[firmware.allowed]]", f'id = "{fwid}"', f'sha384 = "{digest}"', f"svn = {svn}",
                f'bytes = "{loc}"', f'enforces_boot_chain = "{BOOT_CHAIN_REASON}"']
    out.append(shapes or '[[shapes]]\nvmm = "qemu"\nvcpus = [1, 2]\nvcpu_types = ["EPYC-v4"]')
    out += ["[platform]", "allow_simulated_platform = true", owner.id_block_toml()]
    for path in secrets:
        out += ["[[secrets]]", f'path = "{path}"']
    return "\n".join(out) + "\n" + extra
