"""What the simulated PSP does with an owner's ID block at SNP_LAUNCH_FINISH.

SNP ABI rev 1.55, 8.18 SNP_LAUNCH_FINISH: with ID_BLOCK_EN the firmware verifies
ID_BLOCK_SIG with ID_KEY (and, with AUTHOR_KEY_EN, ID_KEY_SIG with AUTHOR_KEY),
then refuses the launch unless the ID block's LD equals the launch digest and its
POLICY equals the guest policy given at SNP_LAUNCH_START (and VERSION is 1).
An accepted launch reports ID_KEY_DIGEST, AUTHOR_KEY_DIGEST (zero without an
author key), KEY_INFO.AUTHOR_KEY_EN, FAMILY_ID, IMAGE_ID and GUEST_SVN from the
block. `launch_fields` returns those report fields for `SimPlatform.sign_report`.
"""
from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

from verifier.idblock import IdBlockError
from verifier.idblock import verify as verify_id_block

if TYPE_CHECKING:
    from .platform import SimPlatform

DEFAULT_GUEST_POLICY = 0x30000   # SMT allowed, bit 17 reserved-must-be-one (SNP ABI Table 9)


class LaunchRefused(Exception):
    """The PSP refused SNP_LAUNCH_FINISH (the VM never runs): the reason names the field."""


def launch_fields(platform: SimPlatform, measurement: bytes, *, guest_policy: int = DEFAULT_GUEST_POLICY,
                  id_block: bytes | None = None, id_auth: bytes | None = None,
                  author_key_enabled: bool = False) -> dict[str, Any]:
    """Report fields of a launch with `measurement` and `guest_policy`, after the PSP's ID block checks."""
    fields: dict[str, Any] = {"measurement": measurement, "policy": guest_policy}
    if id_block is None and id_auth is None:
        if author_key_enabled:
            raise LaunchRefused("AUTHOR_KEY_EN without an ID block")
        return fields
    if id_block is None or id_auth is None:
        raise LaunchRefused("an ID block needs its ID auth structure, and the other way round")
    try:
        v = verify_id_block(id_block, id_auth, author_key_enabled=author_key_enabled)
    except IdBlockError as exc:
        raise LaunchRefused(f"ID block refused: {exc.diagnostics()}") from exc
    if not hmac.compare_digest(v.block.launch_digest, measurement):
        raise LaunchRefused(f"ID block LD {v.block.launch_digest.hex()[:16]}... is not the launch digest "
                            f"{measurement.hex()[:16]}...")
    if v.block.policy != guest_policy:
        raise LaunchRefused(f"ID block POLICY 0x{v.block.policy:x} is not the guest policy 0x{guest_policy:x}")
    key_info = int(platform.default_fields()["key_info"]) | (1 if author_key_enabled else 0)
    fields.update(id_key_digest=v.id_key_digest, author_key_digest=v.author_key_digest or bytes(48),
                  key_info=key_info, family_id=v.block.family_id, image_id=v.block.image_id,
                  guest_svn=v.block.guest_svn)
    return fields
