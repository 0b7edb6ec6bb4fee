"""Launch measurement tables: known answers, agreement with sev-snp-measure's full computation."""
from __future__ import annotations

import pytest
from sevsnpmeasure import guest
from sevsnpmeasure.sev_mode import SevMode
from sevsnpmeasure.vcpu_types import CPU_SIGS
from sevsnpmeasure.vmm_types import VMMType

from verifier.errors import FirmwareError, UsageError
from verifier.measure import launch
from verifier.measure.launch import (KernelHashes, Shape, expected_measurement, firmware_seed, measurement_table,
                                     prepare_firmware, shapes_product)

AMDSEV = "edk2-2026.08-OVMF.amdsev.fd"
# ../shared/firmware/README.md, known answers (sev-snp-measure 0.0.13, snp, QEMU, guest features 0x1)
KNOWN = {
    (1, "EPYC-v4"): "d74bd3ea40b240c3228edc5177ce6193561ebff633dbd0be76d6c143b876d65102425c0e2e8a930857c48daa5eacda58",
    (1, "EPYC-Milan"): "4a7f0dc0ad7c8fc19a056d1f78c6ccc2dda5c69aef1b063650d94598084b89a89a5e295aceb08223b8ddd027620dbe66",
    (4, "EPYC-v4"): "13a6ae9fbaa31c91ade309c36bd5214729438abac318e01176e02a97b8bec11a4bce86b4d2b1fba2ec0481dd24ff525f",
    (4, "EPYC-Milan"): "c995d6122aacbc0434128f0c63783f03b7caec3f8f4292948522a00c0395ff126f1633d8346a20aa85f8dd3bd8739a38",
}
KNOWN_SEED = ("9d0dd8be18c86e3fe3bf0038ed75ebf5340bee69fd2632c8ff9409964575960a"
              "e1f7e84be387d2e3467bc3508d1e4806")
_VMM = {"qemu": VMMType.QEMU, "ec2": VMMType.ec2, "gce": VMMType.gce}


@pytest.fixture(scope="module")
def amdsev(firmware_dir):
    return (firmware_dir / AMDSEV).read_bytes()


def test_known_answers(amdsev):
    shapes = [Shape(vcpus=n, vcpu_type=t) for n, t in KNOWN]
    table = measurement_table(amdsev, shapes)
    assert list(table) == shapes  # same order as asked
    for (n, t), expected in KNOWN.items():
        assert table[Shape(vcpus=n, vcpu_type=t)].hex() == expected


def test_known_seed(amdsev):
    assert firmware_seed(prepare_firmware(amdsev)).hex() == KNOWN_SEED


def test_expected_measurement_single(amdsev):
    assert expected_measurement(amdsev, Shape(4, "EPYC-Milan")).hex() == KNOWN[(4, "EPYC-Milan")]


@pytest.mark.parametrize("name", ["edk2-2022.11-OVMF.fd", "edk2-2025.02-OVMF.fd", AMDSEV])
@pytest.mark.parametrize("vmm", ["qemu", "ec2", "gce"])
def test_table_equals_full_calc_launch_digest(firmware_dir, name, vmm):
    """Each table entry equals sev-snp-measure's own full computation (no seed) for that shape."""
    path = firmware_dir / name
    shapes = shapes_product([1, 3, 8], ["EPYC-v4", "EPYC-Genoa"], [vmm], [0x1, 0x5])
    table = measurement_table(path.read_bytes(), shapes)
    for s in shapes[::3] + [shapes[-1]]:
        want = guest.calc_launch_digest(SevMode.SEV_SNP, s.vcpus, CPU_SIGS[s.vcpu_type], str(path), "", "", "",
                                        s.guest_features, "", _VMM[vmm])
        assert table[s] == want, s.key()


def test_kernel_hashes_match_sev_snp_measure(firmware_dir, tmp_path):
    path = firmware_dir / AMDSEV
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(b"\x4d\x5a kernel image" * 1000)
    initrd.write_bytes(b"initrd" * 333)
    append = "console=ttyS0 root=/dev/vda1"
    kh = KernelHashes.from_files(kernel, initrd, append)
    assert kh == KernelHashes.from_bytes(kernel.read_bytes(), initrd.read_bytes(), append)
    assert KernelHashes.from_files(kernel) == KernelHashes.from_bytes(kernel.read_bytes())
    for vmm in ("qemu", "ec2"):
        shape = Shape(vcpus=2, vcpu_type="EPYC-Milan", vmm=vmm, kernel_hashes=kh)
        got = expected_measurement(path.read_bytes(), shape)
        want = guest.calc_launch_digest(SevMode.SEV_SNP, 2, CPU_SIGS["EPYC-Milan"], str(path), str(kernel),
                                        str(initrd), append, 0x1, "", _VMM[vmm])
        assert got == want
        assert got != expected_measurement(path.read_bytes(), Shape(vcpus=2, vcpu_type="EPYC-Milan", vmm=vmm))


def test_kernel_hashes_need_a_firmware_that_supports_them(firmware_dir):
    shape = Shape(1, "EPYC-v4", kernel_hashes=KernelHashes.from_bytes(b"k"))
    with pytest.raises(FirmwareError, match="no SNP_KERNEL_HASHES section"):
        expected_measurement((firmware_dir / "edk2-2025.02-OVMF.fd").read_bytes(), shape)


def test_firmware_without_sev_metadata_is_refused_before_measuring(firmware_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(launch, "firmware_seed", lambda fw: calls.append(fw) or b"\0" * 48)
    with pytest.raises(FirmwareError, match="no SEV metadata"):
        measurement_table((firmware_dir / "edk2-2022.11-OVMF_CODE_4M-no-sev-metadata.fd").read_bytes(),
                          [Shape(1, "EPYC-v4")])
    assert calls == []


def test_progress_reports_every_shape(amdsev):
    seen = []
    shapes = shapes_product([1, 2, 4, 8], ["EPYC-v4", "EPYC-Milan"])
    measurement_table(amdsev, shapes, progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 8) and seen[-1] == (8, 8)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_duplicate_shapes_are_measured_once(amdsev):
    s = Shape(2, "EPYC-v4")
    assert list(measurement_table(amdsev, [s, s, Shape(2, "EPYC-v4")])) == [s]


# -- Shape ----------------------------------------------------------------------------------
def test_shape_key_is_stable_and_parses_back():
    s = Shape(vcpus=4, vcpu_type="EPYC-Milan", vmm="ec2", guest_features=0x5)
    assert s.key() == "vcpus=4,vcpu_type=EPYC-Milan,vmm=ec2,guest_features=0x5"
    assert Shape.parse(s.key()) == s
    k = Shape(1, "EPYC-v4", kernel_hashes=KernelHashes.from_bytes(b"kernel", b"initrd", "quiet"))
    assert Shape.parse(k.key()) == k
    assert Shape.parse("vcpu_type=EPYC-v4, vcpus=2") == Shape(2, "EPYC-v4", "qemu", 0x1)


@pytest.mark.parametrize("text,match", [
    ("vcpus=0,vcpu_type=EPYC-v4", "vcpus"),
    ("vcpus=5000,vcpu_type=EPYC-v4", "vcpus"),
    ("vcpus=x,vcpu_type=EPYC-v4", "decimal"),
    ("vcpus=1,vcpu_type=Pentium", "unknown vcpu type"),
    ("vcpus=1,vcpu_type=EPYC-v4,vmm=xen", "unknown vmm"),
    ("vcpus=1,vcpu_type=EPYC-v4,guest_features=zz", "not a number"),
    ("vcpus=1,vcpu_type=EPYC-v4,guest_features=0x10000000000000000", "64-bit"),
    ("vcpus=1,vcpu_type=EPYC-v4,kernel=00", "64 hex"),
    ("vcpus=1,vcpus=2,vcpu_type=EPYC-v4", "twice"),
    ("vcpus=1,vcpu_type=EPYC-v4,colour=red", "unknown field"),
    ("vcpus=1", "required"),
    ("garbage", "name=value"),
])
def test_shape_parse_refuses(text, match):
    with pytest.raises(UsageError, match=match):
        Shape.parse(text)


def test_shape_constructor_checks_types():
    with pytest.raises(UsageError):
        Shape(True, "EPYC-v4")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        KernelHashes(b"short", bytes(32), bytes(32))


# -- properties ------------------------------------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_digest = st.binary(min_size=32, max_size=32)
_shapes = st.builds(
    Shape, vcpus=st.integers(1, launch.MAX_VCPUS), vcpu_type=st.sampled_from(launch.VCPU_TYPES),
    vmm=st.sampled_from(launch.VMMS), guest_features=st.integers(0, (1 << 64) - 1),
    kernel_hashes=st.none() | st.builds(KernelHashes, _digest, _digest, _digest))


@settings(max_examples=200, deadline=None)
@given(_shapes)
def test_shape_key_round_trip_property(shape):
    assert Shape.parse(shape.key()) == shape
    assert Shape.parse(shape.key()).key() == shape.key()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200) | st.lists(st.sampled_from(
    ["vcpus=1", "vcpus=-1", "vcpus=99999", "vcpu_type=EPYC-v4", "vmm=ec2", "vmm=", "guest_features=0x1",
     "guest_features=-1", "kernel=" + "0" * 64, "initrd=" + "1" * 64, "cmdline=" + "f" * 64, "=", ",", "x=y"]),
    max_size=8).map(",".join))
def test_shape_parse_raises_only_usage_error(text):
    try:
        shape = Shape.parse(text)
    except UsageError as exc:
        assert exc.exit_code == 2 and exc.diagnostics()
        return
    assert Shape.parse(shape.key()) == shape


def test_shape_hash_survives_pickle_across_processes():
    import pickle
    import subprocess
    import sys
    s = Shape(4, "EPYC-Milan", "ec2", 0x5, KernelHashes.from_bytes(b"k"))
    assert pickle.loads(pickle.dumps(s)) == s and hash(pickle.loads(pickle.dumps(s))) == hash(s)
    # Another interpreter has another str-hash seed: the unpickled shape must still be a working dict key.
    code = ("import pickle,sys; s=pickle.loads(sys.stdin.buffer.read()); "
            "from verifier.measure.launch import Shape; t=Shape.parse(s.key()); print({t: 1}.get(s))")
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(s), capture_output=True, check=True,
                         env={**__import__("os").environ, "PYTHONHASHSEED": "12345"})
    assert out.stdout.strip() == b"1"
