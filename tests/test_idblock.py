"""ID blocks end to end: the structures and signatures, the simulated PSP, the owner's CLI,
host-install's QEMU command line, the [id_block] policy rules and the load-time binding rule."""
from __future__ import annotations

import base64
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from test_appraise_rules import (  # noqa: F401
    BASE_POLICY,
    check,
    good_measurement,
    make_policy,
    sim,
    verified,
    work,
)

from sim.owner import BOOT_CHAIN_REASON, Owner
from sim.platform import SimPlatform
from sim.psp import LaunchRefused, launch_fields
from tests.conftest import FIRMWARE_DIR
from verifier.appraise.appraise import appraise
from verifier.appraise.policy import parse_policy
from verifier.idblock import (
    ID_AUTH_SIZE,
    IdBlock,
    IdBlockError,
    IdBlockFormatError,
    has_author_key,
    key_digest,
    key_from_struct,
    key_struct,
    pem_key_digest,
    sign,
    verify,
)
from verifier.verdict import Outcome

FW = FIRMWARE_DIR / "edk2-2022.11-OVMF.fd"
LD = hashlib.sha384(b"launch").digest()


# -- structures and signatures -------------------------------------------------------------------
def test_sign_verify_round_trip_and_layout() -> None:
    o = Owner("unit")
    block = IdBlock(LD, b"F" * 16, b"I" * 16, guest_svn=7, policy=0x30000)
    raw, auth = sign(block, o.id_key, o.author_key)
    assert len(raw) == 96 and len(auth) == ID_AUTH_SIZE
    assert raw[:48] == LD and raw[48:64] == b"F" * 16 and raw[64:80] == b"I" * 16
    assert struct.unpack_from("<IIQ", raw, 80) == (1, 7, 0x30000)      # VERSION, GUEST_SVN, POLICY
    v = verify(raw, auth, author_key_enabled=True)
    assert v.block == block and v.id_key_digest == o.id_digest and v.author_key_digest == o.author_digest
    assert has_author_key(auth)
    # without an author key: ID_KEY_SIG and AUTHOR_KEY stay zero
    raw2, auth2 = sign(block, o.id_key, None)
    assert not has_author_key(auth2) and verify(raw2, auth2, author_key_enabled=False).author_key_digest is None
    with pytest.raises(IdBlockFormatError, match="AUTHOR_KEY"):
        verify(raw2, auth2, author_key_enabled=True)


def test_key_digest_matches_sev_snp_measure() -> None:
    """Our key structure and digest are sev-snp-measure's (snp-create-id-block) byte for byte."""
    from sevsnpmeasure import id_block as ref
    o = Owner("unit")
    assert key_struct(o.id_key.public_key()) == ref.marshal_ec_public_key(o.id_key)
    assert key_digest(o.id_key.public_key()) == ref.pub_to_digest(o.id_key)
    assert key_from_struct(key_struct(o.id_key.public_key())).public_numbers() == o.id_key.public_key().public_numbers()
    assert pem_key_digest(o.pem("id")) == o.id_digest


@pytest.mark.parametrize("part", ["block", "block_sig", "id_key_sig", "author_key"])
def test_any_tampering_fails_verification(part: str) -> None:
    o, other = Owner("unit"), Owner("unit-other")
    raw, auth = sign(IdBlock(LD), o.id_key, o.author_key)
    raw_b, auth_b = bytearray(raw), bytearray(auth)
    if part == "block":
        raw_b[0] ^= 1
    elif part == "block_sig":
        auth_b[0x40] ^= 1
    elif part == "id_key_sig":
        auth_b[0x680] ^= 1           # ID_KEY_SIG (SNP ABI Table 76)
    else:  # another author key in the structure: its signature over the ID key no longer verifies
        auth_b[0x880:0x880 + 0x404] = key_struct(other.author_key.public_key())
    with pytest.raises(IdBlockError, match="does not verify"):
        verify(bytes(raw_b), bytes(auth_b), author_key_enabled=True)


@pytest.mark.parametrize("block,auth,why", [
    (b"\0" * 95, b"\0" * 4096, "96"), (None, b"\0" * 4095, "4096"), (None, b"\0" * 4096, "ID_KEY_ALGO"),
])
def test_hostile_sizes_and_fields_are_format_errors(block: bytes | None, auth: bytes, why: str) -> None:
    good = IdBlock(LD).pack()
    with pytest.raises(IdBlockError, match=why):
        verify(block if block is not None else good, auth, author_key_enabled=False)


def test_key_structure_rejects_other_curves_and_off_curve_points() -> None:
    s = bytearray(key_struct(Owner("unit").id_key.public_key()))
    with pytest.raises(IdBlockFormatError, match="not P-384"):
        key_from_struct(b"\x03\0\0\0" + bytes(s[4:]))
    s[4] ^= 1
    with pytest.raises(IdBlockFormatError, match="not a point"):
        key_from_struct(bytes(s))
    with pytest.raises(IdBlockFormatError, match="reserved"):
        key_from_struct(bytes(s[:-1]) + b"\x01")


# -- the simulated PSP ---------------------------------------------------------------------------------
def test_psp_fills_the_report_fields_from_a_verified_block() -> None:
    p, o = SimPlatform("Milan"), Owner("unit", family_id=b"f" * 16, image_id=b"i" * 16, guest_svn=9)
    from verifier.abi.report import AttestationReport
    r = AttestationReport.from_bytes(p.sign_report(**o.launch_fields(p, LD)))
    assert r.id_key_digest == o.id_digest and r.author_key_digest == o.author_digest
    assert r.key_info.author_key_en and r.family_id == b"f" * 16 and r.image_id == b"i" * 16
    assert r.guest_svn == 9 and r.measurement == LD
    plain = AttestationReport.from_bytes(p.sign_report(**launch_fields(p, LD)))
    assert not any(plain.id_key_digest) and not plain.key_info.author_key_en


def test_psp_refuses_a_mismatched_launch() -> None:
    p, o = SimPlatform("Milan"), Owner("unit")
    raw, auth = o.sign(LD)
    with pytest.raises(LaunchRefused, match="not the launch digest"):
        launch_fields(p, hashlib.sha384(b"other").digest(), id_block=raw, id_auth=auth, author_key_enabled=True)
    with pytest.raises(LaunchRefused, match="POLICY 0x30000 is not the guest policy 0xb0000"):
        launch_fields(p, LD, guest_policy=0xB0000, id_block=raw, id_auth=auth, author_key_enabled=True)
    bad = bytearray(auth)
    bad[0x40] ^= 1
    with pytest.raises(LaunchRefused, match="ID_BLOCK_SIG does not verify"):
        launch_fields(p, LD, id_block=raw, id_auth=bytes(bad), author_key_enabled=True)
    with pytest.raises(LaunchRefused):
        launch_fields(p, LD, id_block=raw, id_auth=None)


# -- policy: [id_block] rules and the load-time binding rule -----------------------------------------
BASE = """version = 1
[firmware]
{revoked}
[[firmware.allowed]]
id = "a"
sha384 = "{d1}"
svn = 1
bytes = "uploaded"
{chain}
[[firmware.allowed]]
id = "b"
sha384 = "{d2}"
svn = 2
bytes = "uploaded"
enforces_boot_chain = "{reason}"
[[shapes]]
vcpus = [1]
vcpu_types = ["EPYC-v4"]
{kernel}
[platform]
{host_data}
{id_block}
[[secrets]]
path = "acme/key/disk"
{secret}
"""


def _parse(**kw: str) -> tuple[Any, list[str]]:
    fields = {"revoked": "", "d1": "aa" * 48, "d2": "bb" * 48, "chain": "", "reason": BOOT_CHAIN_REASON,
              "kernel": "", "host_data": "", "id_block": "", "secret": ""}
    fields.update(kw)
    pol, errs = parse_policy(BASE.format(**fields), "acme.toml", check_files=False)
    return pol, [e.diagnostics() for e in errs]


TRUST = f'[id_block]\ntrusted_author_keys = ["{"cc" * 48}"]'


def test_unbound_secret_is_refused_with_both_reasons_on_its_line() -> None:
    _, errs = _parse()
    assert len(errs) == 1 and errs[0].startswith("acme.toml:23: [secrets[0]] secret 'acme/key/disk'")
    assert "firmware a in a shape without kernel hashes" in errs[0] and "nothing names the owner" in errs[0]


@pytest.mark.parametrize("kw", [
    {"id_block": TRUST, "secret": 'firmware = ["b"]'},                   # only the enforcing firmware gets it
    {"id_block": TRUST, "revoked": 'revoked = ["a"]'},                   # a revoked firmware never gets it
    {"id_block": TRUST, "secret": "min_svn = 2"},                        # nor one below the secret's minimum
    {"id_block": TRUST, "chain": f'enforces_boot_chain = "{BOOT_CHAIN_REASON}"'},
    {"host_data": f'host_data = "{"11" * 32}"', "chain": f'enforces_boot_chain = "{BOOT_CHAIN_REASON}"'},
    {"id_block": TRUST, "kernel": f'kernel = {{ kernel = "{"11" * 32}", initrd = "{"22" * 32}", '
                                  f'cmdline = "{"33" * 32}" }}'},
    {"secret": "unsafe_unbound = true"},
])
def test_bound_forms_and_unsafe_unbound_load(kw: dict[str, str]) -> None:
    pol, errs = _parse(**kw)
    assert errs == [] and pol is not None


@pytest.mark.parametrize("kw,why", [
    ({"id_block": TRUST}, "firmware a in a shape without kernel hashes"),             # a boots anything
    ({"host_data": 'host_data = "initdata"', "secret": 'firmware = ["b"]'}, "nothing names the owner"),
    ({"id_block": "[id_block]\nrequire_id_block = true", "secret": 'firmware = ["b"]'}, "nothing names the owner"),
    ({"reason": "short"}, "8-500 characters"),
    ({"id_block": '[id_block]\ntrusted_id_keys = ["' + "00" * 48 + '"]'}, "all-zero digest"),
    ({"id_block": '[id_block]\ntrusted_id_keys = ["abc"]'}, "96 hex digits"),
    ({"id_block": '[id_block]\ntrusted_id_keys = ["-----BEGIN PUBLIC KEY-----\\nAAAA\\n-----END PUBLIC KEY-----"]'},
     "not a PEM EC public key"),
    ({"id_block": "[id_block]\nrequire_id_blok = true"}, "unknown key 'require_id_blok'"),
    ({"secret": "unsafe_unbound = 1"}, "must be true or false"),
])
def test_policy_errors(kw: dict[str, str], why: str) -> None:
    _, errs = _parse(**kw)
    assert any(why in e for e in errs), errs


def test_trusted_key_as_pem() -> None:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    o = Owner("unit")
    pem = o.author_key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    pol, errs = _parse(id_block=f'[id_block]\ntrusted_author_keys = ["""\n{pem.decode()}"""]', secret='firmware = ["b"]')
    assert errs == [] and pol.id_block.trusted_author_keys == (o.author_digest,)


# -- the appraisal checks -----------------------------------------------------------------------------
def test_id_block_checks_pass_and_fail(work: Path, good_measurement: bytes) -> None:  # noqa: F811
    o, other = Owner("unit"), Owner("unit-other")
    rules = (f'[id_block]\ntrusted_id_keys = ["{o.id_digest.hex()}"]\nrequire_id_block = true\n'
             'require_author_key = true\n')
    lp = make_policy(work, secrets=rules, fw_entry=f'enforces_boot_chain = "{BOOT_CHAIN_REASON}"')

    def launch(owner: Owner | None, author: bool = True) -> Any:
        if owner is None:
            f = launch_fields(sim(), good_measurement, guest_policy=BASE_POLICY)
        else:
            raw, auth = owner.sign(good_measurement, BASE_POLICY, with_author=author)
            f = launch_fields(sim(), good_measurement, guest_policy=BASE_POLICY, id_block=raw, id_auth=auth,
                              author_key_enabled=author)
        f.pop("measurement")
        return appraise(verified(good_measurement, **f), lp)

    ok = launch(o)
    for name in ("id_block.present", "id_block.author_key_present", "id_block.trusted_key", "binding.owner_launch"):
        assert check(ok, name).outcome is Outcome.PASS, check(ok, name)
    assert ok.accepted and ok.facts["binding"]["bound"] is True
    assert ok.facts["trust_vector"]["instance-identity"] == 2
    none = launch(None)
    assert {c.name for c in none.failures} == {"id_block.present", "id_block.author_key_present",
                                               "id_block.trusted_key"}
    assert none.facts["trust_vector"]["instance-identity"] == 96
    no_author = launch(o, author=False)
    assert [c.name for c in no_author.failures] == ["id_block.author_key_present"]
    stranger = launch(other)
    assert [c.name for c in stranger.failures] == ["id_block.trusted_key"]
    assert other.id_digest.hex() in check(stranger, "id_block.trusted_key").actual


def test_trusted_author_key_vouches_for_any_id_key_it_signed(work: Path, good_measurement: bytes) -> None:  # noqa: F811
    o = Owner("unit")
    lp = make_policy(work, secrets=o.id_block_toml(), fw_entry=f'enforces_boot_chain = "{BOOT_CHAIN_REASON}"')
    rotated = Owner("unit-rotated-id")
    raw, auth = sign(IdBlock(good_measurement, policy=BASE_POLICY), rotated.id_key, o.author_key)
    f = launch_fields(sim(), good_measurement, guest_policy=BASE_POLICY, id_block=raw, id_auth=auth,
                      author_key_enabled=True)
    f.pop("measurement")
    v = appraise(verified(good_measurement, **f), lp)
    assert check(v, "id_block.trusted_key").outcome is Outcome.PASS and v.accepted


# -- the owner's CLI -------------------------------------------------------------------------------------
def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from verifier.cli import main
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def owner_repo(tmp_path: Path) -> tuple[Path, Owner]:
    o = Owner("cli")
    (tmp_path / "ovmf.fd").write_bytes(FW.read_bytes())  # policy files live inside the policy tree
    digest = hashlib.sha384(FW.read_bytes()).hexdigest()
    from sim.owner import bound_policy
    (tmp_path / "acme.toml").write_text(bound_policy(o, "acme", [("ovmf", digest, 1, "ovmf.fd")],
                                                     secrets=["acme/key/disk"],
                                                     shapes='[[shapes]]\nvcpus = [1, 2]\nvcpu_types = ["EPYC-v4"]'))
    (tmp_path / "id.pem").write_bytes(o.pem("id"))
    (tmp_path / "author.pem").write_bytes(o.pem("author"))
    return tmp_path, o


def test_cli_sign_then_verify(owner_repo: tuple[Path, Owner], capsys: pytest.CaptureFixture[str]) -> None:
    d, o = owner_repo
    code, out = _cli(["idblock", "sign", "--policy", str(d / "acme.toml"), "--id-key", str(d / "id.pem"),
                      "--author-key", str(d / "author.pem"), "--guest-svn", "4"], capsys)
    assert code == 0, out
    assert "2 ID block(s)" in out and o.author_digest.hex() in out
    doc = json.loads((d / "acme.idblocks.json").read_text())
    assert doc["format"] == "firmgate-idblocks/1" and len(doc["blocks"]) == 2
    assert len(base64.b64decode(doc["blocks"][0]["id_auth"])) == 4096
    code, out = _cli(["idblock", "verify", str(d / "acme.idblocks.json"), "--author-key", str(d / "author.pem"),
                      "--firmware", str(FW)], capsys)
    assert code == 0 and "2 launch digest(s) recomputed" in out, out
    code, out = _cli(["idblock", "verify", str(d / "acme.idblocks.json"), "--author-key", Owner("x").author_digest.hex()],
                     capsys)
    assert code == 1 and "is not the expected one" in out
    # a block whose launch digest is not what the firmware measures: exit 1
    doc["blocks"][0]["launch_digest"] = "00" * 48
    (d / "bad.json").write_text(json.dumps(doc))
    code, out = _cli(["idblock", "verify", str(d / "bad.json")], capsys)
    assert code == 1 and "launch_digest differs" in out
    (d / "junk.json").write_text('{"format": "firmgate-idblocks/1", "blocks": "x"}')
    code, out = _cli(["idblock", "verify", str(d / "junk.json")], capsys)
    assert code == 2 and len(out.strip().splitlines()) == 1


def test_cli_sign_bad_input_is_exit_2(owner_repo: tuple[Path, Owner], capsys: pytest.CaptureFixture[str]) -> None:
    d, _ = owner_repo
    base = ["idblock", "sign", "--policy", str(d / "acme.toml"), "--id-key", str(d / "id.pem")]
    for extra in (["--family-id", "zz"], ["--guest-policy", "nothex"], ["--id-key", str(d / "acme.toml")]):
        code, out = _cli(base + extra, capsys)
        assert code == 2 and "Traceback" not in out, out


# -- host-install ----------------------------------------------------------------------------------------
def _vm(tmp_path: Path, o: Owner, name: str, images: dict[str, bytes], **cfg: Any) -> Any:
    from host_install.vm import VmDir
    from verifier.measure.launch import Shape
    d = tmp_path / name
    d.mkdir()
    (d / "owner.idblocks.json").write_text(o.sign_set("acme", images, [Shape(2, "EPYC-v4")]).to_json())
    return VmDir.create(d, accel="tcg", snp=True, vcpus=2, cpu="EPYC-v4", id_blocks="owner.idblocks.json", **cfg)


def test_qemu_gets_the_owners_block_for_the_installed_firmware(tmp_path: Path) -> None:
    from host_install.install import install
    from host_install.qemu import build_command
    from verifier.firmware.addon import build_addon
    o = Owner("host")
    fw = FW.read_bytes()
    vm = _vm(tmp_path, o, "vm", {"ovmf": fw}, require_id_block=True)
    install(vm, build_addon([("ovmf", fw)]), launch=False)
    cmd = build_command(vm)
    snp = next(cmd[i + 1] for i, a in enumerate(cmd) if a == "-object" and cmd[i + 1].startswith("sev-snp-guest"))
    props = dict(p.split("=", 1) for p in snp.split(",")[1:])
    raw, auth = base64.b64decode(props["id-block"]), base64.b64decode(props["id-auth"])
    v = verify(raw, auth, author_key_enabled=True)
    from verifier.measure.launch import Shape, expected_measurement
    assert v.block.launch_digest == expected_measurement(fw, Shape(2, "EPYC-v4"))
    assert v.author_key_digest == o.author_digest
    assert props["author-key-enabled"] == "on" and props["policy"] == "0x30000"


def test_require_id_block_refuses_unsigned_firmware_before_touching_disk(tmp_path: Path) -> None:
    from host_install.errors import ImageRejected
    from host_install.install import install
    from verifier.firmware.addon import build_addon
    fw = FW.read_bytes()
    other = bytearray(fw)
    other[0x1000] ^= 0xFF          # not signed by the owner (and a different MEASUREMENT)
    vm = _vm(tmp_path, Owner("host"), "vm", {"ovmf": fw}, require_id_block=True)
    before = sorted(p.name for p in vm.path.rglob("*"))
    with pytest.raises(ImageRejected, match="requires an ID block") as ei:
        install(vm, build_addon([("other", bytes(other))]), launch=False)
    assert ei.value.exit_code == 2
    assert sorted(p.name for p in vm.path.rglob("*")) == before
    # without the requirement the same firmware installs, and QEMU gets no ID block
    from host_install.qemu import build_command
    loose = _vm(tmp_path, Owner("host"), "vm2", {"ovmf": fw})
    install(loose, build_addon([("other", bytes(other))]), launch=False)
    assert not any("id-block" in a for a in build_command(loose))


def test_vm_toml_require_id_block_needs_a_set(tmp_path: Path) -> None:
    from host_install.errors import VmConfigError
    from host_install.vm import VmDir
    with pytest.raises(VmConfigError, match="require_id_block needs"):
        VmDir.create(tmp_path / "x", snp=True, require_id_block=True)


def test_hostile_id_block_sets_fail_with_a_reason_never_a_crash() -> None:
    """Truncations, byte flips and retyped fields of a valid set: parse_set accepts or raises IdBlockError."""
    import random

    from verifier.idblockset import parse_set
    o = Owner("hostile")
    from verifier.measure.launch import Shape
    good = o.sign_set("acme", {"fw": FW.read_bytes()}, [Shape(1, "EPYC-v4")]).to_json().encode()
    assert parse_set(good).blocks[0].verified.author_key_digest == o.author_digest
    rnd = random.Random(13)
    doc = json.loads(good)
    variants: list[bytes] = [good[:n] for n in range(0, len(good), 997)]
    variants += [bytes(b ^ (1 << rnd.randrange(8)) if i == j else b for i, b in enumerate(good))
                 for j in (rnd.randrange(len(good)) for _ in range(60))]
    for key in ("id_key_digest", "author_key_digest", "tenant", "policy_sha256", "blocks"):
        for v in (None, 1, [], {}, "zz", "00" * 48, "A" * 10_000):
            variants.append(json.dumps({**doc, key: v}).encode())
    for key in ("id_block", "id_auth", "launch_digest", "firmware", "shape", "firmware_sha384"):
        for v in (None, 7, "", "!!!", base64.b64encode(b"\0" * 96).decode(), base64.b64encode(b"\0" * 4096).decode()):
            variants.append(json.dumps({**doc, "blocks": [{**doc["blocks"][0], key: v}]}).encode())
    variants += [b"[" * 100_000, b"\xff\xfe", b'{"format": "firmgate-idblocks/1", "blocks": [1]}']
    outcomes = {"ok": 0, "refused": 0}
    for v in variants:
        try:
            parse_set(v)
            outcomes["ok"] += 1
        except IdBlockError as exc:
            assert exc.diagnostics() and exc.exit_code in (1, 2)
            outcomes["refused"] += 1
    assert outcomes["refused"] > len(variants) // 2
