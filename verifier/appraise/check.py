"""`firmgate policy check`: every error in every policy file, in one run (for the owner's CI)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PolicyFileError
from .policy import TenantPolicy, load_policy_file


@dataclass
class CheckReport:
    policies: list[TenantPolicy] = field(default_factory=list)
    errors: list[PolicyFileError] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and bool(self.files)


def policy_files(paths: list[str | Path]) -> tuple[list[Path], list[PolicyFileError]]:
    """Files named directly, and the *.toml files (recursively) of directories named."""
    files: list[Path] = []
    errors: list[PolicyFileError] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*.toml") if q.is_file() and ".git" not in q.parts)
            if not found:
                errors.append(PolicyFileError(str(p), None, None, "directory holds no *.toml policy file"))
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            errors.append(PolicyFileError(str(p), None, None, "no such file or directory"))
    return files, errors


def check_paths(paths: list[str | Path], *, check_files: bool = True) -> CheckReport:
    report = CheckReport()
    files, report.errors = policy_files(paths)
    seen: dict[str, str] = {}
    for f in files:
        report.files.append(str(f))
        policy, errors = load_policy_file(f, check_files=check_files)
        report.errors.extend(errors)
        if policy is not None:
            if policy.tenant in seen:
                report.errors.append(PolicyFileError(str(f), None, None,
                                                     f"tenant {policy.tenant!r} is also defined by {seen[policy.tenant]}"))
                continue
            seen[policy.tenant] = str(f)
            report.policies.append(policy)
    return report
