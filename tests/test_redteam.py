"""Red-team regressions (docs/security.md RT-n): attacks tried over the real interfaces after the
owner-binding, endorsement, console and metrics work, each kept as a test of its fix."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
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


def _endorsement_without_key(key: ec.EllipticCurvePrivateKey, sha384: str) -> bytes:
    """Signed like `sign_endorsement`, without the optional `firmgate-spki` header (another tool's form)."""
    from cbor2 import CBORTag, dumps

    from tests.endorse_helpers import endorsement
    from verifier.endorse import corim
    from verifier.endorse.cose import HDR_CONTENT_TYPE, sign1
    e = endorsement(sha384, eid="rt4-fix")
    meta = {0: {0: e.publisher}, 1: corim._validity(e.not_before, e.not_after)}
    protected = {HDR_CONTENT_TYPE: corim.CONTENT_TYPE, corim.HDR_CORIM_META: dumps(meta)}
    return sign1(key, protected, dumps(CBORTag(corim.TAG_CORIM, corim.corim_map(e))))


def test_rt4_another_tenants_rule_for_the_same_key_does_not_refuse_an_endorsement(tmp_path: Path) -> None:
    """aaa pins the publisher's key by fingerprint, zeta has its key file. An endorsement that does not
    carry the key verifies only with the file: zeta's upload must be kept, not refused by aaa's rule."""
    from tests.endorse_helpers import new_key, pem_public
    from verifier.endorse.cose import key_id
    key = new_key()
    (tmp_path / "pub.pem").write_bytes(pem_public(key))
    secret = '[[secrets]]\npath = "{t}/key/disk"\nunsafe_unbound = true\n'
    shape = '[[shapes]]\nvcpus = [1]\nvcpu_types = ["EPYC-v4"]\n[platform]\nallow_simulated_platform = true\n'
    for tenant, ref in (("aaa", f'key_sha256 = "{key_id(key.public_key()).hex()}"'), ("zeta", 'key = "pub.pem"')):
        (tmp_path / f"{tenant}.toml").write_text(
            f'version = 1\n[firmware]\n[[firmware.publishers]]\nname = "{tenant}-secret-name"\n{ref}\n'
            f'fwid = "edk2-*"\nenforces_boot_chain = "the tests say so"\n{shape}' + secret.format(t=tenant))
    store = PolicyStore(tmp_path, min_interval=0)
    assert sorted(store.tenants()) == ["aaa", "zeta"], [e.diagnostics() for t in ("aaa", "zeta")
                                                         for e in store.last_errors(t)]
    blob = _endorsement_without_key(key, "ab" * 48)
    assert store.add_endorsement(blob) == "rt4-fix"


@pytest.mark.parametrize("in_git", [True, False])
def test_rt5_a_new_revocation_list_takes_effect_without_a_policy_edit(tmp_path: Path, firmware_dir: Path,
                                                                      in_git: bool) -> None:
    """The publisher revokes a build; the owner commits the new signed list beside the key, as
    docs/endorsements.md says, leaving <tenant>.toml alone. The build must stop being admitted (a
    release re-checks the admission with `recheck`), in a git tree and outside one."""
    from test_endorse_policy import FW, policy_text, publisher

    from tests.endorse_helpers import new_key, pem_public, signed
    from verifier.endorse.admit import recheck
    from verifier.endorse.corim import Revocations, sign_revocations
    d = tmp_path / "policies"
    d.mkdir()
    key = new_key()
    (d / "acme.pem").write_bytes(pem_public(key))
    rev = d / "acme.revoked"
    rev.write_bytes(sign_revocations(Revocations("acme", 1, frozenset(), frozenset()), key))
    (d / "acme.toml").write_text(policy_text(publisher(extra='revocations = "acme.revoked"\n'
                                                       'enforces_boot_chain = "the tests say so"\n')))
    if in_git:
        git(d, "init", "-q", "-b", "main")
        git(d, "add", "-A")
        git(d, "commit", "-q", "-m", "trust acme's publisher")
    store = PolicyStore(d, min_interval=0)
    image = (firmware_dir / FW).read_bytes()
    digest = hashlib.sha384(image).hexdigest()
    assert store.add_firmware(image, endorsements=(signed(key, digest, eid="acme-fix-3"),)) == ["acme"]
    before = store.get("acme")
    admitted = before.table.endorsed(digest)
    assert admitted is not None and recheck(before.policy.publishers, admitted[1]) is None
    rev.write_bytes(sign_revocations(Revocations("acme", 2, frozenset({"acme-fix-3"}), frozenset()), key))
    bump(rev)
    if in_git:
        git(d, "commit", "-q", "-am", "acme revoked acme-fix-3")
    after = store.get("acme")
    # In git the verdicts name the new commit; outside git the id follows <tenant>.toml only, and a
    # cached verdict's release re-checks the admission under the reloaded publishers.
    assert (after.policy_id != before.policy_id) == in_git
    still = after.table.endorsed(digest)
    why = "not admitted" if still is None else recheck(after.policy.publishers, still[1])
    assert why is not None, "a revoked build is still admitted"


def test_rt6_a_fifo_given_as_a_file_is_refused_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`firmgate idblock verify`, `endorse verify --key` (and every reader through read_bounded), and the
    ID-block set `host-install listen` reads for an install: a FIFO blocked the open for ever."""
    import os
    import threading

    from verifier.cli import main
    from verifier.idblock import IdBlockFormatError
    from verifier.idblockset import load_set
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "e.cose").write_bytes(b"\xd2\x84\x40\xa0\x40\x40")
    results: list[object] = []

    def run() -> None:
        results.append(main(["idblock", "verify", str(fifo)]))
        results.append(main(["endorse", "verify", "--key", str(fifo), str(tmp_path / "e.cose")]))
        try:
            load_set(fifo)
        except IdBlockFormatError as exc:
            results.append(exc.diagnostics())
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "a FIFO blocked the reader"
    assert results[:2] == [2, 2] and "not a regular file" in str(results[2]), results
    assert "not a regular file" in capsys.readouterr().err
