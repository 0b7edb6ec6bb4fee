"""Policy files: the format, every error with its exact line, `firmgate policy check`."""
from __future__ import annotations

import hashlib
import json
import shutil
import textwrap
from pathlib import Path

import pytest

from verifier.abi.fields import Product
from verifier.appraise.check import check_paths
from verifier.appraise.lines import LineIndex
from verifier.appraise.policy import INITDATA, load_policy, parse_policy
from verifier.cli import main
from verifier.errors import PolicyErrors

from conftest import FIRMWARE_DIR, REPO

FW_2026 = FIRMWARE_DIR / "edk2-2026.08-OVMF.amdsev.fd"
D1 = "aa" * 48
D2 = "bb" * 48

GOOD = f"""\
version = 1
description = "all features"

[firmware]
min_svn = 2
revoked = ["old"]

[[firmware.allowed]]
id = "old"
sha384 = "{D1}"
svn = 1
bytes = "uploaded"

[[firmware.allowed]]
id = "new"
sha384 = "{D2}"
svn = 2
bytes = "uploaded"
enforces_boot_chain = "Secure Boot db with our key built in"

[[shapes]]
vmm = "qemu"
vcpus = [1, 4]
vcpu_types = ["EPYC-v4", "EPYC-Milan"]
guest_features = 0x1

[[shapes]]
vcpus = [2]
vcpu_types = ["EPYC-Genoa"]
kernel = {{ kernel = "{'11' * 32}", initrd = "{'22' * 32}", cmdline = "{'33' * 32}" }}

[platform]
products = ["Milan", "Genoa"]
signers = ["VCEK"]
vmpls = [0]
allow_provisional_firmware = true
host_data = "initdata"

[platform.min_tcb.Milan]
bootloader = 3
snp = 8

[platform.min_launch_tcb.Genoa]
microcode = 100

[guest]
unsafe_allow_debug = false
allow_smt = false
min_abi = "1.51"
min_guest_svn = 1

[id_block]
trusted_author_keys = ["{'cc' * 48}"]
require_author_key = true

[[secrets]]
path = "acme/key/disk"
firmware = ["new"]
min_svn = 2
"""


def write(tmp_path: Path, text: str, name: str = "acme.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_policy_parses_into_typed_values(tmp_path: Path) -> None:
    pol = load_policy(write(tmp_path, GOOD))
    assert pol.tenant == "acme" and pol.description == "all features"
    assert [f.id for f in pol.firmware] == ["old", "new"] and pol.firmware[1].svn == 2
    assert pol.firmware[0].uploaded and pol.min_firmware_svn == 2 and pol.revoked == {"old"}
    assert pol.shapes[0].vcpus == (1, 4) and pol.shapes[0].vcpu_types == ("EPYC-v4", "EPYC-Milan")
    assert pol.shapes[1].vmm == "qemu" and pol.shapes[1].kernel is not None
    assert pol.shapes[1].kernel.cmdline == "33" * 32
    assert pol.platform.products == (Product.MILAN, Product.GENOA)
    assert pol.platform.signers == ("VCEK",) and pol.platform.vmpls == (0,)
    assert pol.platform.host_data == INITDATA and pol.platform.allow_provisional_firmware
    assert not pol.platform.allow_simulated_platform  # safe default
    floor = pol.platform.floor("min_tcb", Product.MILAN)
    assert floor is not None and floor.items() == [("bootloader", 3), ("snp", 8)]
    assert pol.platform.floor("min_tcb", Product.GENOA) is None
    assert pol.platform.floor("min_launch_tcb", Product.GENOA).microcode == 100
    assert pol.guest.min_abi == (1, 51) and not pol.guest.allow_smt and pol.guest.min_guest_svn == 1
    assert pol.secrets[0].path == "acme/key/disk" and pol.secrets[0].firmware == ("new",)
    assert pol.firmware[1].enforces_boot_chain == "Secure Boot db with our key built in"
    assert pol.firmware[0].enforces_boot_chain is None and not pol.secrets[0].unsafe_unbound
    assert pol.id_block.trusted_author_keys == (bytes.fromhex("cc" * 48),) and pol.id_block.require_author_key
    assert pol.id_block.trusted_id_keys is None and not pol.id_block.require_id_block
    assert pol.digest == hashlib.sha256(GOOD.encode()).hexdigest()


def test_absent_rules_mean_not_checked_and_safe_defaults(tmp_path: Path) -> None:
    text = f"""version = 1
[[firmware.allowed]]
id = "a"
sha384 = "{D1}"
svn = 0
bytes = "uploaded"
[[shapes]]
vcpus = [1]
vcpu_types = ["EPYC-v4"]
"""
    pol = load_policy(write(tmp_path, text))
    assert pol.min_firmware_svn is None and pol.platform.products is None and pol.platform.vmpls is None
    assert pol.guest.min_abi is None and pol.guest.unsafe_allow_debug is False
    assert pol.guest.allow_migrate_ma is False and pol.platform.allow_simulated_platform is False
    assert pol.shapes[0].guest_features == 1 and pol.shapes[0].vmm == "qemu"


# Ten different mistakes, each on a known line.
TEN = f"""\
version = 1
colour = "blue"
[firmware]
min_svn = "2"
revoked = ["ghost"]
[[firmware.allowed]]
id = "a"
sha384 = "abcd"
svn = 1
bytes = "uploaded"
[[firmware.allowed]]
id = "a"
sha384 = "{D2}"
svn = 2
bytes = "uploaded"
[[firmware.allowed]]
id = "c"
sha384 = "{D1}"
svn = 3
bytes = "fw/c.fd"
[[shapes]]
vcpus = [1]
vcpu_types = ["EPYC-v9"]
[platform]
vmpls = [0, 7]
[guest]
min_abi = "one"
[[secrets]]
path = "other/key/disk"
[[secrets]]
path = "acme/key/x"
firmware = ["nope"]
"""
TEN_EXPECTED = [
    (2, "colour", "unknown key 'colour'"),
    (4, "firmware.min_svn", "must be an integer, not a string"),
    (5, "firmware.revoked[0]", "revoked names unknown firmware id 'ghost'"),
    (8, "firmware.allowed[0].sha384", "sha384 digest must be 96 hex digits (48 bytes); got 4"),
    (12, "firmware.allowed[1].id", "duplicate firmware id 'a'"),
    (20, "firmware.allowed[2].bytes", "firmware file 'fw/c.fd' has sha384"),
    (23, "shapes[0].vcpu_types[0]", "unknown vCPU type 'EPYC-v9'"),
    (25, "platform.vmpls[1]", "7 is out of range 0..3"),
    (27, "guest.min_abi", 'min_abi must be "MAJOR.MINOR"'),
    (29, "secrets[0].path", "is not owned by tenant 'acme'"),
    (32, "secrets[1].firmware[0]", "secret names unknown firmware id 'nope'"),
]


def test_ten_mistakes_all_reported_with_exact_lines(tmp_path: Path) -> None:
    (tmp_path / "fw").mkdir()
    (tmp_path / "fw" / "c.fd").write_bytes(b"not the firmware the policy lists")
    p = write(tmp_path, TEN)
    policy, errors = parse_policy(p.read_bytes(), p)
    assert policy is None
    got = [(e.line, e.field, e.why) for e in errors]
    assert len(got) == len(TEN_EXPECTED), got
    for (line, field, why), (eline, efield, ewhy) in zip(got, TEN_EXPECTED):
        assert (line, field) == (eline, efield), (line, field, why)
        assert ewhy in why
    assert all(e.path == str(p) for e in errors)


def test_policy_check_cli_prints_every_error_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "fw").mkdir()
    (tmp_path / "fw" / "c.fd").write_bytes(b"x")
    p = write(tmp_path, TEN)
    assert main(["policy", "check", str(p)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[1] for line in out[:-1]] == [str(e[0]) for e in TEN_EXPECTED]
    assert out[0].startswith(f"{p}:2: [colour] unknown key")
    assert out[-1] == f"FAIL: {len(TEN_EXPECTED)} error(s) in 1 file(s)"


def test_policy_check_cli_ok_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, GOOD)
    write(tmp_path, GOOD.replace("acme/key/disk", "beta/key/disk"), "beta.toml")
    assert main(["policy", "check", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK: 2 policy file(s), tenants acme, beta; 4 firmware, 4 shape rule(s), 2 secret(s)")
    write(tmp_path, "version = 1\n[guest]\nmin_abi = 3\n", "gamma.toml")
    assert main(["policy", "check", "--json", str(tmp_path)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["tenants"] == ["acme", "beta"]
    reasons = {(e["line"], e["field"]): e["reason"] for e in doc["errors"]}
    assert reasons[(3, "guest.min_abi")] == "must be a string, not an integer"
    assert any("missing [firmware]" in r for r in reasons.values())


def test_policy_check_missing_path_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", str(tmp_path / "nope")]) == 1
    assert "no such file or directory" in capsys.readouterr().out


@pytest.mark.parametrize("text,line,why", [
    ("version = 1\n[firmware\n", 2, "TOML syntax"),
    ('version = 1\nversion = 2\n', 2, "TOML syntax"),       # tomllib: duplicate key
    ("version = 2\n", 1, "format version 2 is not supported"),
    ('description = "x"\n', 1, "missing 'version = 1'"),
])
def test_syntax_and_version_errors_have_lines(tmp_path: Path, text: str, line: int, why: str) -> None:
    _, errors = parse_policy(text, tmp_path / "acme.toml")
    assert errors and errors[0].line == line and why in errors[0].why


def test_tenant_id_comes_from_the_file_name_and_is_validated(tmp_path: Path) -> None:
    _, errors = parse_policy(GOOD, tmp_path / "Bad Name.toml")
    assert any("tenant id 'Bad Name'" in e.why for e in errors)


def test_nested_unknown_keys_and_wrong_types(tmp_path: Path) -> None:
    text = GOOD.replace("bootloader = 3", "bootloader = 3\nfmc = 1\nspeed = 4").replace(
        "signers = [\"VCEK\"]", "signers = \"VCEK\"").replace('vmm = "qemu"', 'vmm = "qemu"\nvcpu = 4')
    p = write(tmp_path, text)
    _, errors = parse_policy(p.read_text(), p)
    by_field = {e.field: (e.line, e.why) for e in errors}
    lines = text.splitlines()
    assert by_field["platform.min_tcb.Milan.fmc"][1].startswith("fmc exists only in Turin")
    assert lines[by_field["platform.min_tcb.Milan.speed"][0] - 1] == "speed = 4"
    assert lines[by_field["platform.signers"][0] - 1] == 'signers = "VCEK"'
    assert lines[by_field["shapes[0].vcpu"][0] - 1] == "vcpu = 4"


def test_secret_and_digest_rules(tmp_path: Path) -> None:
    text = GOOD.replace(f'sha384 = "{D2}"', f'sha384 = "{D1}"').replace(
        'path = "acme/key/disk"', 'path = "acme/key"')
    p = write(tmp_path, text)
    _, errors = parse_policy(text, p)
    whys = [e.why for e in errors]
    assert any("digest already listed as firmware 'old'" in w for w in whys)
    assert any("must be <repository>/<type>/<tag>" in w for w in whys)


def test_bytes_path_must_stay_inside_the_policy_directory(tmp_path: Path) -> None:
    text = GOOD.replace('bytes = "uploaded"', 'bytes = "../fw.fd"', 1)
    _, errors = parse_policy(text, tmp_path / "acme.toml")
    assert [e.line for e in errors] == [12] and "inside the policy directory" in errors[0].why


def test_real_firmware_file_digest_is_checked(tmp_path: Path) -> None:
    digest = hashlib.sha384(FW_2026.read_bytes()).hexdigest()
    (tmp_path / "fw").mkdir()
    shutil.copyfile(FW_2026, (tmp_path / "fw" / "ovmf.fd"))  # must live in the policy tree
    text = GOOD.replace(f'sha384 = "{D2}"\nsvn = 2\nbytes = "uploaded"',
                        f'sha384 = "{digest}"\nsvn = 2\nbytes = "fw/ovmf.fd"')
    pol = load_policy(write(tmp_path, text))
    assert pol.firmware_by_id("new").location == "fw/ovmf.fd"
    bad = text.replace(digest, digest[:-2] + "00")
    with pytest.raises(PolicyErrors) as ei:
        load_policy(write(tmp_path, bad))
    assert "has sha384 7d6b3ffceecc5848" in ei.value.diagnostics() and ":18:" in ei.value.diagnostics()


def test_non_snp_firmware_file_is_refused(tmp_path: Path) -> None:
    nosev = FIRMWARE_DIR / "edk2-2022.11-OVMF_CODE_4M-no-sev-metadata.fd"
    digest = hashlib.sha384(nosev.read_bytes()).hexdigest()
    shutil.copyfile(nosev, (tmp_path / "n.fd"))  # must live in the policy tree
    text = GOOD.replace(f'sha384 = "{D2}"\nsvn = 2\nbytes = "uploaded"', f'sha384 = "{digest}"\nsvn = 2\nbytes = "n.fd"')
    _, errors = parse_policy(text, write(tmp_path, text))
    assert len(errors) == 1 and "cannot be an SEV-SNP firmware" in errors[0].why and errors[0].line == 18


def test_line_index_tracks_tables_arrays_and_multiline_values() -> None:
    src = textwrap.dedent('''\
        a = """
        b = 1
        """
        c = [
          1,
          2,
        ]
        [t]
        "quoted.key" = 1
        [[arr]]
        x = 1
        [[arr]]
        x = 2
        [arr.sub]
        y = 'z # not a comment'
        ''')
    idx = LineIndex(src)
    assert idx.line(("a",)) == 1 and idx.line(("b",)) is None
    assert idx.line(("c",)) == 4 and idx.line(("c", 1)) == 4
    assert idx.line(("t", "quoted.key")) == 9
    assert idx.line(("arr", 0, "x")) == 11 and idx.line(("arr", 1, "x")) == 13
    assert idx.line(("arr", 1, "sub", "y")) == 15 and idx.line(("arr", 1)) == 12


def test_example_policies_in_the_repo_pass_the_check() -> None:
    report = check_paths([REPO / "policies"])
    assert report.ok, [e.diagnostics() for e in report.errors]
    assert len(report.policies) >= 2


def test_the_documented_complete_example_parses(tmp_path: Path) -> None:
    doc = (REPO / "docs" / "policy.md").read_text()
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    policy, errors = parse_policy(example, tmp_path / "acme.toml", check_files=False)
    assert errors == [] and policy is not None
    assert [f.id for f in policy.firmware] == ["ovmf-2025.02", "ovmf-2026.08"]
    assert policy.shapes[1].kernel is not None and len(policy.secrets) == 2


def _key_lines(text: str) -> list[int]:
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if s and not s.startswith(("#", "[")) and "=" in s and not s.startswith("version"):
            out.append(n)
    return out


@pytest.mark.parametrize("lineno", _key_lines(GOOD))
def test_a_wrong_type_on_any_line_is_reported_on_that_line(tmp_path: Path, lineno: int) -> None:
    # No policy value is a float: replacing any value with 1.5 must be an error that points at its line.
    lines = GOOD.splitlines()
    key = lines[lineno - 1].split("=", 1)[0]
    lines[lineno - 1] = f"{key}= 1.5"
    text = "\n".join(lines) + "\n"
    _, errors = parse_policy(text, tmp_path / "acme.toml")
    assert errors, lines[lineno - 1]
    assert lineno in [e.line for e in errors], [(e.line, e.field, e.why) for e in errors]


def test_non_utf8_and_oversized_files(tmp_path: Path) -> None:
    _, errors = parse_policy(b"version = 1\n# caf\xe9\n", tmp_path / "acme.toml")
    assert [(e.line, e.why) for e in errors] == [(2, "not valid UTF-8 (TOML files are UTF-8)")]
    _, errors = parse_policy(b"#" * (1024 * 1024 + 1), tmp_path / "acme.toml")
    assert "at most 1048576" in errors[0].why


def test_the_same_tenant_twice_in_one_check(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write(tmp_path / "a", GOOD)
    write(tmp_path / "b", GOOD)
    report = check_paths([tmp_path / "a", tmp_path / "b"])
    assert not report.ok and "tenant 'acme' is also defined by" in report.errors[0].why


def test_shape_count_is_bounded(tmp_path: Path) -> None:
    vcpus = ", ".join(str(n) for n in range(1, 201))
    text = GOOD.replace("vcpus = [1, 4]", f"vcpus = [{vcpus}]").replace(
        '["EPYC-v4", "EPYC-Milan"]', '["EPYC-v4", "EPYC-Milan", "EPYC-Genoa", "EPYC-Rome", "EPYC-Turin", "EPYC"]')
    _, errors = parse_policy(text, tmp_path / "acme.toml")
    assert [e.why for e in errors] == ["the shape rules expand to 1201 shapes; at most 1024 "
                                       "(each costs a measurement per firmware)"]


@pytest.mark.parametrize("firmware", ["[firmware]\n", "[firmware]\nallowed = []\n", "[firmware]\nmin_svn = 1\n"])
def test_a_policy_must_allow_some_firmware(tmp_path: Path, firmware: str) -> None:
    text = f'version = 1\n{firmware}[[shapes]]\nvcpus = [1]\nvcpu_types = ["EPYC-v4"]\n'
    _, errors = parse_policy(text, tmp_path / "acme.toml")
    assert [(e.line, e.why) for e in errors] == [(2, "no [[firmware.allowed]] or [[firmware.publishers]] entry: nothing could ever match")]
