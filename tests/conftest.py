"""Shared fixtures. Real evidence and firmware are read from ../shared, never copied."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FIRMGATE_SHARED", REPO.parent / "shared"))
SNP_VECTORS = SHARED / "vectors" / "snp"
KBS_VECTORS = SHARED / "vectors" / "kbs"
FIRMWARE_DIR = SHARED / "firmware"


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"../shared is missing (looked in {SHARED}); set FIRMGATE_SHARED")
    return SHARED


@pytest.fixture(scope="session")
def snp_vectors(shared: Path) -> Path:
    return shared / "vectors" / "snp"


@pytest.fixture(scope="session")
def firmware_dir(shared: Path) -> Path:
    return shared / "firmware"


# CI (CI=true) runs every hypothesis test derandomized, so a landing is judged on the same
# inputs each time; developers' runs stay random and keep exploring (`make fuzz` goes further).
from hypothesis import settings as _hyp_settings  # noqa: E402

_hyp_settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI") == "true":
    _hyp_settings.load_profile("ci")
