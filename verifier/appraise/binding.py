"""Release binding: a secret goes only to its owner's own launch (DESIGN.md "Release binding").

A launch is *bound* when both hold:
- what runs after the firmware is pinned: the matched shape has kernel hashes (QEMU
  kernel-hashes=on: the firmware's SEV hashes table pins kernel, initrd and command line,
  and they are in the MEASUREMENT), or the matched firmware entry says
  `enforces_boot_chain = "<reason>"` (the owner built it to boot only what the owner allows);
- the launch names its owner: the policy trusts ID or author keys ([id_block]; the PSP
  verified the owner's ID block and put the keys' digests in the report), or lists a
  literal HOST_DATA value (`platform.host_data = "<hex>"`). `host_data = "initdata"`
  does not name an owner: the guest chooses the init-data it sends.

`unbound_secrets` refuses, at load, a policy that would release a secret to an unbound
launch unless that secret says `unsafe_unbound = true`; `launch_binding` says, for one
matched (firmware, shape), whether the launch is bound and by what.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .policy import (
    FirmwareEntry,
    IdBlockRules,
    P,
    PlatformRules,
    SecretRule,
    ShapeRule,
    _bool,
    _Errors,
    _list,
    _str,
    _table,
)

MAX_TRUSTED_KEYS = 64
_HEX96 = re.compile(r"[0-9a-fA-F]{96}")


def _key_entry(errs: _Errors, path: P, v: Any) -> bytes | None:
    """A trusted key: 96 hex digits (SHA-384 of AMD's 0x404-byte key structure) or a PEM P-384 key."""
    s = _str(errs, path, v)
    if s is None:
        return None
    s = s.strip()
    if _HEX96.fullmatch(s):
        d = bytes.fromhex(s)
        if not any(d):
            errs.add(path, "an all-zero digest is what a launch WITHOUT an ID block reports; it names no key")
            return None
        return d
    if s.startswith("-----BEGIN"):
        from ..idblock import IdBlockError, pem_key_digest
        if len(s) > 8192:
            errs.add(path, "PEM key is longer than 8192 characters")
            return None
        try:
            return pem_key_digest(s)
        except IdBlockError as exc:
            errs.add(path, f"trusted key: {exc.diagnostics()}")
            return None
    errs.add(path, "a trusted key is 96 hex digits (SHA-384 of AMD's 0x404-byte public-key structure, "
                   "as `firmgate idblock verify` prints) or a PEM ECDSA P-384 public key")
    return None


def id_block_rules(errs: _Errors, doc: dict[str, Any]) -> IdBlockRules:
    if "id_block" not in doc:
        return IdBlockRules()
    p: P = ("id_block",)
    t = _table(errs, p, doc["id_block"], {"trusted_id_keys", "trusted_author_keys", "require_id_block",
                                          "require_author_key"})
    kw: dict[str, Any] = {}
    for name in ("trusted_id_keys", "trusted_author_keys"):
        if name in t:
            keys = _list(errs, p + (name,), t[name], lambda q, x: _key_entry(errs, q, x))
            if len(keys) > MAX_TRUSTED_KEYS:
                errs.add(p + (name,), f"at most {MAX_TRUSTED_KEYS} keys")
            kw[name] = tuple(dict.fromkeys(keys))
    for name in ("require_id_block", "require_author_key"):
        if name in t:
            b = _bool(errs, p + (name,), t[name])
            if b is not None:
                kw[name] = b
    return IdBlockRules(**kw)


def owner_named_by(platform: PlatformRules, rules: IdBlockRules) -> str | None:
    """What in the policy makes an accepted launch name its owner, or None."""
    parts = []
    if rules.trusted_id_keys:
        parts.append(f"{len(rules.trusted_id_keys)} trusted ID key(s)")
    if rules.trusted_author_keys:
        parts.append(f"{len(rules.trusted_author_keys)} trusted author key(s)")
    if isinstance(platform.host_data, bytes):
        parts.append(f"HOST_DATA {platform.host_data.hex()[:16]}...")
    return " and ".join(parts) or None


def pinned_by(fw: FirmwareEntry, kernel_hashes: bool) -> str | None:
    """What pins the code that runs after this firmware, in a shape with or without kernel hashes, or None."""
    if kernel_hashes:
        return "kernel hashes in the measured launch (kernel, initrd and command line)"
    if fw.enforces_boot_chain:
        return f"firmware {fw.id} enforces its boot chain ({fw.enforces_boot_chain})"
    return None


@dataclass(frozen=True)
class Binding:
    bound: bool
    pinned_by: str | None
    owner_named_by: str | None

    def missing(self) -> str:
        out = []
        if self.pinned_by is None:
            out.append("nothing pins what runs after the firmware (no kernel hashes in the shape, "
                       "no enforces_boot_chain on the firmware)")
        if self.owner_named_by is None:
            out.append("nothing names the owner (no [id_block] trusted keys, no literal platform.host_data)")
        return "; ".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {"bound": self.bound, "pinned_by": self.pinned_by, "owner_named_by": self.owner_named_by}


def launch_binding(platform: PlatformRules, rules: IdBlockRules, fw: FirmwareEntry, kernel_hashes: bool) -> Binding:
    pin, owner = pinned_by(fw, kernel_hashes), owner_named_by(platform, rules)
    return Binding(pin is not None and owner is not None, pin, owner)


def unbound_secrets(firmware: tuple[FirmwareEntry, ...], shapes: tuple[ShapeRule, ...], platform: PlatformRules,
                    rules: IdBlockRules, secrets: tuple[SecretRule, ...], revoked: frozenset[str] = frozenset(),
                    min_svn: int | None = None) -> list[tuple[P, str]]:
    """(path, reason) for every secret this policy could release to an unbound launch.
    Firmware that can never receive the secret (not listed for it, revoked, below a minimum svn) does not count."""
    out: list[tuple[P, str]] = []
    owner = owner_named_by(platform, rules)
    for i, secret in enumerate(secrets):
        if secret.unsafe_unbound:
            continue
        floor = max(min_svn or 0, secret.min_svn or 0)
        eligible = [f for f in firmware if (secret.firmware is None or f.id in secret.firmware)
                    and f.id not in revoked and f.svn >= floor]
        loose = sorted({f.id for f in eligible for s in shapes if pinned_by(f, s.kernel is not None) is None})
        why = []
        if loose:
            why.append("firmware " + ", ".join(loose) + " in a shape without kernel hashes boots whatever "
                       "the disk holds (add [shapes.kernel] hashes, or enforces_boot_chain = \"<reason>\" "
                       "on a firmware built to boot only your code)")
        if owner is None:
            why.append("nothing names the owner, so a look-alike VM of anyone else passes too (add "
                       "[id_block] trusted_author_keys / trusted_id_keys, or a literal platform.host_data)")
        if why:
            reason = (f"secret {secret.path!r} would be released to a launch not bound to its owner: "
                      f"{'; '.join(why)}; or say unsafe_unbound = true to accept that risk")
            out.append((("secrets", i), reason))
    return out
