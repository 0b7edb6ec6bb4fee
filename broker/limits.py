"""Bounded JSON input: size (MAX_CONTENT_LENGTH, per route), structure counted on the raw bytes
before parsing, nesting depth, element count."""
from __future__ import annotations

import json
import mmap
import re
from typing import Any, TypeGuard

import orjson
from flask import request
from werkzeug.exceptions import BadRequest, LengthRequired

from verifier.appraise.policy import RESOURCE_PART_RE, TENANT_RE

from .errors import ApiError

MAX_DEPTH = 32
MAX_ITEMS = 32_768  # every value counts: the document, each array element and object member
# Counted on the raw bytes before orjson builds anything (strings included: an over-count). orjson
# has no limit of its own: a 16 MiB body of 5.6 million empty arrays cost 3-4 s of CPU and 480 MiB,
# 8 million integers 250 ms, 8 million escaped quotes 50 ms. Genuine evidence is far below: the
# real Trustee SNP evidence has 1,927 commas, 24 brackets and braces, no backslash; with a full
# certificate chain about 6,000 commas; our add-on rides as one base64 string (about 10 escapes).
MAX_RAW = {b",": 32_768, b"[": 4_096, b"{": 4_096, b"\\": 16_384}
_RAW_NAMES = {b",": "commas", b"[": "'[' characters", b"{": "'{' characters", b"\\": "backslashes"}
_CONTAINERS = {dict, list}
# What brokers before the one-rule change accepted (their `.match` also let a final "\n" in):
# rows under such names stay listable and removable, nothing new is created under them.
LEGACY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\n?")


def _check_shape(obj: Any) -> None:
    # Only containers are walked one by one; scalars are counted by len() (evidence is mostly int arrays).
    if not isinstance(obj, (dict, list)):
        return
    stack: list[tuple[Any, int]] = [(obj, 1)]
    items = 1
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"JSON nested deeper than {MAX_DEPTH}")
        children = list(node.values()) if isinstance(node, dict) else node
        items += len(children)
        if items > MAX_ITEMS:
            raise ValueError(f"more than {MAX_ITEMS} JSON values")
        if isinstance(node, list) and _small_ints(node):
            continue  # evidence is mostly such arrays: nothing nested in them
        # set(map(type, ...)) runs in C: an array of 5000 integers costs microseconds, not a loop.
        if set(map(type, children)) & _CONTAINERS:
            stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


def _small_ints(values: list[Any]) -> bool:
    """True if every element is an integer 0..255 (bytes() checks that in C, several times faster
    than looking at each element's type); a container in the list makes it False."""
    try:
        bytes(values)
    except (TypeError, ValueError):
        return False
    return True


def count_upto(raw: bytes | bytearray | mmap.mmap, byte: bytes, cap: int) -> int:
    """How often byte occurs in raw, counting no further than cap + 1. Each step is a memchr
    (bytes.find), so a body without the byte costs one fast scan and a body full of it at most
    cap + 1 steps; bytes.count would walk every byte at a sixth of that speed."""
    n, at = 0, raw.find(byte)
    while at >= 0 and n <= cap:
        n += 1
        at = raw.find(byte, at + 1)
    return n


def raw_excess(raw: bytes | bytearray | mmap.mmap) -> str | None:
    """Why a body has more structure or escapes than any genuine one, found before parsing; or None."""
    for byte, cap in MAX_RAW.items():
        if count_upto(raw, byte, cap) > cap:
            return f"more than {cap} {_RAW_NAMES[byte]} in the request body"
    return None


Body = bytearray | mmap.mmap
_MAPPED_FROM = 1024 * 1024  # bodies from 1 MiB are read into an anonymous mapping


def read_body() -> Body:
    """The request body, read straight into one buffer of its declared size (werkzeug's get_data
    reads 64 KiB pieces into a growing bytearray and copies it once more: 28 of the 45 ms that a
    16 MiB body cost before). From 1 MiB the buffer is an anonymous mapping, whose pages the kernel
    provides as the bytes arrive: a client that declares 12 MiB and stalls holds what it sent, not
    12 MiB (a zero-filled bytearray is all resident at once). A body without Content-Length
    (chunked) is refused with 411: every chunk costs the server ~3 us of CPU before the body limit
    applies (a 12 MiB body of 1-byte chunks: ~40 s), and werkzeug cuts an over-long chunked body
    at the limit rather than refusing it. Trustee's client and ours send Content-Length."""
    length = request.content_length
    if length is None:
        if "Transfer-Encoding" in request.headers:  # RFC 9112 6.1: chunked is then the framing
            raise LengthRequired("a request body needs a Content-Length (chunked bodies are refused)")
        length = 0  # neither header: no body
    stream = request.stream  # raises 413 past max_content_length, before anything is allocated
    buf: Body = mmap.mmap(-1, length) if length >= _MAPPED_FROM else bytearray(length)
    try:
        with memoryview(buf) as view:
            got = 0
            while got < length:
                n = stream.readinto(view[got:])  # type: ignore[attr-defined]
                if not n:  # less than it said (a client that went away gets werkzeug's own 400 first)
                    raise BadRequest(f"request body ended after {got} of {length} bytes")
                got += n
    except BaseException:
        _release(buf)
        raise
    return buf


def _release(buf: Body) -> None:
    if isinstance(buf, mmap.mmap):
        buf.close()


def json_body(variant: str = "SerdeError", status: int | None = None) -> dict[str, Any]:
    """The request body as a JSON object within the bounds, or an ApiError."""
    raw = read_body()
    try:
        return _parse(raw, variant, status)
    finally:
        _release(raw)


def _parse(raw: Body, variant: str, status: int | None) -> dict[str, Any]:
    excess = raw_excess(raw)
    if excess is not None:
        raise ApiError(variant, excess, status)
    try:
        # orjson: strict RFC 8259 (no NaN, valid UTF-8 only) and ~6x faster than json on the
        # integer arrays of Trustee evidence; its own depth limit (1024) is far above ours.
        with memoryview(raw) as view:
            obj = orjson.loads(view)
        _check_shape(obj)
    except RecursionError:
        raise ApiError(variant, f"JSON nested deeper than {MAX_DEPTH}", status) from None
    except (ValueError, UnicodeDecodeError) as exc:
        if "depth limit" in str(exc):
            raise ApiError(variant, f"JSON nested deeper than {MAX_DEPTH}", status) from None
        raise ApiError(variant, f"request body is not valid JSON: {exc}", status) from None
    if not isinstance(obj, dict):
        raise ApiError(variant, "request body must be a JSON object", status)
    return obj


def json_larger_than(value: Any, limit: int) -> bool:
    """Whether value's JSON text (json.dumps) is longer than limit. The characters of its strings
    and keys are counted first, stopping once they pass the limit: json.dumps would first escape
    all of it (a 12 MiB non-ASCII string: ~90 ms and 40 MiB), and json_body admits at most
    MAX_ITEMS values, so the walk is short. Only a value within the limit is serialized."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, dict):
            total += sum(len(k) for k in v)
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        else:
            total += 1  # a number, true, false, null: at least one character
        if total > limit:
            return True
    return len(json.dumps(value)) > limit


def valid_tenant(value: Any) -> TypeGuard[str]:
    """A tenant name (and a resource path's repository): the policy file's rule, 1-63 of a-z 0-9 _ -,
    starting with a letter or digit, so that every tenant can have a policy file."""
    return isinstance(value, str) and TENANT_RE.fullmatch(value) is not None


def valid_part(value: Any) -> TypeGuard[str]:
    """A resource path's type or tag: the policy file's rule, 1-64 of [A-Za-z0-9._-], starting with
    a letter or digit."""
    return isinstance(value, str) and RESOURCE_PART_RE.fullmatch(value) is not None


def valid_resource(repo: Any, rtype: Any, tag: Any) -> bool:
    return valid_tenant(repo) and valid_part(rtype) and valid_part(tag)


def legacy_name(value: Any) -> TypeGuard[str]:
    """A name an older broker may have stored (see LEGACY_NAME_RE): for listing and removal only."""
    return isinstance(value, str) and LEGACY_NAME_RE.fullmatch(value) is not None
