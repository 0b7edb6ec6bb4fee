"""APPRAISE: owners' policy files -> named checks -> Verdict (docs/policy.md).

policy.py     TenantPolicy (frozen) and parse_policy/load_policy with file:line errors
lines.py      the TOML key -> line index behind those errors
check.py      `firmgate policy check`: every error of every file in one run
reference.py  ReferenceTable: allowed firmware x shapes -> expected MEASUREMENT
store.py      PolicyStore / LoadedPolicy: git work tree, reload on change, last good kept
checks.py     one function per rule -> CheckResult
appraise.py   appraise(), release_allowed(), appraise_evidence()
"""
from __future__ import annotations

# No re-exports: `appraise` is both a submodule and its main function, and
# binding the function here would shadow the module (`import verifier.appraise.appraise as m`).
