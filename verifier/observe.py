"""Operational events from the verifier's edges, for whoever counts them (the broker's metrics).

The verifier is a library and imports nothing of the broker: where it does I/O
or slow work (policy reloads, AMD KDS, measurement tables) it calls `emit`, and
a listener registered with `subscribe` turns that into metrics. No listener: a
no-op. Listeners must be fast and must not raise (an exception is swallowed and
logged once: counting must never change a decision).

Events (name, value, labels):
- ``policy_reload`` 1, tenant, result = loaded | refused; fallback = yes when a refused
  file leaves an earlier good version in force (the "last good" rule), else no
- ``kds_request`` 1, kind = vcek | chain | crl, source = cache | network | error
- ``measurement_table`` seconds, to measure one firmware for every shape of a policy
"""
from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

Listener = Callable[[str, float, dict[str, str]], None]
_listeners: list[Listener] = []
_warned = False


def subscribe(listener: Listener) -> None:
    """Add `listener` (once: subscribing the same function again is a no-op)."""
    if listener not in _listeners:
        _listeners.append(listener)


def unsubscribe(listener: Listener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def emit(name: str, value: float = 1.0, **labels: str) -> None:
    global _warned
    for listener in tuple(_listeners):
        try:
            listener(name, value, labels)
        except Exception:
            if not _warned:
                _warned = True
                log.exception("observer %r failed on %s", listener, name)
