"""Simulated SEV-SNP platform for the demo and the tests. Its root is trusted only when configured explicitly.

`sim.platform.SimPlatform` makes an ARK/ASK(ASVK)/VCEK(VLEK)-like chain with AMD's
algorithms and extensions and signs reports with any field set; `SimFetcher` plays
AMD KDS; `make_crl` issues an ARK-signed CRL. Nothing here is imported by `verifier`.
"""
from __future__ import annotations

from typing import Any

_EXPORTS = {"SimPlatform", "SimFetcher", "Tcb", "make_crl"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:   # lazy: `firmgate` startup imports sim.demo, not the key machinery
    if name in _EXPORTS:
        from . import platform
        return getattr(platform, name)
    raise AttributeError(f"module 'sim' has no attribute {name!r}")
