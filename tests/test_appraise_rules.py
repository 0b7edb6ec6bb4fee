"""Every appraisal rule: one report that passes it and one that breaks it (sim reports, real firmware)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import shutil

from sim.platform import SimPlatform, Tcb
from verifier.appraise import checks as checks_mod
from verifier.appraise.appraise import appraise, appraise_evidence, release_allowed, status_of, trust_vector
from verifier.appraise.policy import load_policy
from verifier.appraise.reference import ReferenceTable
from verifier.appraise.store import LoadedPolicy, PolicyStore
from verifier.evidence import load_evidence
from verifier.firmware.addon import build_addon
from verifier.measure.cache import MeasurementCache
from verifier.measure.launch import Shape, measurement_table
from verifier.options import default_options
from verifier.verdict import Outcome
from verifier.verify import verify_report

from conftest import FIRMWARE_DIR

FW = FIRMWARE_DIR / "edk2-2026.08-OVMF.amdsev.fd"
FW_DIGEST = hashlib.sha384(FW.read_bytes()).hexdigest() if FW.is_file() else "00" * 48
POLICY_DEBUG_BIT, POLICY_MA_BIT, POLICY_SMT_BIT, POLICY_SS_BIT = 1 << 19, 1 << 18, 1 << 16, 1 << 20
BASE_POLICY = 0x20000 | POLICY_SMT_BIT  # reserved bit 17 + SMT allowed (the sim's default)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("appraise")
    shutil.copyfile(FW, (d / "fw.fd"))  # must live in the policy tree
    return d


@pytest.fixture(scope="module")
def good_measurement() -> bytes:
    return measurement_table(FW.read_bytes(), [Shape(2, "EPYC-Milan")])[Shape(2, "EPYC-Milan")]


_counter = [0]


def make_policy(work: Path, *, firmware: str = "", platform: str = "", guest: str = "", tenant: str = "acme",
                secrets: str = "", bytes_at: str = "fw.fd", fw_entry: str = "") -> LoadedPolicy:
    _counter[0] += 1
    d = work / f"p{_counter[0]}"
    d.mkdir()
    if bytes_at != "uploaded":
        shutil.copyfile(FW, (d / "fw.fd"))  # must live in the policy tree
    text = (f"version = 1\n[firmware]\n{firmware}\n[[firmware.allowed]]\nid = \"v2\"\nsha384 = \"{FW_DIGEST}\"\n"
            f"svn = 2\nbytes = \"{bytes_at}\"\n{fw_entry}\n[[shapes]]\nvcpus = [1, 2]\nvcpu_types = [\"EPYC-v4\", \"EPYC-Milan\"]\n"
            f"[platform]\nallow_simulated_platform = true\n{platform}\n[guest]\n{guest}\n{secrets}")
    path = d / f"{tenant}.toml"
    path.write_text(text)
    policy = load_policy(path)
    table = ReferenceTable(policy, MeasurementCache(work / "cache"))  # measured once, then read from the cache
    table.load_files()
    return LoadedPolicy(policy, "0" * 40, False, table)


_sims: dict[tuple[str, str], SimPlatform] = {}


def sim(product: str = "Milan", signer: str = "VCEK") -> SimPlatform:
    if (product, signer) not in _sims:
        _sims[(product, signer)] = SimPlatform(product, signer)
    return _sims[(product, signer)]


def verified(measurement: bytes, *, product: str = "Milan", signer: str = "VCEK", **fields: Any):  # type: ignore[no-untyped-def]
    s = sim(product, signer)
    fields.setdefault("policy", BASE_POLICY)
    report = s.sign_report(measurement=measurement, **fields)
    return verify_report(load_evidence(report),
                         default_options(trust_root=s.ark, certs=(s.leaf, s.intermediate)))


def check(verdict: Any, name: str) -> Any:
    found = [c for c in verdict.checks if c.name == name]
    assert len(found) == 1, [c.name for c in verdict.checks]
    return found[0]


def only_failure(verdict: Any, name: str, message: str) -> None:
    assert [c.name for c in verdict.failures] == [name], [(c.name, c.message) for c in verdict.failures]
    assert verdict.failures[0].message == message
    assert verdict.facts["status"] == "contraindicated" and not verdict.accepted


def test_every_rule_runs_and_a_clean_report_is_accepted(work: Path, good_measurement: bytes) -> None:
    rep = verified(good_measurement)
    v = appraise(rep, make_policy(work))
    names = [c.name for c in v.checks]
    assert names[:len(rep.checks)] == [c.name for c in rep.checks]  # the verification's checks come first
    policy_names = names[len(rep.checks):]
    from verifier.appraise.report_rules import RULES as REPORT_RULES
    assert len(policy_names) == len(checks_mod.RULES) + len(REPORT_RULES) == len(set(policy_names)) == 32
    assert v.accepted and v.facts["status"] == "warning"  # warning only because the platform is simulated
    assert [c.name for c in v.warnings] == ["trust.simulated", "platform.simulated"]
    assert v.facts["firmware"]["id"] == "v2" and v.facts["shape"].startswith("vcpus=2,vcpu_type=EPYC-Milan")
    assert v.facts["simulated"] is True and v.facts["product"] == "Milan" and v.facts["signer"] == "VCEK"
    assert v.evidence_sha384 == hashlib.sha384(rep.report.raw).hexdigest()
    assert v.facts["trust_vector"] == {"instance-identity": 2, "configuration": 2, "executables": 2,
                                       "file-system": 0, "hardware": 32, "runtime-opaque": 2,
                                       "storage-opaque": 0, "sourced-data": 0}


def test_no_short_circuit_every_failure_is_reported(work: Path) -> None:
    lp = make_policy(work, firmware="min_svn = 3", guest="min_guest_svn = 5", platform="vmpls = [0]")
    v = appraise(verified(b"\x11" * 48, vmpl=2, policy=BASE_POLICY | POLICY_DEBUG_BIT), lp,
                 expected_report_data=b"\x01" * 64)
    assert {c.name for c in v.failures} == {"guest.debug", "guest.svn_min", "guest.vmpl", "firmware.measurement",
                                            "binding.report_data"}
    assert len(v.facts["reasons"]) == 5
    tv = v.facts["trust_vector"]
    assert tv["executables"] == 96 and tv["runtime-opaque"] == 96 and tv["configuration"] == 96
    assert tv["instance-identity"] == 96


# -- platform -------------------------------------------------------------------------------
def test_simulated_platform_refused_unless_the_policy_allows_it(work: Path, good_measurement: bytes) -> None:
    lp = make_policy(work)
    text = Path(lp.policy.path).read_text().replace("allow_simulated_platform = true", "")
    Path(lp.policy.path).write_text(text)
    strict = load_policy(lp.policy.path)
    t = ReferenceTable(strict)
    t.load_files()
    v = appraise(verified(good_measurement), LoadedPolicy(strict, None, False, t))
    only_failure(v, "platform.simulated", "the report chains to a simulated root, not AMD's; the policy does not set "
                                          "allow_simulated_platform")
    assert v.facts["trust_vector"]["hardware"] == 96
    assert check(appraise(verified(good_measurement), lp), "platform.simulated").outcome is Outcome.WARN


def test_product(work: Path, good_measurement: bytes) -> None:
    lp = make_policy(work, platform='products = ["Milan"]')
    assert check(appraise(verified(good_measurement), lp), "platform.product").outcome is Outcome.PASS
    only_failure(appraise(verified(good_measurement, product="Genoa"), lp), "platform.product",
                 "product Genoa is not allowed (policy allows Milan)")


def test_signer(work: Path, good_measurement: bytes) -> None:
    lp = make_policy(work, platform='signers = ["VCEK"]')
    assert check(appraise(verified(good_measurement), lp), "platform.signer").outcome is Outcome.PASS
    only_failure(appraise(verified(good_measurement, signer="VLEK"), lp), "platform.signer",
                 "signed by a VLEK; the policy allows VCEK")


def test_min_reported_tcb(work: Path, good_measurement: bytes) -> None:
    # The sim's TCB is bootloader=9 tee=0 snp=23 microcode=72.
    ok = make_policy(work, platform="[platform.min_tcb.Milan]\nsnp = 23\nmicrocode = 72")
    assert check(appraise(verified(good_measurement), ok), "tcb.min_reported").outcome is Outcome.PASS
    bad = make_policy(work, platform="[platform.min_tcb.Milan]\nsnp = 24\nbootloader = 10")
    only_failure(appraise(verified(good_measurement), bad), "tcb.min_reported",
                 "REPORTED_TCB: bootloader 9 below minimum 10; snp 23 below minimum 24")
    genoa_only = make_policy(work, platform="[platform.min_tcb.Genoa]\nsnp = 99")
    assert check(appraise(verified(good_measurement), genoa_only), "tcb.min_reported").outcome is Outcome.SKIP


def test_min_launch_tcb(work: Path, good_measurement: bytes) -> None:
    lp = make_policy(work, platform="[platform.min_launch_tcb.Milan]\nsnp = 20")
    assert check(appraise(verified(good_measurement), lp), "tcb.min_launch").outcome is Outcome.PASS
    only_failure(appraise(verified(good_measurement, launch_tcb=Tcb(snp=19)), lp), "tcb.min_launch",
                 "LAUNCH_TCB: snp 19 below minimum 20")


def test_provisional_firmware(work: Path, good_measurement: bytes) -> None:
    lp = make_policy(work)
    assert check(appraise(verified(good_measurement), lp), "tcb.provisional").outcome is Outcome.PASS
    prov = verified(good_measurement, committed_tcb=Tcb(snp=22), committed_minor=54)
    v = appraise(prov, lp)
    assert check(v, "tcb.provisional").outcome is Outcome.FAIL
    assert check(v, "tcb.provisional").message == ("provisional SNP firmware (CURRENT differs from COMMITTED) "
                                                   "is not allowed")
    allow = make_policy(work, platform="allow_provisional_firmware = true")
    v2 = appraise(prov, allow)
    assert check(v2, "tcb.provisional").outcome is Outcome.WARN and v2.accepted
    assert v2.facts["trust_vector"]["configuration"] == 32


# -- guest policy --------------------------------------------------------------------------
def test_debug(work: Path, good_measurement: bytes) -> None:
    lp = make_policy(work)
    assert check(appraise(verified(good_measurement), lp), "guest.debug").outcome is Outcome.PASS
    dbg = verified(good_measurement, policy=BASE_POLICY | POLICY_DEBUG_BIT)
    only_failure(appraise(dbg, lp), "guest.debug", "guest policy allows DEBUG (the host can read and change guest "
                                                   "memory); the policy forbids debug")
    unsafe = make_policy(work, guest="unsafe_allow_debug = true")
    v = appraise(dbg, unsafe)
    assert check(v, "guest.debug").outcome is Outcome.WARN and v.accepted
    assert v.facts["trust_vector"]["runtime-opaque"] == 32


def test_migration_agent(work: Path, good_measurement: bytes) -> None:
    ma = verified(good_measurement, policy=BASE_POLICY | POLICY_MA_BIT)
    only_failure(appraise(ma, make_policy(work)), "guest.migrate_ma",
                 "guest policy allows a migration agent; the policy does not")
    assert check(appraise(ma, make_policy(work, guest="allow_migrate_ma = true")), "guest.migrate_ma").outcome \
        is Outcome.PASS


def test_smt(work: Path, good_measurement: bytes) -> None:
    lp = make_policy(work, guest="allow_smt = false")
    only_failure(appraise(verified(good_measurement), lp), "guest.smt",
                 "guest policy allows SMT; the policy requires SMT not allowed")
    assert check(appraise(verified(good_measurement, policy=0x20000), lp), "guest.smt").outcome is Outcome.PASS


def test_single_socket(work: Path, good_measurement: bytes) -> None:
    lp = make_policy(work, guest="require_single_socket = true")
    only_failure(appraise(verified(good_measurement), lp), "guest.single_socket",
                 "guest policy does not require a single socket; the policy does")
    ss = verified(good_measurement, policy=BASE_POLICY | POLICY_SS_BIT)
    assert check(appraise(ss, lp), "guest.single_socket").outcome is Outcome.PASS


def test_min_abi(work: Path, good_measurement: bytes) -> None:
    rep = verified(good_measurement, policy=BASE_POLICY | 1 << 8 | 51)
    assert check(appraise(rep, make_policy(work, guest='min_abi = "1.51"')), "guest.abi_min").outcome is Outcome.PASS
    only_failure(appraise(rep, make_policy(work, guest='min_abi = "1.52"')), "guest.abi_min",
                 "guest policy ABI 1.51 below minimum 1.52")


def test_min_guest_svn(work: Path, good_measurement: bytes) -> None:
    rep = verified(good_measurement, guest_svn=4)
    assert check(appraise(rep, make_policy(work, guest="min_guest_svn = 4")), "guest.svn_min").outcome is Outcome.PASS
    only_failure(appraise(rep, make_policy(work, guest="min_guest_svn = 5")), "guest.svn_min",
                 "GUEST_SVN 4 below minimum 5")


def test_vmpl(work: Path, good_measurement: bytes) -> None:
    lp = make_policy(work, platform="vmpls = [0]")
    assert check(appraise(verified(good_measurement), lp), "guest.vmpl").outcome is Outcome.PASS
    only_failure(appraise(verified(good_measurement, vmpl=1), lp), "guest.vmpl",
                 "VMPL 1 is not allowed (policy allows 0)")


# -- firmware ----------------------------------------------------------------------------------
def test_measurement(work: Path, good_measurement: bytes) -> None:
    lp = make_policy(work)
    assert check(appraise(verified(good_measurement), lp), "firmware.measurement").outcome is Outcome.PASS
    v = appraise(verified(b"\x42" * 48), lp)
    only_failure(v, "firmware.measurement", "MEASUREMENT 4242424242424242... matches no allowed firmware x shape "
                                            "(4 reference measurements)")
    assert v.facts["firmware"] is None and v.facts["shape"] is None
    assert check(v, "firmware.revoked").outcome is Outcome.SKIP


def test_revoked(work: Path, good_measurement: bytes) -> None:
    assert check(appraise(verified(good_measurement), make_policy(work)), "firmware.revoked").outcome is Outcome.PASS
    lp = make_policy(work, firmware='revoked = ["v2"]')
    only_failure(appraise(verified(good_measurement), lp), "firmware.revoked", "firmware v2 is revoked")


def test_firmware_min_svn(work: Path, good_measurement: bytes) -> None:
    lp = make_policy(work, firmware="min_svn = 2")
    assert check(appraise(verified(good_measurement), lp), "firmware.min_svn").outcome is Outcome.PASS
    only_failure(appraise(verified(good_measurement), make_policy(work, firmware="min_svn = 3")),
                 "firmware.min_svn", "firmware svn 2 below minimum 3")


def test_firmware_supplied_with_the_evidence(work: Path, good_measurement: bytes) -> None:
    lp = make_policy(work, bytes_at="uploaded")
    rep = verified(good_measurement)
    before = appraise(rep, lp)
    assert "firmware without bytes yet: v2" in check(before, "firmware.measurement").message
    bad = appraise(rep, lp, supplied_firmware=build_addon([("x", (FIRMWARE_DIR / "edk2-2025.02-OVMF.fd").read_bytes())]))
    assert check(bad, "firmware.supplied").outcome is Outcome.FAIL
    assert "is not allowed by tenant 'acme'" in check(bad, "firmware.supplied").message
    good = appraise(rep, lp, supplied_firmware=build_addon([("v2", FW.read_bytes())]))
    assert check(good, "firmware.supplied").outcome is Outcome.PASS and good.accepted
    assert good.facts["firmware"]["id"] == "v2"


# -- bindings -----------------------------------------------------------------------------------
def test_report_data(work: Path, good_measurement: bytes) -> None:
    rd = hashlib.sha384(b"nonce+key").digest()
    rep = verified(good_measurement, report_data=rd.ljust(64, b"\0"))
    lp = make_policy(work)
    assert check(appraise(rep, lp), "binding.report_data").outcome is Outcome.SKIP
    assert check(appraise(rep, lp, expected_report_data=rd), "binding.report_data").outcome is Outcome.PASS
    v = appraise(rep, lp, expected_report_data=hashlib.sha384(b"other").digest())
    assert [c.name for c in v.failures] == ["binding.report_data"]
    assert "stale or replayed evidence" in v.failures[0].message
    assert check(appraise(rep, lp, expected_report_data=b"x" * 65), "binding.report_data").outcome is Outcome.FAIL


def test_host_data_fixed_value(work: Path, good_measurement: bytes) -> None:
    hd = bytes(range(32))
    lp = make_policy(work, platform=f'host_data = "{hd.hex()}"')
    assert check(appraise(verified(good_measurement, host_data=hd), lp), "binding.host_data").outcome is Outcome.PASS
    v = appraise(verified(good_measurement, host_data=b"\x01" * 32), lp)
    only_failure(v, "binding.host_data", f"HOST_DATA 0101010101010101... is not the policy ({hd.hex()[:16]}...)")


def test_host_data_bound_to_init_data(work: Path, good_measurement: bytes) -> None:
    lp = make_policy(work, platform='host_data = "initdata"')
    digest = hashlib.sha256(b"init-data toml").digest()
    rep = verified(good_measurement, host_data=digest)
    assert check(appraise(rep, lp, expected_host_data=digest), "binding.host_data").outcome is Outcome.PASS
    only_failure(appraise(rep, lp), "binding.host_data",
                 f"HOST_DATA {digest.hex()[:16]}... is not zero (no init-data sent) ({'00' * 8}...)")
    assert check(appraise(verified(good_measurement), lp), "binding.host_data").outcome is Outcome.PASS


# -- release ------------------------------------------------------------------------------------
def test_release_allowed_rules(work: Path, good_measurement: bytes) -> None:
    from sim.owner import BOOT_CHAIN_REASON, Owner
    owner = Owner("acme")
    secrets = (owner.id_block_toml() + '[[secrets]]\npath = "acme/key/a"\nfirmware = ["v2"]\n'
               '[[secrets]]\npath = "acme/key/b"\nmin_svn = 3\n'
               '[[secrets]]\npath = "acme/key/c"\n')
    bound = f'enforces_boot_chain = "{BOOT_CHAIN_REASON}"'
    lp = make_policy(work, secrets=secrets, fw_entry=bound)
    launch = owner.launch_fields(sim(), good_measurement, BASE_POLICY)
    launch.pop("measurement")
    ok = appraise(verified(good_measurement, **launch), lp)
    assert check(ok, "binding.owner_launch").outcome is Outcome.PASS
    assert release_allowed(lp, ok, "acme/key/a") == (True, "firmware v2 (svn 2) may receive acme/key/a")
    assert release_allowed(lp, ok, "acme/key/c")[0] is True
    assert release_allowed(lp, ok, "acme/key/b") == (False, "firmware svn 2 below minimum 3 for acme/key/b")
    assert release_allowed(lp, ok, "acme/key/zzz") == (False, "the policy of tenant acme lists no secret acme/key/zzz")
    rejected = appraise(verified(good_measurement, **{**launch, "policy": BASE_POLICY | POLICY_DEBUG_BIT}), lp)
    assert release_allowed(lp, rejected, "acme/key/a") == (False, "the attestation was not accepted")
    other = make_policy(work, tenant="globex", secrets=secrets.replace("acme/", "globex/"), fw_entry=bound)
    assert release_allowed(other, ok, "globex/key/a") == (False, "the attestation was appraised for another tenant")
    revoked_now = make_policy(work, firmware='revoked = ["v2"]', secrets=secrets, fw_entry=bound)
    assert release_allowed(revoked_now, ok, "acme/key/a") == (False, "firmware v2 is revoked")


def test_a_rule_that_raises_fails_closed(work: Path, good_measurement: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(ctx: Any) -> Any:
        raise KeyError("bug")
    monkeypatch.setattr(checks_mod, "RULES", checks_mod.RULES + (boom,))
    import verifier.appraise.appraise as ap
    monkeypatch.setattr(ap, "RULES", checks_mod.RULES)
    v = appraise(verified(good_measurement), make_policy(work))
    assert [c.name for c in v.failures] == ["rule.boom"] and "KeyError" in v.failures[0].message


def test_status_and_vector_helpers() -> None:
    from verifier.verdict import CheckResult
    assert status_of(()) == "contraindicated"
    warn = (CheckResult("guest.debug", Outcome.WARN, "w"), CheckResult("x.y", Outcome.PASS, "p"))
    assert status_of(warn) == "warning"
    tv = trust_vector(warn)
    assert tv["runtime-opaque"] == 32 and tv["hardware"] == 2 and tv["executables"] == 0


def test_appraise_evidence_from_bytes_and_store(work: Path, good_measurement: bytes) -> None:
    d = work / "store"
    d.mkdir()
    shutil.copyfile(FW, (d / "fw.fd"))  # must live in the policy tree
    text = Path(make_policy(work).policy.path).read_text()
    (d / "acme.toml").write_text(text)
    store = PolicyStore(d)
    s = sim()
    report = s.sign_report(measurement=good_measurement, policy=BASE_POLICY)
    opts = default_options(trust_root=s.ark, certs=(s.leaf, s.intermediate))
    v = appraise_evidence(report, opts, store, "acme")
    assert v.accepted and v.facts["firmware"]["id"] == "v2" and v.policy_id == store.get("acme").policy_id
    assert appraise_evidence(report, opts, store.get("acme")).accepted
