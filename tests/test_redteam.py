"""Red-team regressions (docs/security.md RT-n): attacks tried over the real interfaces after the
owner-binding, endorsement, console and metrics work, each kept as a test of its fix."""
from __future__ import annotations

from pathlib import Path

import pytest
from test_policy_store import FW_V2, bump, fw_entry, git, policy_text

from verifier.appraise.store import PolicyStore


@pytest.mark.parametrize("ignore", ["*.toml", "policies/"])
def test_rt2_git_ignored_policy_edit_changes_the_policy_id(tmp_path: Path, ignore: str) -> None:
    """The broker caches each session's verdict under the policy_id; an edit the id does not show
    would let a verdict of the old policy (say, before a compromised author key was dropped) keep
    releasing secrets. A policy file git ignores never shows in `git status`: it must count as dirty."""
    git(tmp_path, "init", "-q", "-b", "main")
    (tmp_path / ".gitignore").write_text(ignore + "\n")
    git(tmp_path, "add", ".gitignore")
    git(tmp_path, "commit", "-q", "-m", "ignore the policies")
    repo = tmp_path / "policies"
    repo.mkdir()
    (repo / "v2.fd").write_bytes(FW_V2.read_bytes())
    p = repo / "acme.toml"
    p.write_text(policy_text(fw_entry("v2", FW_V2, 2, "v2.fd")))
    store = PolicyStore(repo, min_interval=0)
    before = store.get("acme")
    assert before.dirty and before.policy_id.endswith(f":sha256:{before.digest}")
    p.write_text(policy_text(fw_entry("v2", FW_V2, 2, "v2.fd"), min_svn=2))
    bump(p)
    after = store.get("acme")
    assert after.digest != before.digest
    assert after.policy_id != before.policy_id
