"""REPORT_DATA and HOST_DATA bindings of the KBS protocol 0.4.0 (KBS-FACTS sections 2-3).

REPORT_DATA = SHA-384(JCS({"additional-evidence", "nonce", "tee-pubkey"})),
zero-padded to 64 bytes, with the SESSION's nonce (not the one the guest
claims). init-data, when present, is bound through HOST_DATA: its TOML names the
digest algorithm; the digest is zero-padded or truncated to 32 bytes.
"""
from __future__ import annotations

import hashlib
import hmac
import tomllib
from typing import Any

import orjson
import rfc8785

from verifier.errors import EvidenceError

REPORT_DATA_SIZE = 64
HOST_DATA_SIZE = 32
INITDATA_HASHES = {"sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}


class BindingError(EvidenceError):
    """The evidence does not bind what the session expects (nonce, key, init-data)."""


def expected_report_data(nonce: str, tee_pubkey: dict[str, Any], additional_evidence: str) -> bytes:
    """SHA-384 of JCS({"additional-evidence", "nonce", "tee-pubkey"}), hashed member by member.

    The three keys are already in JCS order (RFC 8785 3.2.3, UTF-16 code units), so the object's
    form is the members' forms joined. The additional evidence (megabytes, guest-chosen) is
    serialised by orjson: for a str, RFC 8785 3.2.2.2 is ECMAScript's JSON.stringify (escape
    `"`, `\\` and U+0000-U+001F, \\b \\t \\n \\f \\r in short form, the rest as \\u00xx in lower
    case, everything else as UTF-8), which is what orjson writes, in C; rfc8785's pure-Python
    escaper took 4 s for 8 million quotes (docs/security.md REVIEW-2). A str parsed from JSON
    holds no lone surrogate (orjson refuses them), the one input the two would differ on;
    tests/test_broker_units.py checks the equality on random strings.
    """
    h = hashlib.sha384(b'{"additional-evidence":')
    try:
        h.update(orjson.dumps(additional_evidence))
        h.update(b',"nonce":')
        h.update(orjson.dumps(nonce))
        h.update(b',"tee-pubkey":')
        h.update(jcs_flat(tee_pubkey))
    except (orjson.JSONEncodeError, rfc8785.CanonicalizationError) as exc:
        raise BindingError(f"runtime-data has no RFC 8785 form: {str(exc)[:120]}") from None
    h.update(b"}")
    return h.digest().ljust(REPORT_DATA_SIZE, b"\0")


def jcs_flat(obj: Any) -> bytes:
    """RFC 8785 form of `obj`. A JWK as guests send it (string members with ASCII names) is written
    by orjson with sorted keys: for ASCII names the UTF-16 order of RFC 8785 3.2.3 is orjson's
    order, and its string escaping is RFC 8785's (see expected_report_data). Anything else goes
    to rfc8785, which raises for a member outside I-JSON (an integer >= 2**53)."""
    if isinstance(obj, dict) and all(type(k) is str and k.isascii() and type(v) is str for k, v in obj.items()):
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    return rfc8785.dumps(obj)


def check_report_data(actual: bytes, expected: bytes) -> None:
    if len(actual) != REPORT_DATA_SIZE or not hmac.compare_digest(actual, expected):
        raise BindingError(
            "REPORT_DATA does not bind the session nonce and tee-pubkey: "
            f"report has {actual[:48].hex()}, expected SHA-384(JCS(runtime-data)) = {expected[:48].hex()}")


def initdata_host_data(init_data: Any) -> bytes | None:
    """The HOST_DATA that `init-data` must produce, or None when it is absent."""
    if init_data is None:
        return None
    if not isinstance(init_data, dict) or set(init_data) - {"format", "body"}:
        raise BindingError("init-data must be null or {\"format\", \"body\"}")
    if init_data.get("format") != "toml" or not isinstance(init_data.get("body"), str):
        raise BindingError("init-data format must be \"toml\" with a string body")
    body: str = init_data["body"]
    try:
        algorithm = tomllib.loads(body).get("algorithm")
    except tomllib.TOMLDecodeError as exc:
        raise BindingError(f"init-data body is not TOML: {exc}") from exc
    except RecursionError:
        raise BindingError("init-data body nests too deeply to parse") from None
    if not isinstance(algorithm, str) or algorithm not in INITDATA_HASHES:  # an array/table is unhashable
        raise BindingError(f"init-data algorithm {algorithm!r} is not one of {', '.join(INITDATA_HASHES)}")
    digest = INITDATA_HASHES[algorithm](body.encode()).digest()
    return digest[:HOST_DATA_SIZE].ljust(HOST_DATA_SIZE, b"\0")


def check_host_data(actual: bytes, expected: bytes) -> None:
    if not hmac.compare_digest(actual, expected):
        raise BindingError(f"HOST_DATA {actual.hex()} does not bind init-data (expected {expected.hex()})")
