"""The result shape shared by the CLI, the broker and the audit log."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any


class Outcome(enum.Enum):
    PASS = "pass"
    WARN = "warn"      # accepted, but a person should look (e.g. provisional firmware)
    FAIL = "fail"
    SKIP = "skip"      # not checked: the policy or options said "not checked"


@dataclass(frozen=True)
class CheckResult:
    name: str              # stable id: "report.signature", "tcb.snp_min", "policy.debug"
    outcome: Outcome
    message: str           # one line a person can act on
    expected: str | None = None
    actual: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "outcome": self.outcome.value,
            "message": self.message,
            "expected": self.expected,
            "actual": self.actual,
        }


@dataclass(frozen=True)
class Verdict:
    checks: tuple[CheckResult, ...]
    evidence_sha384: str = ""
    policy_id: str = ""
    # Free-form facts the appraisal established (matched firmware, shape, tcb, product...).
    facts: dict[str, Any] = field(default_factory=dict)

    # Computed once per verdict (the checks are an immutable tuple): the broker asks a verdict
    # these several times per request. cached_property writes the instance __dict__ directly,
    # which a frozen dataclass allows.
    @cached_property
    def accepted(self) -> bool:
        # Nothing ran means nothing was shown: not accepted.
        return bool(self.checks) and all(c.outcome is not Outcome.FAIL for c in self.checks)

    @cached_property
    def failures(self) -> tuple[CheckResult, ...]:
        return tuple(c for c in self.checks if c.outcome is Outcome.FAIL)

    @cached_property
    def warnings(self) -> tuple[CheckResult, ...]:
        return tuple(c for c in self.checks if c.outcome is Outcome.WARN)

    def to_dict(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "evidence_sha384": self.evidence_sha384,
            "policy_id": self.policy_id,
            "facts": self.facts,
            "checks": [c.to_dict() for c in self.checks],
        }
