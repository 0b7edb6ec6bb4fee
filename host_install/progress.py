"""Progress lines on stderr for steps an operator would otherwise wait on in silence.

A step says nothing when it ends within a second; a slower one announces itself once the second has
passed and reports how it ended and how long it took. The CLI turns this on (`enable()`); library
callers (tests, the demo) stay quiet.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

ANNOUNCE_AFTER = 1.0  # seconds
_sink: TextIO | None = None


def enable(stream: TextIO | None = None) -> None:
    global _sink
    _sink = stream if stream is not None else sys.stderr


def disable() -> None:
    global _sink
    _sink = None


def say(line: str) -> None:
    sink = _sink
    if sink is not None:
        try:
            print(f"host-install: {line}", file=sink, flush=True)
        except (OSError, ValueError):
            pass  # a closed or broken stderr must not fail an install


@dataclass
class Step:
    what: str
    outcome: str = "done"


@contextlib.contextmanager
def step(what: str, after: float = ANNOUNCE_AFTER) -> Iterator[Step]:
    """`with step("stopping QEMU") as s: ...; s.outcome = how`."""
    s = Step(what)
    if _sink is None:
        yield s
        return
    start = time.monotonic()
    announced = threading.Event()

    def announce() -> None:
        say(f"{what} ...")
        announced.set()

    timer = threading.Timer(after, announce)
    timer.daemon = True
    timer.start()
    failed = True
    try:
        yield s
        failed = False
    finally:
        timer.cancel()
        timer.join()
        if announced.is_set():
            say(f"{what}: {'failed' if failed else s.outcome} ({time.monotonic() - start:.1f} s)")
