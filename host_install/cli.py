"""`host-install` (and `firmgate host-install`); filled in by the host-install issue."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence


def register(sub: "argparse._SubParsersAction[Any]") -> None:
    """Add `firmgate host-install ...` (none yet)."""


def main(argv: Sequence[str] | None = None) -> int:
    print("host-install: not built yet", file=sys.stderr)
    return 2
