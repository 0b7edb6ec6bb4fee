"""Shared fixtures. Real evidence and firmware are read from ../shared, never copied."""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Generator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FIRMGATE_SHARED", REPO.parent / "shared"))
SNP_VECTORS = SHARED / "vectors" / "snp"
KBS_VECTORS = SHARED / "vectors" / "kbs"
FIRMWARE_DIR = SHARED / "firmware"
# What the suite reads from ../shared; without them every test would fail on its own FileNotFoundError.
REQUIRED_SHARED = (SNP_VECTORS, KBS_VECTORS, FIRMWARE_DIR)


def pytest_configure(config: pytest.Config) -> None:
    missing = [str(p) for p in REQUIRED_SHARED if not p.is_dir()]
    if missing:
        raise pytest.UsageError(
            f"the test data directory is missing: {', '.join(missing)} (the tests read real SNP reports, "
            "KBS evidence and OVMF builds from ../shared beside the checkout; put it there or set "
            "FIRMGATE_SHARED=/path/to/shared)")


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    reason = reason.removeprefix("Skipped: ")
    if reason == "FIRMGATE_TEST_PG_URL not set" and os.environ.get("FIRMGATE_TEST_PG_SKIP"):
        reason += f" ({os.environ['FIRMGATE_TEST_PG_SKIP']})"  # why `make test` could not start one
    return reason


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> Generator[None]:
    """End the run with one line saying what was skipped and why (pytest's -ra would list every test)."""
    result = yield
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if (reporter is not None and not hasattr(session.config, "workerinput")  # the xdist controller only
            and not session.config.option.collectonly):
        skipped = [r for r in reporter.stats.get("skipped", []) if isinstance(r, pytest.TestReport)]
        if skipped:
            counts = Counter(_skip_reason(r) for r in skipped)
            why = "; ".join(f"{n} x {reason}" for reason, n in counts.most_common())
            reporter.write_line(f"SKIPPED {len(skipped)} tests: {why}", yellow=True)
        else:
            reporter.write_line("SKIPPED none: every collected test ran")
    return result


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
