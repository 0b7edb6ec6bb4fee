"""PolicyStore over a real git repository: commit ids, reload on change, last good kept, firmware uploads."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from sim.platform import SimPlatform
from verifier.appraise.appraise import appraise, release_allowed
from verifier.appraise.store import PolicyStore, UnknownTenant
from verifier.errors import FirmwareError, PolicyErrors
from verifier.evidence import load_evidence
from verifier.firmware.addon import build_addon
from verifier.options import default_options
from verifier.verify import verify_report

from conftest import FIRMWARE_DIR

FW_V1 = FIRMWARE_DIR / "edk2-2025.02-OVMF.fd"
FW_V2 = FIRMWARE_DIR / "edk2-2026.08-OVMF.amdsev.fd"


def sha384(p: Path) -> str:
    return hashlib.sha384(p.read_bytes()).hexdigest()


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "owner", "GIT_AUTHOR_EMAIL": "o@example.invalid",
           "GIT_COMMITTER_NAME": "owner", "GIT_COMMITTER_EMAIL": "o@example.invalid"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=env,
                          text=True).stdout.strip()


def fw_entry(fid: str, path: Path, svn: int, location: str) -> str:
    return f'[[firmware.allowed]]\nid = "{fid}"\nsha384 = "{sha384(path)}"\nsvn = {svn}\nbytes = "{location}"\n'


def policy_text(*entries: str, min_svn: int | None = None, extra: str = "") -> str:
    head = "version = 1\n[firmware]\n" + (f"min_svn = {min_svn}\n" if min_svn is not None else "")
    return (head + "\n".join(entries) + '\n[[shapes]]\nvcpus = [1, 2]\nvcpu_types = ["EPYC-v4"]\n'
            "[platform]\nallow_simulated_platform = true\n"
            '[[secrets]]\npath = "acme/key/disk"\nmin_svn = 2\nunsafe_unbound = true\n' + extra)


def bump(path: Path) -> None:
    # Same-second rewrites keep size and maybe mtime; make each change visible to stat.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def commit_policy(repo: Path, text: str, msg: str) -> str:
    p = repo / "acme.toml"
    p.write_text(text)
    bump(p)
    git(repo, "add", "acme.toml")
    git(repo, "commit", "-q", "-m", msg)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "policies"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    (r / "fw").mkdir()
    shutil.copyfile(FW_V1, (r / "fw" / "v1.fd"))  # must live in the policy tree
    shutil.copyfile(FW_V2, (r / "fw" / "v2.fd"))  # must live in the policy tree
    git(r, "add", "fw")
    git(r, "commit", "-q", "-m", "firmware")
    return r


@pytest.fixture(scope="module")
def sim() -> SimPlatform:
    return SimPlatform("Milan")


def verified_with(sim: SimPlatform, measurement: bytes):  # type: ignore[no-untyped-def]
    report = sim.sign_report(measurement=measurement)
    return verify_report(load_evidence(report), default_options(trust_root=sim.ark, certs=(sim.leaf, sim.intermediate)))


def measurement_of(store: PolicyStore, fid: str) -> bytes:
    for m, match in store.get("acme").table.entries():
        if match.firmware.id == fid and match.shape.vcpus == 2:
            return m
    raise AssertionError(f"no measurement for {fid}")


def test_firmware_upgrade_story(repo: Path, sim: SimPlatform, tmp_path: Path,
                                caplog: pytest.LogCaptureFixture) -> None:
    c1 = commit_policy(repo, policy_text(fw_entry("v1", FW_V1, 1, "fw/v1.fd")), "allow v1")
    store = PolicyStore(repo, cache_dir=tmp_path / "cache", min_interval=0)
    lp = store.get("acme")
    assert lp.commit == c1 and not lp.dirty and lp.policy_id == f"acme@{c1}"
    m1 = measurement_of(store, "v1")
    v1 = verified_with(sim, m1)
    verdict = appraise(v1, lp)
    assert verdict.facts["status"] == "warning"  # simulated platform: allowed, and said so
    assert verdict.accepted and verdict.facts["firmware"]["id"] == "v1" and verdict.facts["firmware"]["svn"] == 1
    assert verdict.facts["policy"]["commit"] == c1 and verdict.policy_id == f"acme@{c1}"
    assert verdict.facts["shape"] == "vcpus=2,vcpu_type=EPYC-v4,vmm=qemu,guest_features=0x1"
    assert release_allowed(lp, verdict, "acme/key/disk") == (False, "firmware svn 1 below minimum 2 for acme/key/disk")

    # Owner commits v2 (svn 2) and a minimum svn of 2.
    c2 = commit_policy(repo, policy_text(fw_entry("v1", FW_V1, 1, "fw/v1.fd"), fw_entry("v2", FW_V2, 2, "fw/v2.fd"),
                                         min_svn=2), "add v2, require svn 2")
    lp2 = store.get("acme")
    assert lp2.commit == c2 and lp2 is not lp
    old = appraise(v1, lp2)
    assert old.facts["status"] == "contraindicated" and not old.accepted
    assert [c.message for c in old.failures] == ["firmware svn 1 below minimum 2"]
    assert old.facts["trust_vector"]["executables"] == 96
    assert release_allowed(lp2, verdict, "acme/key/disk")[0] is False  # an older verdict loses its release too
    v2 = verified_with(sim, measurement_of(store, "v2"))
    new = appraise(v2, lp2)
    assert new.accepted and new.facts["firmware"] == {"id": "v2", "svn": 2, "sha384": sha384(FW_V2)}
    assert new.facts["policy"]["commit"] == c2
    ok, why = release_allowed(lp2, new, "acme/key/disk")   # the secret says unsafe_unbound: released, warned
    assert ok and why.startswith("WARNING unsafe_unbound:") and why.endswith("firmware v2 (svn 2) may receive acme/key/disk")

    # A broken commit: refused, the last good stays in force, the refusal is reported.
    caplog.set_level(logging.WARNING, logger="firmgate.policy")
    c3 = commit_policy(repo, policy_text(fw_entry("v2", FW_V2, 2, "fw/v2.fd"), min_svn='"two"'), "oops")  # type: ignore[arg-type]
    assert c3 != c2
    lp3 = store.get("acme")
    assert lp3.policy.digest == lp2.policy.digest and lp3.commit == c2  # the commit of the policy actually in force
    errs = store.last_errors("acme")
    assert len(errs) == 1 and errs[0].line == 3 and errs[0].why == "must be an integer, not a string"
    assert "refused; keeping acme@" + c2 in caplog.text
    assert appraise(v2, lp3).accepted and not appraise(v1, lp3).accepted
    assert store.status()["acme"]["refused"]

    # Fixed: picked up, errors cleared.
    c4 = commit_policy(repo, policy_text(fw_entry("v2", FW_V2, 2, "fw/v2.fd"), min_svn=2), "drop v1")
    lp4 = store.get("acme")
    assert lp4.commit == c4 and store.last_errors("acme") == []
    gone = appraise(v1, lp4)
    assert [c.name for c in gone.failures] == ["firmware.measurement"]
    assert "matches no allowed firmware x shape (2 reference measurements)" in gone.failures[0].message


def test_dirty_tree_and_commit_only_changes(repo: Path, tmp_path: Path) -> None:
    c1 = commit_policy(repo, policy_text(fw_entry("v2", FW_V2, 2, "uploaded")), "one")
    store = PolicyStore(repo, min_interval=0)
    assert store.get("acme").commit == c1
    p = repo / "acme.toml"
    p.write_text(p.read_text() + "# local edit\n")
    bump(p)
    lp = store.get("acme")
    assert lp.dirty and lp.policy_id.startswith(f"acme@{c1}+dirty:sha256:")
    git(repo, "commit", "-q", "-am", "commit the edit")
    c2 = git(repo, "rev-parse", "HEAD")
    lp2 = store.get("acme")  # same bytes, new commit: the id must follow
    assert lp2.commit == c2 and not lp2.dirty and lp2.policy_id == f"acme@{c2}"


def test_outside_git_and_missing_or_deleted_tenants(tmp_path: Path) -> None:
    d = tmp_path / "plain"
    d.mkdir()
    (d / "acme.toml").write_text(policy_text(fw_entry("v2", FW_V2, 2, "uploaded")))
    (d / "broken.toml").write_text("version = 1\n[firmware\n")
    store = PolicyStore(d, min_interval=0)
    lp = store.get("acme")
    assert lp.commit is None and lp.policy_id == f"acme:sha256:{lp.digest}"
    assert store.tenants() == ["acme"]
    with pytest.raises(PolicyErrors, match="TOML syntax"):
        store.get("broken")
    with pytest.raises(UnknownTenant):
        store.get("nobody")
    (d / "acme.toml").unlink()
    with pytest.raises(UnknownTenant):
        store.get("acme")


def test_refresh_is_rate_limited(tmp_path: Path) -> None:
    d = tmp_path / "p"
    d.mkdir()
    (d / "acme.toml").write_text(policy_text(fw_entry("v2", FW_V2, 2, "uploaded")))
    store = PolicyStore(d, min_interval=3600)
    (d / "acme.toml").write_text(policy_text(fw_entry("v2", FW_V2, 3, "uploaded")))
    bump(d / "acme.toml")
    assert store.get("acme").policy.firmware[0].svn == 2       # within the interval: not re-read
    assert store.refresh(force=True) and store.get("acme").policy.firmware[0].svn == 3


def test_uploaded_firmware_enters_the_table_only_if_allowed(tmp_path: Path, sim: SimPlatform) -> None:
    d = tmp_path / "p"
    d.mkdir()
    (d / "acme.toml").write_text(policy_text(fw_entry("v2", FW_V2, 2, "uploaded"),
                                             fw_entry("v1", FW_V1, 1, "uploaded")).replace(
        "[firmware]\n", '[firmware]\nrevoked = ["v1"]\n'))
    store = PolicyStore(d, cache_dir=tmp_path / "cache", min_interval=0)
    lp = store.get("acme")
    assert len(lp.table) == 0 and set(lp.table.missing) == {"v1", "v2"}
    assert lp.allows_firmware_digest(sha384(FW_V2)) and not lp.allows_firmware_digest(sha384(FW_V1))
    with pytest.raises(FirmwareError, match="not allowed by any tenant"):
        store.add_firmware((FIRMWARE_DIR / "edk2-2022.11-OVMF.fd").read_bytes())
    with pytest.raises(FirmwareError, match="revoked"):
        lp.add_firmware_bytes(FW_V1.read_bytes())
    addon = build_addon([("v2", FW_V2.read_bytes())])
    assert store.add_firmware(addon) == ["acme"]
    assert len(lp.table) == 2 and "v2" not in lp.table.missing
    # A reload keeps firmware that arrived earlier.
    (d / "acme.toml").write_text((d / "acme.toml").read_text() + "# touched\n")
    bump(d / "acme.toml")
    lp2 = store.get("acme")
    assert lp2 is not lp and len(lp2.table) == 2


def test_concurrent_gets_during_reloads(tmp_path: Path) -> None:
    d = tmp_path / "p"
    d.mkdir()
    (d / "acme.toml").write_text(policy_text(fw_entry("v2", FW_V2, 2, "fw.fd")))
    shutil.copyfile(FW_V2, (d / "fw.fd"))  # must live in the policy tree
    store = PolicyStore(d, cache_dir=tmp_path / "cache", min_interval=0)
    errors: list[BaseException] = []
    seen: set[int] = set()

    def reader() -> None:
        try:
            for _ in range(30):
                lp = store.get("acme")
                seen.add(lp.policy.firmware[0].svn)
                assert len(lp.table) == 2
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for svn in (3, 4, 5):
        (d / "acme.toml").write_text(policy_text(fw_entry("v2", FW_V2, svn, "fw.fd")))
        bump(d / "acme.toml")
        store.refresh(force=True)
    for t in threads:
        t.join()
    assert not errors and store.get("acme").policy.firmware[0].svn == 5 and seen <= {2, 3, 4, 5}


def test_new_tenant_file_is_picked_up_and_bad_new_tenant_reported(tmp_path: Path) -> None:
    d = tmp_path / "p"
    d.mkdir()
    (d / "acme.toml").write_text(policy_text(fw_entry("v2", FW_V2, 2, "uploaded")))
    store = PolicyStore(d, min_interval=0)
    assert store.tenants() == ["acme"]
    (d / "globex.toml").write_text(policy_text(fw_entry("v2", FW_V2, 2, "uploaded")).replace("acme/", "globex/"))
    (d / "initech.toml").write_text(policy_text(fw_entry("v2", FW_V2, 2, "uploaded")))  # secret owned by acme
    assert store.tenants() == ["acme", "globex"]
    errs = store.last_errors("initech")
    assert len(errs) == 1 and "is not owned by tenant 'initech'" in errs[0].why
    assert store.status()["initech"]["policy_id"] is None


def test_slow_older_reload_never_replaces_a_newer_one(tmp_path: Path) -> None:
    d = tmp_path / "p"
    d.mkdir()
    f = d / "acme.toml"
    f.write_text(policy_text(fw_entry("v2", FW_V2, 2, "uploaded")))
    store = PolicyStore(d, min_interval=0)
    real_build = store._build
    started, release = threading.Event(), threading.Event()

    def build(path: Path, uploaded: dict[str, bytes]):  # type: ignore[no-untyped-def]
        result = real_build(path, uploaded)
        if result[0] is not None and result[0].firmware[0].svn == 3:
            started.set()
            release.wait(10)   # the svn 3 reload is slow...
        return result
    store._build = build  # type: ignore[method-assign]
    f.write_text(policy_text(fw_entry("v2", FW_V2, 3, "uploaded")))
    bump(f)
    slow = threading.Thread(target=store.refresh, kwargs={"force": True})
    slow.start()
    assert started.wait(10)
    assert store.get("acme", refresh=False).policy.firmware[0].svn == 2   # still in force while svn 3 loads
    f.write_text(policy_text(fw_entry("v2", FW_V2, 4, "uploaded")))      # ...and svn 4 lands meanwhile
    bump(f)
    assert store.get("acme").policy.firmware[0].svn == 4
    release.set()
    slow.join()
    assert store.get("acme").policy.firmware[0].svn == 4


def test_load_for_cli_file_or_directory(repo: Path) -> None:
    from verifier.appraise.store import load_for_cli
    from verifier.errors import UsageError
    c1 = commit_policy(repo, policy_text(fw_entry("v2", FW_V2, 2, "fw/v2.fd")), "one")
    lp = load_for_cli(repo / "acme.toml")
    assert lp.tenant == "acme" and lp.commit == c1 and not lp.dirty and len(lp.table) == 2
    assert load_for_cli(repo, "acme").policy_id == f"acme@{c1}"
    with pytest.raises(UsageError, match="--tenant is needed"):
        load_for_cli(repo)
    with pytest.raises(UsageError, match="is tenant 'acme', not 'globex'"):
        load_for_cli(repo / "acme.toml", "globex")
    (repo / "acme.toml").write_text("version = 1\n[guest]\nsmt = true\n")
    with pytest.raises(PolicyErrors, match=r"acme.toml:3: \[guest.smt\] unknown key 'smt'"):
        load_for_cli(repo / "acme.toml")
