"""The table equals what the `sev-snp-measure` command line prints, for every
SEV-capable image in ../shared/firmware: vCPUs 1, 2, 4, 8 x EPYC-v4, EPYC-Milan,
EPYC-Genoa x QEMU, ec2 (the issue's "done when")."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from verifier.measure.launch import measurement_table, shapes_product

SEV_SNP_MEASURE = Path(sys.executable).with_name("sev-snp-measure")
IMAGES = ["edk2-2022.11-OVMF.fd", "edk2-2025.02-OVMF.fd", "edk2-2026.08-OVMF.amdsev.fd"]
VCPUS = [1, 2, 4, 8]
TYPES = ["EPYC-v4", "EPYC-Milan", "EPYC-Genoa"]
CLI_VMM = {"qemu": "QEMU", "ec2": "ec2"}


def _cli(path: Path, *args: str) -> str:
    out = subprocess.run([str(SEV_SNP_MEASURE), "--ovmf", str(path), *args],
                         capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.strip()


@pytest.mark.slow
@pytest.mark.parametrize("vmm", sorted(CLI_VMM))
@pytest.mark.parametrize("name", IMAGES)
def test_table_equals_sev_snp_measure_cli(firmware_dir, name, vmm):
    assert SEV_SNP_MEASURE.exists(), "sev-snp-measure is installed with the project's dependencies"
    path = firmware_dir / name
    shapes = shapes_product(VCPUS, TYPES, [vmm])
    table = measurement_table(path.read_bytes(), shapes)
    assert len(table) == len(VCPUS) * len(TYPES)
    for s in shapes:
        printed = _cli(path, "--mode", "snp", "--vcpus", str(s.vcpus), "--vcpu-type", s.vcpu_type,
                       "--vmm-type", CLI_VMM[vmm], "--guest-features", hex(s.guest_features))
        assert table[s].hex() == printed, s.key()


@pytest.mark.slow
@pytest.mark.parametrize("name", IMAGES)
def test_seed_equals_cli_ovmf_hash(firmware_dir, name):
    from verifier.measure.launch import firmware_seed, prepare_firmware
    path = firmware_dir / name
    assert firmware_seed(prepare_firmware(path.read_bytes())).hex() == _cli(path, "--mode", "snp:ovmf-hash")


@pytest.mark.slow
def test_cli_measures_the_no_sev_image_but_firmgate_refuses_it(firmware_dir):
    """Why firmgate checks first: sev-snp-measure prints a digest for an image QEMU cannot launch."""
    from verifier.errors import FirmwareError
    from verifier.measure.launch import Shape, expected_measurement
    path = firmware_dir / "edk2-2022.11-OVMF_CODE_4M-no-sev-metadata.fd"
    printed = _cli(path, "--mode", "snp", "--vcpus", "1", "--vcpu-type", "EPYC-v4")
    assert len(bytes.fromhex(printed)) == 48
    with pytest.raises(FirmwareError, match="no SEV metadata"):
        expected_measurement(path.read_bytes(), Shape(1, "EPYC-v4"))
