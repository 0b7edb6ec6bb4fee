"""The [report] rules (go-sev-guest validate.Options parity): each passes on one sim report and fails on another."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from test_appraise_rules import (
    BASE_POLICY,
    FW,
    FW_DIGEST,
    check,
    make_policy,
    sim,
    verified,
)

from verifier.abi.fields import SigningKey
from verifier.appraise import report_rules
from verifier.appraise.appraise import appraise
from verifier.appraise.policy import parse_policy
from verifier.measure.launch import Shape, measurement_table
from verifier.verdict import Outcome

RULE_NAMES = ("guest.family_id", "guest.image_id", "guest.migration_agent", "platform.chip_id",
              "platform.firmware_current", "platform.firmware_committed", "platform.platform_info",
              "guest.policy_bits", "guest.key_info", "platform.mitigations")
FAM = bytes(range(16))
IMG = bytes(range(16, 32))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("report_rules")


@pytest.fixture(scope="module")
def good_measurement() -> bytes:
    return measurement_table(FW.read_bytes(), [Shape(2, "EPYC-Milan")])[Shape(2, "EPYC-Milan")]


def appraised(work: Path, m: bytes, rules: str, **fields: Any) -> Any:
    lp = make_policy(work, secrets="[report]\n" + rules)
    return appraise(verified(m, **fields), lp)


def outcome(v: Any, name: str) -> Outcome:
    return check(v, name).outcome  # type: ignore[no-any-return]


# -- each rule, pass and fail ------------------------------------------------------------------
def test_without_a_report_section_every_rule_is_skipped(work: Path, good_measurement: bytes) -> None:
    v = appraise(verified(good_measurement), make_policy(work))
    names = [c.name for c in v.checks]
    for rule in RULE_NAMES:
        assert names.count(rule) == 1 and outcome(v, rule) is Outcome.SKIP, rule
    assert v.accepted


@pytest.mark.parametrize("key,field,name", [("family_ids", "family_id", "guest.family_id"),
                                            ("image_ids", "image_id", "guest.image_id")])
def test_family_and_image_id_allow_lists(work: Path, good_measurement: bytes, key: str, field: str,
                                         name: str) -> None:
    value = FAM if field == "family_id" else IMG
    v = appraised(work, good_measurement, f'{key} = ["{value.hex()}", "{"ee" * 16}"]', **{field: value})
    assert outcome(v, name) is Outcome.PASS and v.accepted
    v = appraised(work, good_measurement, f'{key} = ["{"ee" * 16}"]', **{field: value})
    assert outcome(v, name) is Outcome.FAIL and not v.accepted
    assert check(v, name).actual == value.hex() and check(v, name).expected == "ee" * 16
    assert [c.name for c in v.failures] == [name]


def test_migration_agent(work: Path, good_measurement: bytes) -> None:
    # The sim, as real reports, says "no migration agent" with an all-ones REPORT_ID_MA.
    v = appraised(work, good_measurement, 'migration_agent = "none"')
    assert outcome(v, "guest.migration_agent") is Outcome.PASS
    ma = hashlib.sha256(b"ma").digest()
    v = appraised(work, good_measurement, 'migration_agent = "none"', report_id_ma=ma)
    assert outcome(v, "guest.migration_agent") is Outcome.FAIL
    assert "migration agent" in check(v, "guest.migration_agent").message
    v = appraised(work, good_measurement, f'migration_agent = "{ma.hex()}"', report_id_ma=ma)
    assert outcome(v, "guest.migration_agent") is Outcome.PASS
    v = appraised(work, good_measurement, f'migration_agent = "{ma.hex()}"')
    assert outcome(v, "guest.migration_agent") is Outcome.FAIL


def test_chip_id_allow_list(work: Path, good_measurement: bytes) -> None:
    chip = sim().chip_id
    v = appraised(work, good_measurement, f'chip_ids = ["{"00" * 64}", "{chip.hex()}"]')
    assert outcome(v, "platform.chip_id") is Outcome.PASS
    v = appraised(work, good_measurement, f'chip_ids = ["{"01" * 64}"]')
    assert outcome(v, "platform.chip_id") is Outcome.FAIL and check(v, "platform.chip_id").actual == chip.hex()
    # A masked chip id matches nothing on the list.
    masked = int(SigningKey.VCEK) << 2 | 2
    v = appraised(work, good_measurement, f'chip_ids = ["{chip.hex()}"]', key_info=masked, chip_id=bytes(64))
    assert outcome(v, "platform.chip_id") is Outcome.FAIL and "masked" in check(v, "platform.chip_id").message


def test_turin_chip_id_is_8_bytes(work: Path, good_measurement: bytes) -> None:
    t = sim("Turin")
    assert t.chip_id[8:] == bytes(56)
    v = appraised(work, good_measurement, f'chip_ids = ["{t.chip_id[:8].hex()}"]', product="Turin")
    assert outcome(v, "platform.chip_id") is Outcome.PASS


@pytest.mark.parametrize("which", ["current", "committed"])
def test_minimum_firmware_version_and_build(work: Path, good_measurement: bytes, which: str) -> None:
    # The sim's firmware is 1.55.40 (CURRENT and COMMITTED).
    name = f"platform.firmware_{which}"
    key = f"min_{which}_firmware"
    for minimum, want in (("1.55.40", Outcome.PASS), ("1.55.41", Outcome.FAIL), ("1.54.99", Outcome.PASS),
                          ("1.56.0", Outcome.FAIL), ("2.0.0", Outcome.FAIL)):
        v = appraised(work, good_measurement, f'{key} = "{minimum}"')
        assert outcome(v, name) is want, minimum
        assert check(v, name).actual == "1.55.40" and check(v, name).expected == f">= {minimum}"
    # Only the named one is compared: a newer CURRENT does not lift an old COMMITTED.
    v = appraised(work, good_measurement, f'{key} = "1.57.1"', current_minor=57, current_build=1,
                  committed_minor=55, committed_build=40)
    assert outcome(v, name) is (Outcome.PASS if which == "current" else Outcome.FAIL)


def test_platform_info_bits(work: Path, good_measurement: bytes) -> None:
    # The sim's PLATFORM_INFO is 0x25: smt_en, ecc_en, alias_check_complete.
    rules = '[report.platform_info]\nalias_check_complete = "required"\ntsme_en = "forbidden"\nsmt_en = "any"'
    v = appraised(work, good_measurement, rules)
    assert outcome(v, "platform.platform_info") is Outcome.PASS
    v = appraised(work, good_measurement, rules, platform_info=0x05)
    c = check(v, "platform.platform_info")
    assert c.outcome is Outcome.FAIL and "alias_check_complete is clear but required" in c.message
    v = appraised(work, good_measurement, rules, platform_info=0x27)
    assert "tsme_en is set but forbidden" in check(v, "platform.platform_info").message


def test_unknown_platform_info_bit_warns_unless_forbidden(work: Path, good_measurement: bytes) -> None:
    v = appraised(work, good_measurement, "", platform_info=0x25 | 1 << 9)
    assert outcome(v, "report.unknown_bits") is Outcome.WARN and v.accepted
    assert "PLATFORM_INFO bit 9" in check(v, "report.unknown_bits").message
    assert outcome(v, "platform.platform_info") is Outcome.SKIP
    v = appraised(work, good_measurement, '[report.platform_info]\nunknown_bits = "forbidden"',
                  platform_info=0x25 | 1 << 9)
    c = check(v, "platform.platform_info")
    assert c.outcome is Outcome.FAIL and "unknown bit 9" in c.message and not v.accepted
    v = appraised(work, good_measurement, '[report.platform_info]\nunknown_bits = "forbidden"')
    assert outcome(v, "platform.platform_info") is Outcome.PASS


def test_newer_guest_policy_bits(work: Path, good_measurement: bytes) -> None:
    rules = '[report.guest_policy]\npage_swap_disable = "required"\ncxl_allow = "forbidden"'
    v = appraised(work, good_measurement, rules, policy=BASE_POLICY | 1 << 25)
    assert outcome(v, "guest.policy_bits") is Outcome.PASS
    v = appraised(work, good_measurement, rules)
    assert "page_swap_disable is clear but required" in check(v, "guest.policy_bits").message
    v = appraised(work, good_measurement, rules, policy=BASE_POLICY | 1 << 25 | 1 << 21)
    assert "cxl_allow is set but forbidden" in check(v, "guest.policy_bits").message
    for bit in (22, 23, 24):
        name = {22: "mem_aes_256_xts", 23: "rapl_dis", 24: "ciphertext_hiding_dram"}[bit]
        v = appraised(work, good_measurement, f'[report.guest_policy]\n{name} = "required"', policy=BASE_POLICY | 1 << bit)
        assert outcome(v, "guest.policy_bits") is Outcome.PASS, name
        v = appraised(work, good_measurement, f'[report.guest_policy]\n{name} = "required"')
        assert outcome(v, "guest.policy_bits") is Outcome.FAIL, name


def test_unknown_guest_policy_and_key_info_bits(work: Path, good_measurement: bytes) -> None:
    v = appraised(work, good_measurement, "", policy=BASE_POLICY | 1 << 40)
    assert outcome(v, "report.unknown_bits") is Outcome.WARN and v.accepted
    v = appraised(work, good_measurement, '[report.guest_policy]\nunknown_bits = "forbidden"', policy=BASE_POLICY | 1 << 40)
    assert outcome(v, "guest.policy_bits") is Outcome.FAIL and "unknown bit 40" in check(v, "guest.policy_bits").message
    vcek = int(SigningKey.VCEK) << 2
    v = appraised(work, good_measurement, '[report.key_info]\nunknown_bits = "forbidden"', key_info=vcek | 1 << 7)
    assert outcome(v, "guest.key_info") is Outcome.FAIL and "KEY_INFO bit 7" in check(v, "report.unknown_bits").message
    v = appraised(work, good_measurement, '[report.key_info]\nmask_chip_key = "forbidden"',
                  key_info=vcek | 2, chip_id=bytes(64))
    assert "mask_chip_key is set but forbidden" in check(v, "guest.key_info").message
    v = appraised(work, good_measurement, '[report.key_info]\nmask_chip_key = "forbidden"')
    assert outcome(v, "guest.key_info") is Outcome.PASS


def test_required_mitigation_bits(work: Path, good_measurement: bytes) -> None:
    rules = "[report.mitigations]\ncurrent = [0, 2]\nlaunch = [0]"
    v = appraised(work, good_measurement, rules, version=5, current_mit_vector=0b111, launch_mit_vector=0b1)
    assert outcome(v, "platform.mitigations") is Outcome.PASS and v.accepted
    v = appraised(work, good_measurement, rules, version=5, current_mit_vector=0b011, launch_mit_vector=0)
    c = check(v, "platform.mitigations")
    assert c.outcome is Outcome.FAIL
    assert c.message == "CURRENT_MIT_VECTOR lacks bit 2; LAUNCH_MIT_VECTOR lacks bit 0"
    v = appraised(work, good_measurement, rules)   # a version 3 report has no vectors
    assert outcome(v, "platform.mitigations") is Outcome.FAIL
    assert "version 3 report has no mitigation vectors" in check(v, "platform.mitigations").message


def test_turin_v5_report_with_platform_info_bit6(work: Path, good_measurement: bytes) -> None:
    # Current Turin firmware sets PLATFORM_INFO bit 6 (0x65 was a parse error before): a named bit now.
    rules = '[report.platform_info]\niommu_write_safe = "required"\nunknown_bits = "forbidden"'
    v = appraised(work, good_measurement, rules, product="Turin", version=5, platform_info=0x65,
                  current_mit_vector=1, launch_mit_vector=1)
    assert v.accepted and v.facts["product"] == "Turin"
    assert outcome(v, "report.unknown_bits") is Outcome.PASS
    assert outcome(v, "platform.platform_info") is Outcome.PASS
    assert "iommu_write_safe" in check(v, "platform.platform_info").actual


def test_every_rule_enabled_at_once(work: Path, good_measurement: bytes) -> None:
    s = sim()
    rules = (f'family_ids = ["{FAM.hex()}"]\nimage_ids = ["{IMG.hex()}"]\nmigration_agent = "none"\n'
             f'chip_ids = ["{s.chip_id.hex()}"]\nmin_current_firmware = "1.55.40"\nmin_committed_firmware = "1.55.0"\n'
             '[report.platform_info]\nsmt_en = "required"\ntsme_en = "forbidden"\nunknown_bits = "forbidden"\n'
             '[report.guest_policy]\ncxl_allow = "forbidden"\nunknown_bits = "forbidden"\n'
             '[report.key_info]\nmask_chip_key = "forbidden"\nunknown_bits = "forbidden"\n'
             '[report.mitigations]\ncurrent = [1]\n')
    v = appraised(work, good_measurement, rules, family_id=FAM, image_id=IMG, version=5, current_mit_vector=2)
    assert len(report_rules.RULES) == len(RULE_NAMES)
    assert all(outcome(v, n) is Outcome.PASS for n in RULE_NAMES), [(n, check(v, n).message) for n in RULE_NAMES]
    assert v.accepted


# -- the policy file -------------------------------------------------------------------------
BASE = (f'version = 1\n[firmware]\n[[firmware.allowed]]\nid = "v2"\nsha384 = "{FW_DIGEST}"\nsvn = 2\n'
        'bytes = "uploaded"\n[[shapes]]\nvcpus = [1]\nvcpu_types = ["EPYC-v4"]\n[report]\n')


@pytest.mark.parametrize("rules,field,why", [
    ('family_ids = ["00"]', "report.family_ids[0]", "32 hex digits"),
    ("family_ids = []", "report.family_ids", "must not be empty"),
    ('image_ids = "00"', "report.image_ids", "must be an array"),
    ('migration_agent = "nope"', "report.migration_agent", "hex digits"),
    ('chip_ids = ["abcd"]', "report.chip_ids[0]", "128 hex digits"),
    ('min_current_firmware = "1.55"', "report.min_current_firmware", "MAJOR.MINOR.BUILD"),
    ('min_committed_firmware = "1.256.0"', "report.min_committed_firmware", "each 0-255"),
    ("colour = 1", "report.colour", "unknown key"),
    ('[report.platform_info]\nsmt_en = "yes"', "report.platform_info.smt_en", '"required", "forbidden" or "any"'),
    ('[report.platform_info]\nbogus = "required"', "report.platform_info.bogus", "unknown key"),
    ('[report.platform_info]\nunknown_bits = "required"', "report.platform_info.unknown_bits", '"forbidden" or "allowed"'),
    ('[report.guest_policy]\ndebug = "forbidden"', "report.guest_policy.debug", "rules in [guest]"),
    ('[report.key_info]\nauthor_key_en = "required"', "report.key_info.author_key_en", "author keys"),
    ("[report.mitigations]\ncurrent = [64]", "report.mitigations.current[0]", "out of range 0..63"),
    ("[report.mitigations]\nfuture = [1]", "report.mitigations.future", "unknown key"),
])
def test_bad_report_rules_are_refused_with_file_line_field(rules: str, field: str, why: str) -> None:
    text = BASE + rules + "\n"
    policy, errors = parse_policy(text, "acme.toml", check_files=False)
    assert policy is None and len(errors) == 1, errors
    e = errors[0]
    assert e.field == field and why in e.why and e.line is not None and e.line > 10, (e.field, e.why, e.line)


def test_parsed_rules() -> None:
    text = BASE + ('family_ids = ["' + FAM.hex() + '"]\nmigration_agent = "none"\nchip_ids = ["' + "ab" * 8 + '"]\n'
                   'min_current_firmware = "1.55.40"\n[report.platform_info]\nsmt_en = "forbidden"\n'
                   'alias_check_complete = "required"\ntio_en = "any"\n[report.mitigations]\ncurrent = [3, 1, 3]\n')
    policy, errors = parse_policy(text, "acme.toml", check_files=False)
    assert not errors and policy is not None
    r = policy.report_rules
    assert r is not None and r.family_ids == (FAM,) and r.image_ids is None
    assert r.migration_agent == b"\xff" * 32 and r.chip_ids == (bytes.fromhex("ab" * 8).ljust(64, b"\0"),)
    assert r.min_current_firmware == (1, 55, 40) and r.min_committed_firmware is None
    assert r.platform_info.required == ("alias_check_complete",) and r.platform_info.forbidden == ("smt_en",)
    assert r.mitigations_current == (1, 3) and r.mitigations_launch is None


HOSTILE_VALUES = ['1', '"x"', '[]', '[1]', '[[1]]', '{a=1}', '1.5', 'true', '"none"', '["' + "00" * 16 + '"]',
                  '"1.2.3"', '[64]', '[-1]', '"required"', '{smt_en="required"}', '{unknown_bits="forbidden"}',
                  '{current=[0], launch="x"}', '["' + "0" * 17 + '"]', '"' + "f" * 100000 + '"']
REPORT_KEYS = ("family_ids", "image_ids", "migration_agent", "chip_ids", "min_current_firmware",
               "min_committed_firmware", "platform_info", "guest_policy", "key_info", "mitigations")


@pytest.mark.parametrize("key", REPORT_KEYS)
def test_any_value_of_any_key_is_a_clean_result(key: str) -> None:
    # Wrong types, sizes and nestings: a policy or a list of errors with lines, never an exception.
    for value in HOSTILE_VALUES:
        policy, errors = parse_policy(BASE + f"{key} = {value}\n", "acme.toml", check_files=False)
        assert (policy is None) == bool(errors)
        assert all(e.line is not None and e.field and e.field.startswith("report") for e in errors), errors
