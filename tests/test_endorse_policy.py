"""[[firmware.publishers]]: parsing (file:line errors), admission into the reference table with the
MEASUREMENT recomputed from real firmware bytes, the verdict naming publisher and endorsement, release
re-checking the admission, and `firmgate verify --endorsement` / `policy check` / `policy export` on the CLI."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import time
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sim.demo import derive
from sim.platform import SimPlatform
from tests.endorse_helpers import new_key, pem_private, pem_public, schema, signed
from verifier.appraise.policy import parse_policy
from verifier.appraise.store import load_for_cli
from verifier.cli import main
from verifier.endorse.admit import EndorsementRefused
from verifier.endorse.corim import Revocations, sign_revocations
from verifier.endorse.cose import key_id
from verifier.firmware.addon import build_addon
from verifier.measure.launch import Shape, measurement_table

FW = "edk2-2022.11-OVMF.fd"     # 2 MiB with SEV metadata: the quickest real image to measure
SHAPE = Shape(vcpus=1, vcpu_type="EPYC-v4")


UNBOUND_SECRET = '[[secrets]]\npath = "acme/key/disk"\nunsafe_unbound = true   # tests: no ID block / kernel hashes\n'


def policy_text(publishers: str, *, allowed: str = "", secrets: str = UNBOUND_SECRET) -> str:
    return f'''version = 1
[firmware]
min_svn = 1
{allowed}
{publishers}

[[shapes]]
vmm = "qemu"
vcpus = [1]
vcpu_types = ["EPYC-v4"]

[platform]
products = ["Milan"]
signers = ["VCEK"]
allow_simulated_platform = true

{secrets}
'''


def publisher(key_file: str = "acme.pem", *, fwid: str = "edk2-*-acme.*", extra: str = "") -> str:
    return f'[[firmware.publishers]]\nname = "acme"\nkey = "{key_file}"\nfwid = "{fwid}"\nmin_svn = 2\n{extra}'


@pytest.fixture(scope="module")
def image(firmware_dir: Path) -> bytes:
    return (firmware_dir / FW).read_bytes()


@pytest.fixture(scope="module")
def measured(image: bytes) -> bytes:
    return measurement_table(image, [SHAPE])[SHAPE]


@pytest.fixture()
def pdir(tmp_path: Path) -> tuple[Path, ec.EllipticCurvePrivateKey]:
    key = new_key()
    (tmp_path / "acme.pem").write_bytes(pem_public(key))
    (tmp_path / "acme.key").write_bytes(pem_private(key))
    return tmp_path, key


# -- parsing ---------------------------------------------------------------------------------------------
def test_publishers_only_policy_parses(pdir: tuple[Path, ec.EllipticCurvePrivateKey]) -> None:
    d, key = pdir
    policy, errors = parse_policy(policy_text(publisher()), d / "acme.toml")
    assert errors == [] and policy is not None
    (p,) = policy.publishers
    assert (p.name, p.fwid_pattern, p.min_svn, p.key_sha256) == ("acme", "edk2-*-acme.*", 2,
                                                                  key_id(key.public_key()).hex())


@pytest.mark.parametrize("entry,line,why", [
    ('[[firmware.publishers]]\nname = "acme"\nkey = "acme.pem"\n', 5, "missing 'fwid'"),
    ('[[firmware.publishers]]\nname = "acme"\nfwid = "x*"\n', 5, "exactly one of 'key'"),
    ('[[firmware.publishers]]\nname = "acme"\nfwid = "x*"\nkey_sha256 = "12"\n', 8, "64 hex digits"),
    ('[[firmware.publishers]]\nname = "acme"\nfwid = "a b"\nkey = "acme.pem"\n', 7, "fwid pattern"),
    ('[[firmware.publishers]]\nname = "acme"\nfwid = "x*"\nkey = "../acme.pem"\n', 8, "inside the policy"),
    ('[[firmware.publishers]]\nname = "acme"\nfwid = "x*"\nkey = "nope.pem"\n', 8, "cannot read"),
    ('[[firmware.publishers]]\nname = "acme"\nfwid = "x*"\nkey = "acme.pem"\nexpires = 2027-01-01T00:00:00\n',
     9, "offset"),
    ('[[firmware.publishers]]\nname = "acme"\nfwid = "x*"\nkey_sha256 = "' + "ab" * 32 + '"\nrevocations = "r"\n',
     9, "needs|'key'"),
    ('[[firmware.publishers]]\nname = "acme"\nfwid = "x*"\nkey = "acme.pem"\nbogus = 1\n', 9, "unknown key"),
])
def test_publisher_errors_name_file_and_line(pdir: tuple[Path, ec.EllipticCurvePrivateKey], entry: str, line: int,
                                             why: str) -> None:
    d, _ = pdir
    policy, errors = parse_policy(policy_text(entry), d / "acme.toml")
    assert policy is None
    assert any(e.line == line and re.search(why, e.why) for e in errors), \
        [(e.line, e.why) for e in errors]


def test_secrets_for_publisher_builds_need_a_pinned_boot_chain(pdir: tuple[Path, ec.EllipticCurvePrivateKey]
                                                               ) -> None:
    """Release binding: a publisher's build in a shape without kernel hashes pins nothing unless the owner
    says the publisher's builds enforce the boot chain (the owner is named here by a literal HOST_DATA)."""
    d, _ = pdir
    text = policy_text(publisher(), secrets='[[secrets]]\npath = "acme/key/disk"\n').replace(
        "allow_simulated_platform = true", 'allow_simulated_platform = true\nhost_data = "' + "ab" * 32 + '"')
    _, errors = parse_policy(text, d / "acme.toml")
    assert any("publisher(s) acme in a shape without kernel hashes" in e.why for e in errors), errors
    bound = text.replace('min_svn = 2\n', 'min_svn = 2\nenforces_boot_chain = "acme builds boot only signed UKIs"\n', 1)
    policy, errors = parse_policy(bound, d / "acme.toml")
    assert errors == [] and policy is not None
    assert policy.publishers[0].enforces_boot_chain == "acme builds boot only signed UKIs"


def test_revocation_list_must_verify_with_the_publisher_key(pdir: tuple[Path, ec.EllipticCurvePrivateKey]) -> None:
    d, key = pdir
    (d / "rev.cose").write_bytes(sign_revocations(Revocations("acme", 1, frozenset({"x"}), frozenset()), new_key()))
    _, errors = parse_policy(policy_text(publisher(extra='revocations = "rev.cose"\n')), d / "acme.toml")
    assert any("signed by another key" in e.why for e in errors)
    (d / "rev.cose").write_bytes(sign_revocations(Revocations("acme", 1, frozenset({"x"}), frozenset()), key))
    policy, errors = parse_policy(policy_text(publisher(extra='revocations = "rev.cose"\n')), d / "acme.toml")
    assert errors == [] and policy is not None and policy.publishers[0].revocations is not None


def test_policy_check_cli_accepts_publishers(pdir: tuple[Path, ec.EllipticCurvePrivateKey]) -> None:
    d, _ = pdir
    (d / "acme.toml").write_text(policy_text(publisher()))
    assert main(["policy", "check", str(d / "acme.toml")]) == 0
    (d / "acme.toml").write_text(policy_text('[[firmware.publishers]]\nname = "acme"\n'))
    assert main(["policy", "check", str(d / "acme.toml")]) == 1


# -- admission into the reference table (real firmware, measurement recomputed) ---------------------------
def _loaded(d: Path, text: str):  # type: ignore[no-untyped-def]
    (d / "acme.toml").write_text(text)
    return load_for_cli(d / "acme.toml")


def test_endorsed_build_gets_its_measurement_recomputed(pdir: tuple[Path, ec.EllipticCurvePrivateKey], image: bytes,
                                                        measured: bytes) -> None:
    d, key = pdir
    loaded = _loaded(d, policy_text(publisher()))
    digest = hashlib.sha384(image).hexdigest()
    assert loaded.table.lookup(measured) is None
    adm = loaded.table.add_endorsed(image, (signed(key, digest, fwid="edk2-2022.11-acme.1", svn=2),))
    match = loaded.table.lookup(measured)
    assert match is not None and match.firmware.id == "edk2-2022.11-acme.1" and match.firmware.svn == 2
    assert loaded.table.endorsed(digest) == (match.firmware, adm)


def test_endorsement_claiming_a_wrong_measurement_is_refused(pdir: tuple[Path, ec.EllipticCurvePrivateKey],
                                                             image: bytes) -> None:
    d, key = pdir
    loaded = _loaded(d, policy_text(publisher()))
    digest = hashlib.sha384(image).hexdigest()
    lie = signed(key, digest, fwid="edk2-2022.11-acme.1", measurements=((SHAPE.key(), b"\x00" * 48),))
    with pytest.raises(EndorsementRefused, match="recomputed from the bytes"):
        loaded.table.add_endorsed(image, (lie,))
    assert len(loaded.table) == 0


def test_endorsed_fwid_may_not_shadow_a_listed_build(pdir: tuple[Path, ec.EllipticCurvePrivateKey],
                                                     image: bytes) -> None:
    d, key = pdir
    other = "cd" * 48
    allowed = f'[[firmware.allowed]]\nid = "edk2-2022.11-acme.1"\nsha384 = "{other}"\nsvn = 1\nbytes = "uploaded"\n'
    loaded = _loaded(d, policy_text(publisher(), allowed=allowed))
    with pytest.raises(EndorsementRefused, match="lists fwid edk2-2022.11-acme.1 with another digest"):
        loaded.table.add_endorsed(image, (signed(key, hashlib.sha384(image).hexdigest(), fwid="edk2-2022.11-acme.1"),))


# -- the CLI: verify with --firmware --endorsement against a simulated report; export --------------------------
@pytest.fixture()
def sim_case(pdir: tuple[Path, ec.EllipticCurvePrivateKey], image: bytes, measured: bytes
             ) -> tuple[Path, ec.EllipticCurvePrivateKey, list[str]]:
    d, key = pdir
    platform = SimPlatform("Milan", "VCEK")
    (d / "report.bin").write_bytes(platform.sign_report(measurement=measured))
    (d / "table.bin").write_bytes(platform.cert_table())
    (d / "ark.pem").write_bytes(platform.root_pem())
    (d / "fw.bin").write_bytes(image)
    (d / "acme.toml").write_text(policy_text(publisher()))
    args = [str(d / "report.bin"), "--cert-table", str(d / "table.bin"), "--trust-root", str(d / "ark.pem"),
            "--product", "Milan", "--policy", str(d / "acme.toml"), "--tenant", "acme", "--firmware", str(d / "fw.bin"),
            "--json"]
    return d, key, args


def test_cli_verify_accepts_an_endorsed_build_and_names_publisher_and_endorsement(
        sim_case: tuple[Path, ec.EllipticCurvePrivateKey, list[str]], image: bytes,
        capsys: pytest.CaptureFixture[str]) -> None:
    d, key, args = sim_case
    (d / "e.cose").write_bytes(signed(key, hashlib.sha384(image).hexdigest(), fwid="edk2-2022.11-acme.1", svn=2,
                                      eid="acme-fix-1"))
    code = main(["verify", *args, "--endorsement", str(d / "e.cose")])
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out
    checks = {c["name"]: c for c in out["checks"]}
    assert checks["firmware.endorsement"]["outcome"] == "pass"
    assert "publisher acme" in checks["firmware.endorsement"]["message"]
    assert out["facts"]["endorsement"]["endorsement"] == "acme-fix-1"
    assert out["facts"]["firmware"]["id"] == "edk2-2022.11-acme.1"


def test_cli_verify_denies_untrusted_and_low_svn_by_name(sim_case: tuple[Path, ec.EllipticCurvePrivateKey, list[str]],
                                                         image: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    d, key, args = sim_case
    digest = hashlib.sha384(image).hexdigest()
    (d / "e.cose").write_bytes(signed(new_key(), digest, fwid="edk2-2022.11-acme.1", svn=2))
    assert main(["verify", *args, "--endorsement", str(d / "e.cose")]) == 1
    assert "no trusted publisher" in capsys.readouterr().err
    (d / "e.cose").write_bytes(signed(key, digest, fwid="edk2-2022.11-acme.1", svn=1, eid="acme-old"))
    assert main(["verify", *args, "--endorsement", str(d / "e.cose")]) == 1
    assert "endorsement acme-old" in capsys.readouterr().err
    # No endorsement at all: the unlisted firmware is refused, naming why.
    assert main(["verify", *args]) == 1
    assert "came with no endorsement" in capsys.readouterr().err


def test_cli_verify_judges_the_endorsement_at_the_time_given(
        sim_case: tuple[Path, ec.EllipticCurvePrivateKey, list[str]], image: bytes,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`--at` moves the endorsement's validity with the certificates': evidence from three weeks ago
    verifies against the endorsement valid then, and not today, when it has expired; an endorsement
    valid only from tomorrow does not admit today's evidence."""
    d, key, args = sim_case
    digest, now, day = hashlib.sha384(image).hexdigest(), int(time.time()), 86400
    (d / "e.cose").write_bytes(signed(key, digest, fwid="edk2-2022.11-acme.1", svn=2, eid="acme-last-month",
                                      valid=(now - 30 * day, now - 10 * day)))
    then = dt.datetime.fromtimestamp(now - 20 * day, dt.UTC).isoformat()
    assert main(["verify", *args, "--endorsement", str(d / "e.cose"), "--at", then]) == 0, capsys.readouterr()
    out = json.loads(capsys.readouterr().out)
    assert out["facts"]["endorsement"]["endorsement"] == "acme-last-month"
    assert main(["verify", *args, "--endorsement", str(d / "e.cose")]) == 1
    assert "expired at" in capsys.readouterr().err
    (d / "e.cose").write_bytes(signed(key, digest, fwid="edk2-2022.11-acme.1", svn=2, eid="acme-tomorrow",
                                      valid=(now + day, now + 10 * day)))
    assert main(["verify", *args, "--endorsement", str(d / "e.cose")]) == 1
    assert "acme-tomorrow" in capsys.readouterr().err
    later = dt.datetime.fromtimestamp(now + 2 * day, dt.UTC).isoformat()
    assert main(["verify", *args, "--endorsement", str(d / "e.cose"), "--at", later]) == 0


def test_appraise_rechecks_an_admitted_endorsement_at_the_time_given(
        pdir: tuple[Path, ec.EllipticCurvePrivateKey], image: bytes, measured: bytes) -> None:
    """An endorsement admitted while valid fails firmware.endorsement when appraised at a time past
    its end (the broker's case: a build admitted yesterday, appraised after the endorsement expired)."""
    from test_appraise_rules import verified

    from verifier.appraise.appraise import appraise
    d, key = pdir
    loaded = _loaded(d, policy_text(publisher()))
    now, day = int(time.time()), 86400
    loaded.table.add_endorsed(image, (signed(key, hashlib.sha384(image).hexdigest(), fwid="edk2-2022.11-acme.1",
                                             valid=(now - day, now + day)),))
    report = verified(measured)
    checks = {c.name: c for c in appraise(report, loaded).checks}
    assert checks["firmware.endorsement"].outcome.value == "pass"
    checks = {c.name: c for c in appraise(report, loaded, now=now + 2 * day).checks}
    assert checks["firmware.endorsement"].outcome.value == "fail"
    assert "expired at" in checks["firmware.endorsement"].message


def test_appraise_evidence_judges_endorsements_at_the_options_time(
        pdir: tuple[Path, ec.EllipticCurvePrivateKey], image: bytes, measured: bytes) -> None:
    """The library entry point too: VerifyOptions.now moves the endorsement's validity with the
    certificates' (found by the review of the --at change: it passed no time to appraise)."""
    from test_appraise_rules import BASE_POLICY, sim

    from verifier.appraise.appraise import appraise_evidence
    from verifier.options import default_options
    d, key = pdir
    loaded = _loaded(d, policy_text(publisher()))
    now, day = int(time.time()), 86400
    end = signed(key, hashlib.sha384(image).hexdigest(), fwid="edk2-2022.11-acme.1", svn=2,
                 valid=(now - 30 * day, now - 10 * day))
    s = sim()
    report = s.sign_report(measurement=measured, policy=BASE_POLICY)
    opts = default_options(now=dt.datetime.fromtimestamp(now - 20 * day, dt.UTC), trust_root=s.ark,
                           certs=(s.leaf, s.intermediate))
    checks = {c.name: c for c in appraise_evidence(report, opts, loaded, firmware=image, endorsements=(end,)).checks}
    assert checks["firmware.supplied"].outcome.value == "pass", checks["firmware.supplied"].message
    assert checks["firmware.endorsement"].outcome.value == "pass"


def test_endorsement_inside_the_addon(sim_case: tuple[Path, ec.EllipticCurvePrivateKey, list[str]], image: bytes,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    d, key, args = sim_case
    (d / "e.cose").write_bytes(signed(key, hashlib.sha384(image).hexdigest(), fwid="edk2-2022.11-acme.1", svn=2))
    assert main(["addon", "build", "--firmware", str(d / "fw.bin"), "--fwid", "edk2-2022.11-acme.1",
                 "--endorsement", str(d / "e.cose"), "-o", str(d / "fw.efi")]) == 0
    capsys.readouterr()
    args[args.index(str(d / "fw.bin"))] = str(d / "fw.efi")
    assert main(["verify", *args]) == 0
    assert json.loads(capsys.readouterr().out)["facts"]["endorsement"]["publisher"] == "acme"
    # The builder refuses an endorsement of other bytes.
    (d / "other.cose").write_bytes(signed(key, "ab" * 48, fwid="edk2-2022.11-acme.1"))
    assert main(["addon", "build", "--firmware", str(d / "fw.bin"), "--fwid", "edk2-2022.11-acme.1",
                 "--endorsement", str(d / "other.cose"), "-o", str(d / "x.efi")]) == 2


def test_policy_export_corim(pdir: tuple[Path, ec.EllipticCurvePrivateKey], image: bytes, measured: bytes) -> None:
    d, _ = pdir
    (d / "fw.bin").write_bytes(image)
    allowed = (f'[[firmware.allowed]]\nid = "fw-listed"\nsha384 = "{hashlib.sha384(image).hexdigest()}"\n'
               'svn = 1\nbytes = "fw.bin"\n')
    (d / "acme.toml").write_text(policy_text("", allowed=allowed))
    assert main(["policy", "export", "--corim", "acme", "--policies", str(d / "acme.toml"), "-o", str(d / "t.corim"),
                 "--key", str(d / "acme.key")]) == 0
    raw = (d / "t.corim").read_bytes()
    schema("signed-corim", flat=True).validate_cbor(raw)
    payload = cbor2.loads(cbor2.loads(raw).value[2])
    schema("tagged-unsigned-corim-map", flat=True).validate_cbor(cbor2.dumps(payload))
    (comid,) = [cbor2.loads(t.value) for t in payload.value[1]]
    schema("concise-mid-tag").validate_cbor(cbor2.dumps(comid))
    fw_triple, snp_triple = comid[4][0]
    assert fw_triple[1][0][1][1] == cbor2.CBORTag(552, 1)
    assert snp_triple[1][0][1][2] == [[7, measured]] and snp_triple[1][0][1][11] == SHAPE.key()
    assert main(["policy", "export", "--corim", "other", "--policies", str(d / "acme.toml"), "-o", str(d / "x")]) == 2


def test_endorsed_addon_variant_is_refused_when_it_was_not_the_endorsed_bytes(
        pdir: tuple[Path, ec.EllipticCurvePrivateKey], image: bytes) -> None:
    """An endorsement covers exactly one build: a derived image (one page changed) carrying it is refused."""
    d, key = pdir
    loaded = _loaded(d, policy_text(publisher()))
    variant = derive(image, b"tampered-page!!!")
    addon = build_addon([("edk2-2022.11-acme.1", variant)],
                        extra_sections=[(".corim", signed(key, hashlib.sha384(image).hexdigest(),
                                                          fwid="edk2-2022.11-acme.1"))])
    from verifier.appraise.reference import split_firmware
    payload, ends = split_firmware(addon)
    with pytest.raises(EndorsementRefused, match="is for firmware sha384"):
        loaded.table.add_endorsed(payload, ends)


def test_store_keeps_endorsed_builds_across_reloads_and_a_raised_min_svn_drops_them(
        pdir: tuple[Path, ec.EllipticCurvePrivateKey], image: bytes, measured: bytes) -> None:
    from verifier.appraise.appraise import release_allowed
    from verifier.appraise.store import PolicyStore
    from verifier.verdict import CheckResult, Outcome, Verdict
    d, key = pdir
    (d / "acme.toml").write_text(policy_text(publisher()))
    store = PolicyStore(d, min_interval=0)
    digest = hashlib.sha384(image).hexdigest()
    addon = build_addon([("edk2-2022.11-acme.1", image)],
                        extra_sections=[(".corim", signed(key, digest, fwid="edk2-2022.11-acme.1", svn=2, eid="e-2"))])
    assert store.candidates(measured) == []
    assert store.add_firmware(addon) == ["acme"]
    loaded = store.get("acme")
    assert loaded.table.lookup(measured) is not None
    assert store.candidates(measured) == ["acme"]   # issue 21: the endorsed build is in the tenant index
    facts = {"tenant": "acme", "firmware": {"id": "edk2-2022.11-acme.1", "sha384": digest}}
    verdict = Verdict(checks=(CheckResult("firmware.measurement", Outcome.PASS, "matched"),), facts=facts)
    ok, why = release_allowed(loaded, verdict, "acme/key/disk")
    assert ok and why.endswith("firmware edk2-2022.11-acme.1 (svn 2) may receive acme/key/disk")
    # Same policy, rewritten (a new commit, say): the build is re-admitted from the store's copy.
    (d / "acme.toml").write_text(policy_text(publisher()) + "\n# touched\n")
    store.refresh(force=True)
    assert store.get("acme").table.lookup(measured) is not None
    assert store.candidates(measured) == ["acme"]
    # The owner raises the publisher's minimum svn: the svn-2 build drops out on reload.
    (d / "acme.toml").write_text(policy_text(publisher().replace("min_svn = 2", "min_svn = 3")))
    store.refresh(force=True)
    raised = store.get("acme")
    assert raised.table.lookup(measured) is None
    assert store.candidates(measured) == []
    # A token issued before the change is re-checked at release time: refused, by name.
    ok, why = release_allowed(raised, verdict, "acme/key/disk")
    assert not ok and "no longer allowed" in why
