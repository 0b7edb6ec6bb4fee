"""Strict CBOR decoding for endorsements and revocation lists (hostile input).

cbor2 turns some tags into Python objects (1 -> datetime, 37 -> UUID, 28/29 ->
shared, possibly cyclic, references, 2/3 -> big integers). An endorsement must
mean exactly what its bytes say, so every such tag stays a plain `CBORTag`, and
the schema readers in corim.py accept only the tags they expect. Also refused:
duplicate map keys (two readers could pick different values), indefinite lengths
(not deterministic encoding, RFC 8949 4.2.1), nesting deeper than MAX_DEPTH, and
any input above the caller's size bound.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import cbor2

from ..errors import EvidenceError

MAX_DEPTH = 16
# Tags cbor2 decodes by itself (its semantic decoders); each is kept raw instead.
_BUILTIN_TAGS = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 100, 256, 258, 260, 261, 1004, 55799)
_RAW = {t: (lambda v, _imm, t=t: cbor2.CBORTag(t, v)) for t in _BUILTIN_TAGS}


class EndorsementFormatError(EvidenceError):
    """The bytes are not a well-formed endorsement / revocation list (exit 2: bad input)."""


def loads(data: bytes, what: str, limit: int) -> Any:
    """One CBOR item, the whole of `data`, decoded strictly; EndorsementFormatError otherwise."""
    if not isinstance(data, (bytes, bytearray)):
        raise EndorsementFormatError(f"{what} must be a byte string, not {type(data).__name__}")
    if len(data) > limit:
        raise EndorsementFormatError(f"{what} is {len(data)} bytes; at most {limit}")
    if not data:
        raise EndorsementFormatError(f"{what} is empty")
    try:
        import io
        fp = io.BytesIO(bytes(data))
        item = cbor2.CBORDecoder(fp, semantic_decoders=_RAW, max_depth=MAX_DEPTH, allow_indefinite=False,
                                 allow_duplicate_keys=False).decode()
        if fp.tell() != len(data):
            raise EndorsementFormatError(f"{what}: {len(data) - fp.tell()} bytes after the CBOR item")
    except EndorsementFormatError:
        raise
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError, MemoryError, KeyError) as exc:
        raise EndorsementFormatError(f"{what} is not valid CBOR: {type(exc).__name__}: {str(exc)[:120]}") from None
    return _thaw(item)


def _thaw(v: Any) -> Any:
    """cbor2 decodes inside a tag immutably (tuple, frozendict): one shape (list, dict) for the readers.
    Map keys stay as decoded (never a container in our schemas; a reader refuses them as unknown)."""
    if isinstance(v, (list, tuple)):
        return [_thaw(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _thaw(x) for k, x in v.items()}
    if isinstance(v, cbor2.CBORTag):
        return cbor2.CBORTag(v.tag, _thaw(v.value))
    return v


def dumps(item: Any) -> bytes:
    """Deterministic encoding (RFC 8949 4.2.1: shortest forms, sorted map keys)."""
    return cbor2.dumps(item, canonical=True)
