"""One log line per update request `host-install listen` served: accepted or refused, why, and the outcome.

The line carries the answer's facts only (status, exit code, fwid, digest, reason): never add-on bytes.
`host-install listen` sends these to stderr (journald under host-install-listen@.service).
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("host_install.listen")


def _clip(text: object, n: int = 300) -> str:
    s = str(text).replace("\n", " ")  # a reason quotes guest input: keep it one line, bounded
    return s if len(s) <= n else s[:n] + "…"


def log_answer(answer: dict[str, Any], body_len: int | None) -> None:
    result = answer.get("result") or {}
    parts = [f"fwid {_clip(repr(result['fwid']), 80)}"] if result.get("fwid") else []
    if body_len is not None:
        parts.append(f"{body_len} bytes")
    what = "request" + (f" ({', '.join(parts)})" if parts else "")
    if answer.get("ok"):
        digest = str(result.get("in_force") or "")[:16]
        log.info("%s accepted: %s, firmware in force sha384:%s…, exit 0", what, answer.get("status"), digest)
    elif answer.get("exit_code") == 2:
        log.warning("%s refused: %s (exit 2)", what, _clip(answer.get("error")))
    else:
        log.warning("%s accepted but %s: %s (exit %s)", what, answer.get("status"), _clip(answer.get("error")),
                    answer.get("exit_code"))
