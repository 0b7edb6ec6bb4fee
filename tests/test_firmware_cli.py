"""`firmgate addon build|inspect|extract` and `firmgate measure`, through verifier.cli.main."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from verifier.cli import main

AMDSEV = "edk2-2026.08-OVMF.amdsev.fd"
BOOKWORM = "edk2-2022.11-OVMF.fd"
NO_SEV = "edk2-2022.11-OVMF_CODE_4M-no-sev-metadata.fd"
V4_1 = "d74bd3ea40b240c3228edc5177ce6193561ebff633dbd0be76d6c143b876d65102425c0e2e8a930857c48daa5eacda58"
MILAN_4 = "c995d6122aacbc0434128f0c63783f03b7caec3f8f4292948522a00c0395ff126f1633d8346a20aa85f8dd3bd8739a38"


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def two_fw_addon(tmp_path, firmware_dir, capsys):
    out = tmp_path / "fw.efi"
    rc, stdout, _ = run(capsys, "addon", "build", "--firmware", firmware_dir / AMDSEV, "--fwid", "edk2-2026.08-acme.3",
                        "--firmware", firmware_dir / BOOKWORM, "--fwid", "edk2-2022.11", "-o", out)
    assert rc == 0 and "2 firmware image(s)" in stdout
    return out


def test_build_inspect_extract_round_trip(tmp_path, firmware_dir, two_fw_addon, capsys):
    rc, stdout, _ = run(capsys, "addon", "inspect", two_fw_addon, "--json")
    assert rc == 0
    facts = json.loads(stdout)
    assert [e["fwid"] for e in facts["efifw"]] == ["edk2-2026.08-acme.3", "edk2-2022.11"]
    assert all(e["snp"] == "ok" for e in facts["efifw"])
    assert facts["efifw"][0]["image"]["sha256"] == \
        "3e4fd0b3fe3b2dbe481c3d9e99418a034174f26cbe1f55aa212b0f18c12d2d6f"
    assert [s["name"] for s in facts["sections"]] == [".text", ".sbat", ".efifw", ".efifw"]

    for fwid, name in [("edk2-2026.08-acme.3", AMDSEV), ("edk2-2022.11", BOOKWORM)]:
        target = tmp_path / f"{fwid}.fd"
        rc, _, _ = run(capsys, "addon", "extract", two_fw_addon, "--fwid", fwid, "-o", target)
        assert rc == 0
        assert target.read_bytes() == (firmware_dir / name).read_bytes()


def test_inspect_text(two_fw_addon, capsys):
    rc, stdout, _ = run(capsys, "addon", "inspect", two_fw_addon)
    assert rc == 0
    assert "fwid edk2-2026.08-acme.3: 4194304 bytes" in stdout
    assert "SEV metadata: 7 sections" in stdout


def test_extract_without_fwid_from_two_is_a_usage_error(tmp_path, two_fw_addon, capsys):
    rc, _, err = run(capsys, "addon", "extract", two_fw_addon, "-o", tmp_path / "x")
    assert rc == 2
    assert err.startswith("error: add-on holds 2 firmware images")
    assert not (tmp_path / "x").exists()


def test_build_refuses_firmware_without_sev_metadata(tmp_path, firmware_dir, capsys):
    rc, _, err = run(capsys, "addon", "build", "--firmware", firmware_dir / NO_SEV, "--fwid", "x",
                     "-o", tmp_path / "x.efi")
    assert rc == 2 and "no SEV metadata" in err
    assert not (tmp_path / "x.efi").exists()
    rc, _, _ = run(capsys, "addon", "build", "--firmware", firmware_dir / NO_SEV, "--fwid", "x",
                   "-o", tmp_path / "x.efi", "--unsafe-skip-firmware-check")
    assert rc == 0
    rc, stdout, _ = run(capsys, "addon", "inspect", tmp_path / "x.efi", "--json")
    assert json.loads(stdout)["efifw"][0]["snp"].startswith("refused: firmware has no SEV metadata")


def test_build_needs_matching_fwids(tmp_path, firmware_dir, capsys):
    rc, _, err = run(capsys, "addon", "build", "--firmware", firmware_dir / AMDSEV, "-o", tmp_path / "x.efi")
    assert rc == 2 and "one --fwid for each --firmware" in err


@pytest.mark.parametrize("content,match", [
    (b"", "not a PE file"),
    (b"MZ" + bytes(30), "not a valid PE file"),
    (b"hello world", "not a PE file"),
])
def test_malformed_addon_exit_2(tmp_path, capsys, content, match):
    bad = tmp_path / "bad.efi"
    bad.write_bytes(content)
    for argv in (["addon", "inspect", bad], ["addon", "extract", bad, "-o", tmp_path / "o"]):
        rc, _, err = run(capsys, *argv)
        assert rc == 2
        assert err.startswith("error:") and match in err
        assert "Traceback" not in err


def test_missing_file_exit_2(tmp_path, capsys):
    rc, _, err = run(capsys, "addon", "inspect", tmp_path / "nope.efi")
    assert rc == 2 and "cannot read add-on" in err


def test_measure_text_and_json(firmware_dir, capsys):
    rc, stdout, _ = run(capsys, "measure", firmware_dir / AMDSEV, "--vcpus", "1,4", "--vcpu-type", "EPYC-v4,EPYC-Milan")
    assert rc == 0
    assert V4_1 in stdout and MILAN_4 in stdout
    rc, stdout, _ = run(capsys, "measure", firmware_dir / AMDSEV, "--vcpus", "1-4", "--vcpu-type", "EPYC-Milan",
                        "--vmm", "qemu,ec2", "--json")
    doc = json.loads(stdout)
    assert doc["sev_snp_measure"] == "0.0.13"
    assert doc["snp_ovmf_hash"].startswith("9d0dd8be")
    assert len(doc["measurements"]) == 8
    row = [m for m in doc["measurements"] if m["vmm"] == "qemu" and m["vcpus"] == 4][0]
    assert row["measurement"] == MILAN_4
    assert row["shape"] == "vcpus=4,vcpu_type=EPYC-Milan,vmm=qemu,guest_features=0x1"


def test_measure_an_addon_by_fwid(two_fw_addon, capsys):
    rc, stdout, _ = run(capsys, "measure", two_fw_addon, "--fwid", "edk2-2026.08-acme.3", "--json")
    assert rc == 0
    doc = json.loads(stdout)
    assert doc["firmware"]["fwid"] == "edk2-2026.08-acme.3"
    assert doc["measurements"][0]["measurement"] == V4_1


def test_measure_refuses_no_sev_metadata_image(firmware_dir, capsys):
    rc, stdout, err = run(capsys, "measure", firmware_dir / NO_SEV)
    assert rc == 2
    assert stdout == ""
    assert "no SEV metadata" in err


def test_measure_kernel_hashes(tmp_path, firmware_dir, capsys):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"kernel")
    rc, stdout, _ = run(capsys, "measure", firmware_dir / AMDSEV, "--kernel", kernel, "--append", "quiet", "--json")
    assert rc == 0
    doc = json.loads(stdout)
    assert doc["measurements"][0]["kernel_hashes"]["kernel"] == hashlib.sha256(b"kernel").hexdigest()
    assert doc["measurements"][0]["measurement"] != V4_1
    rc, _, err = run(capsys, "measure", firmware_dir / "edk2-2025.02-OVMF.fd", "--kernel", kernel)
    assert rc == 2 and "SNP_KERNEL_HASHES" in err
    rc, _, err = run(capsys, "measure", firmware_dir / AMDSEV, "--append", "quiet")
    assert rc == 2 and "need --kernel" in err


@pytest.mark.parametrize("argv,match", [
    (["--vcpus", "one"], "--vcpus"),
    (["--vcpu-type", "Pentium"], "--vcpu-type"),
    (["--vmm", "xen"], "--vmm"),
    (["--vcpus", "0"], "vcpus must be"),
    (["--guest-features", "0x1-0x5"], "--guest-features: '0x1-0x5' is not a number"),
    (["--vcpus", "8-1"], "--vcpus"),
    (["--vcpus", "1-4096", "--vcpu-type", ",".join(["EPYC-v4", "EPYC-Milan", "EPYC-Genoa", "EPYC-Rome"]),
      "--vmm", "qemu,ec2,gce", "--guest-features", "1,3,5,7,9"], "above the limit"),
])
def test_measure_usage_errors(firmware_dir, capsys, argv, match):
    rc, _, err = run(capsys, "measure", firmware_dir / AMDSEV, *argv)
    assert rc == 2 and match in err


def test_measure_progress_on_stderr_for_large_tables(firmware_dir, capsys, tmp_path):
    rc, _, err = run(capsys, "measure", firmware_dir / AMDSEV, "--vcpus", "1-16", "--vcpu-type", "EPYC-v4,EPYC-Milan",
                     "--cache-dir", tmp_path / "cache")
    assert rc == 0
    assert "measuring: 32/32 shapes" in err
    assert any((tmp_path / "cache").rglob("*.json"))


def test_console_script_exit_code(tmp_path, firmware_dir):
    bad = tmp_path / "bad.efi"
    bad.write_bytes(b"MZ" + bytes(1000))
    proc = subprocess.run([sys.executable, "-m", "verifier.cli", "addon", "inspect", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and "Traceback" not in proc.stderr


def test_igvm_is_packed_checked_and_measured(tmp_path, capsys, firmware_dir):
    from verifier.measure.igvm import measure_igvm
    igvm = tmp_path / "fw.igvm"
    rc, _, _ = run(capsys, "igvm-from-ovmf", firmware_dir / "edk2-2025.02-OVMF.fd", "--vcpus", "2",
                   "--vcpu-type", "EPYC-Milan", "-o", igvm)
    assert rc == 0
    out = tmp_path / "igvm.efi"
    rc, _, _ = run(capsys, "addon", "build", "--firmware", igvm, "--fwid", "coconut-1", "-o", out)
    assert rc == 0
    rc, stdout, _ = run(capsys, "addon", "inspect", out, "--json")
    entry = json.loads(stdout)["efifw"][0]
    assert entry["image"]["kind"] == "igvm" and entry["snp"] == "ok"
    rc, stdout, _ = run(capsys, "measure", out, "--vcpus", "1-4", "--vcpu-type", "EPYC-v4,EPYC-Milan", "--json")
    doc = json.loads(stdout)
    expected = measure_igvm(igvm.read_bytes()).digest.hex()
    assert rc == 0 and doc["igvm"]["measurement"] == expected and doc["igvm"]["zero_page_rule"] == "qemu"
    assert doc["measurements"] == [{"shape": "vcpus=2,vcpu_type=EPYC-Milan,vmm=qemu,guest_features=0x1",
                                    "measurement": expected}]
    rc, stdout, _ = run(capsys, "measure", igvm, "--zero-page-rule", "native-zero")
    assert rc == 0 and "measurement (zero-page rule native-zero)" in stdout
    assert "requested shapes it launches as: none" in stdout   # the default shape has 1 vCPU, the file 2


def test_bad_igvm_is_refused_by_build_and_measure(tmp_path, capsys):
    igvm = tmp_path / "fw.igvm"
    igvm.write_bytes(b"IGVM" + (1).to_bytes(4, "little") + bytes(8192 - 8))
    rc, _, err = run(capsys, "addon", "build", "--firmware", igvm, "--fwid", "x", "-o", tmp_path / "o.efi")
    assert rc == 2 and "IGVM fixed header" in err
    rc, _, err = run(capsys, "measure", igvm)
    assert rc == 2 and err.count("\n") == 1 and "IGVM fixed header: total_file_size" in err


def test_inspect_lists_hwids(tmp_path, capsys):
    import struct
    import uuid

    from verifier.firmware.addon import build_addon
    chid = uuid.UUID("2bd4e8ae-31dc-5a5b-a1a4-2b5b54a3d0a9")
    strings = b"Acme VM\0fw-1\0"
    base = 28 * 2
    hw = struct.pack("<I16sII", (2 << 28) | 28, chid.bytes_le, base, base + 8) + bytes(28) + strings
    path = tmp_path / "hw.efi"
    path.write_bytes(build_addon([("fw-1", b"firmware")], extra_sections=[(".hwids", hw)]))
    rc, stdout, _ = run(capsys, "addon", "inspect", path)
    assert rc == 0
    assert f".hwids uefi-fw chid {chid} name Acme VM fwid fw-1" in stdout


def test_measure_directory_and_missing_file_are_usage_errors(tmp_path, capsys):
    rc, _, err = run(capsys, "measure", tmp_path)
    assert rc == 2 and err.startswith("error: cannot read firmware")
    rc, _, err = run(capsys, "measure", tmp_path / "missing.fd")
    assert rc == 2 and "cannot read firmware" in err


def test_measure_raw_image_with_fwid_is_a_usage_error(firmware_dir, capsys):
    rc, _, err = run(capsys, "measure", firmware_dir / AMDSEV, "--fwid", "x")
    assert rc == 2 and "--fwid applies to an add-on" in err


def test_extract_to_unwritable_place(tmp_path, two_fw_addon, capsys):
    rc, _, err = run(capsys, "addon", "extract", two_fw_addon, "--fwid", "edk2-2022.11", "-o",
                     tmp_path / "no" / "such" / "dir" / "fw.fd")
    assert rc == 2 and "cannot write" in err
