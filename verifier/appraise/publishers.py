"""`[[firmware.publishers]]`: the firmware publishers an owner trusts (docs/policy.md, docs/endorsements.md).

    [[firmware.publishers]]
    name = "acme-firmware"                  # how verdicts name the publisher
    key = "publishers/acme.pem"             # P-256/P-384 public key (PEM) in the policy directory,
    # key_sha256 = "9c1f..."                #   or its fingerprint: SHA-256 of the SPKI DER (the COSE kid)
    fwid = "edk2-*-acme.*"                  # glob the endorsed fwid must match (required: no blanket trust)
    min_svn = 3                             # optional: endorsements below are refused
    expires = 2027-06-30                    # optional: the trust ends (TOML date or offset date-time)
    revocations = "publishers/acme.revoked" # optional: the publisher's signed revocation list (needs `key`)
    enforces_boot_chain = "..."             # optional: the owner's reason why these builds pin what they
                                            #   boot (release binding, docs/policy.md); else only shapes
                                            #   with kernel hashes bind their launches

Parsed into `verifier.endorse.admit.PublisherRule`s, kept on TenantPolicy.publishers.
Every key file and revocation list is read and checked at load (a revocation
list that does not verify with the publisher's key refuses the policy: a stale
or forged list must not silently re-admit revoked builds).
"""
from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

from ..endorse.admit import PublisherRule
from ..errors import FirmgateError
from .policy import MAX_LIST, P, _Errors, _int, _str, _table

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ +-]{0,63}$")
FWID_GLOB_RE = re.compile(r"^[A-Za-z0-9._+*?\[\]!-]{1,64}$")
MAX_KEY_FILE = 16 * 1024
KEYS = {"name", "key", "key_sha256", "fwid", "min_svn", "expires", "revocations", "enforces_boot_chain"}


def _inside(errs: _Errors, p: P, loc: str | None) -> str | None:
    if loc is None:
        return None
    rel = Path(loc)
    if not loc or rel.is_absolute() or ".." in rel.parts:
        errs.add(p, f"must be a path inside the policy directory, not {loc!r}")
        return None
    return loc


def _read(errs: _Errors, p: P, path: Path, limit: int) -> bytes | None:
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        errs.add(p, f"cannot read {path.name}: {exc.strerror or exc}")
        return None
    if len(data) > limit:
        errs.add(p, f"{path.name} is larger than {limit} bytes")
        return None
    return data


def _expires(errs: _Errors, p: P, v: Any) -> int | None:
    if isinstance(v, dt.datetime):
        if v.tzinfo is None:
            errs.add(p, "expires must be a date or a date-time with an offset (e.g. 2027-06-30T00:00:00Z)")
            return None
        return int(v.timestamp())
    if isinstance(v, dt.date):
        return int(dt.datetime(v.year, v.month, v.day, tzinfo=dt.UTC).timestamp())
    errs.add(p, "expires must be a TOML date (2027-06-30) or an offset date-time")
    return None


def parse_publishers(errs: _Errors, firmware: Any, base: Path, *, check_files: bool) -> tuple[PublisherRule, ...]:
    """The `firmware.publishers` array of tables (absent: none)."""
    if not isinstance(firmware, dict) or "publishers" not in firmware:
        return ()
    raw = firmware["publishers"]
    where: P = ("firmware", "publishers")
    if not isinstance(raw, list):
        errs.add(where, "must be an array of tables ([[firmware.publishers]])")
        return ()
    if len(raw) > MAX_LIST:
        errs.add(where, f"at most {MAX_LIST} publishers")
        return ()
    out: list[PublisherRule] = []
    names: dict[str, int] = {}
    kids: dict[str, int] = {}
    for i, item in enumerate(raw):
        p: P = where + (i,)
        t = _table(errs, p, item, KEYS)
        if not t:
            continue
        for req in ("name", "fwid"):
            if req not in t:
                errs.add(p, f"publisher is missing {req!r}")
        name = _str(errs, p + ("name",), t["name"]) if "name" in t else None
        if name is not None and not NAME_RE.fullmatch(name):
            errs.add(p + ("name",), f"publisher name {name!r} must be 1-64 of A-Z a-z 0-9 . _ + - and spaces")
            name = None
        if name is not None and name in names:
            errs.add(p + ("name",), f"duplicate publisher {name!r} (first at firmware.publishers[{names[name]}])")
            name = None
        pattern = _str(errs, p + ("fwid",), t["fwid"]) if "fwid" in t else None
        if pattern is not None and not FWID_GLOB_RE.fullmatch(pattern):
            errs.add(p + ("fwid",), f"fwid pattern {pattern!r}: 1-64 of A-Z a-z 0-9 . _ + - and the glob "
                                    "characters * ? [ ] !")
            pattern = None
        min_svn = _int(errs, p + ("min_svn",), t["min_svn"], 0, 2**32 - 1) if "min_svn" in t else None
        expires = _expires(errs, p + ("expires",), t["expires"]) if "expires" in t else None
        if ("key" in t) == ("key_sha256" in t):
            errs.add(p, "publisher needs exactly one of 'key' (a public key file) or 'key_sha256' (its fingerprint)")
            continue
        key = None
        kid: str | None = None
        if "key_sha256" in t:
            s = _str(errs, p + ("key_sha256",), t["key_sha256"])
            if s is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", s):
                errs.add(p + ("key_sha256",), "key_sha256 must be 64 hex digits (SHA-256 of the SubjectPublicKeyInfo)")
                s = None
            kid = s.lower() if s is not None else None
        else:
            loc = _inside(errs, p + ("key",), _str(errs, p + ("key",), t["key"]))
            if loc is not None and check_files:
                data = _read(errs, p + ("key",), base / loc, MAX_KEY_FILE)
                if data is not None:
                    from ..endorse.cose import key_id, load_public_key
                    try:
                        key = load_public_key(data, loc)
                        kid = key_id(key).hex()
                    except FirmgateError as exc:
                        errs.add(p + ("key",), exc.diagnostics())
            elif loc is not None:
                kid = ""   # not read (policy check --no-files)
        if kid:
            if kid in kids:
                errs.add(p, f"the same key as firmware.publishers[{kids[kid]}]")
                kid = None
            else:
                kids[kid] = i
        revocations = None
        if "revocations" in t:
            loc = _inside(errs, p + ("revocations",), _str(errs, p + ("revocations",), t["revocations"]))
            if "key" not in t:
                errs.add(p + ("revocations",), "a revocation list is checked with the publisher's 'key' file; "
                                               "add it")
            elif loc is not None and check_files and key is not None:
                from ..endorse.corim import (
                    MAX_REVOCATIONS_SIZE,
                    parse_revocations,
                    read_revocations,
                )
                data = _read(errs, p + ("revocations",), base / loc, MAX_REVOCATIONS_SIZE)
                if data is not None:
                    try:
                        s1 = parse_revocations(data)
                        if s1.kid.hex() != kid:
                            raise FirmgateError("signed by another key than the publisher's")
                        s1.verify(key)
                        revocations = read_revocations(s1)
                    except FirmgateError as exc:
                        errs.add(p + ("revocations",), f"revocation list {loc!r}: {exc.diagnostics()}")
        chain: str | None = None
        if "enforces_boot_chain" in t:   # the same rule as firmware.allowed's
            chain = _str(errs, p + ("enforces_boot_chain",), t["enforces_boot_chain"])
            if chain is not None and not 8 <= len(chain.strip()) <= 500:
                errs.add(p + ("enforces_boot_chain",), "enforces_boot_chain is the owner's reason (8-500 "
                         "characters) why this publisher's builds boot only what the owner allows")
                chain = None
        if name is not None and pattern is not None and kid is not None and (min_svn is not None or "min_svn" not in t) \
                and (expires is not None or "expires" not in t):
            names[name] = i
            out.append(PublisherRule(name=name, key_sha256=kid, fwid_pattern=pattern, min_svn=min_svn,
                                     expires=expires, key=key, revocations=revocations,
                                     enforces_boot_chain=chain.strip() if chain else None))
    return tuple(out)



def unbound_publisher_secrets(publishers: tuple[PublisherRule, ...], shapes: tuple[Any, ...],
                              secrets: tuple[Any, ...]) -> list[tuple[P, str]]:
    """(path, reason) for each secret a publisher's build could receive in a launch that pins nothing:
    a shape without kernel hashes and a publisher the owner has not said enforces the boot chain.
    (Whether the launch names its owner is binding.unbound_secrets' check, for every secret.)
    Secrets limited to listed firmware (`firmware = [...]`) never go to endorsed builds."""
    loose = [p.name for p in publishers if not p.enforces_boot_chain]
    if not loose or all(s.kernel is not None for s in shapes):
        return []
    why = ("in a shape without kernel hashes, which boots whatever the disk holds (add [shapes.kernel] hashes, "
           "or enforces_boot_chain = \"<reason>\" on the publisher); or say unsafe_unbound = true to accept that risk")
    return [(("secrets", i), f"secret {s.path!r} could be released to firmware of publisher(s) {', '.join(loose)} {why}")
            for i, s in enumerate(secrets) if s.firmware is None and not s.unsafe_unbound]
