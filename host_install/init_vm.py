"""`host-install init`: a new VM directory with a commented vm.toml.

The keys the operator gave are written as settings; every other key is written commented out at its
default, with one line saying what it does, so the file documents itself (docs/host.md has the table).
"""
from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from .errors import VmConfigError, VmDirError
from .vm import CONFIG_NAME, VmConfig, VmDir, _toml_value, parse_config

# One line per key, in VmConfig's order (a test checks that every key has one).
COMMENTS: dict[str, str] = {
    "qemu": "QEMU binary",
    "machine": "-machine type",
    "accel": '"kvm", "tcg", or "auto" (KVM when /dev/kvm opens, else TCG)',
    "memory_mib": "guest memory in MiB (16 .. 16 TiB)",
    "vcpus": "-smp (1 .. 512)",
    "cpu": '-cpu model, e.g. "EPYC" or "EPYC-Milan" (QEMU 7.2 has no "EPYC-v4"); default: QEMU\'s',
    "extra_args": 'more QEMU arguments (disks, network), e.g. ["-drive", "file=disk.qcow2,if=virtio"]',
    "update_port": "virtio-serial port org.firmgate.update to <vm>/channel.sock (host-install listen)",
    "snp": "an SEV-SNP guest: every image must carry SEV metadata",
    "launch_mode": '"snp" (sev-snp-guest object) or "plain" (same ROM, ordinary VM); default follows snp',
    "firmware_format": '"ovmf", or "igvm" for a VM QEMU launches with -object igvm-cfg (QEMU >= 10.0)',
    "rom_max_bytes": "largest image this VM accepts (64 KiB .. 256 MiB)",
    "id_blocks": "the owner's firmgate-idblocks/1 set, relative to the VM directory (docs/host.md)",
    "require_id_block": "refuse firmware the owner signed no ID block for (needs snp and id_blocks)",
    "cbitpos": "sev-snp-guest C-bit position",
    "reduced_phys_bits": "sev-snp-guest reduced-phys-bits",
    "qmp_socket": "QMP socket, relative to the VM directory",
    "serial_log": "guest serial console log",
    "debug_log": "OVMF debug console log (isa-debugcon 0x402)",
    "boot_marker": "text the firmware prints once it reached boot device selection",
    "kernel": "direct kernel boot: -kernel (relative to the VM directory)",
    "initrd": "direct kernel boot: -initrd (needs kernel)",
    "append": "direct kernel boot: -append, one line (needs kernel)",
    "boot_fail_marker": 'text that proves the boot failed; "" = none',
    "boot_timeout": "seconds for QMP running + boot_marker",
    "stop_timeout": "seconds a guest gets to honour ACPI power-down before QMP quit",
    "acpi_shutdown": '"auto" (power-down only with a boot medium in extra_args), "always" or "never"',
}

_EXAMPLES: dict[str, Any] = {"cpu": "EPYC", "launch_mode": "plain", "id_blocks": "idblocks.json",
                             "kernel": "vmlinuz", "initrd": "initrd.img", "append": "console=ttyS0"}


def commented_toml(config: dict[str, Any]) -> str:
    """vm.toml text: the given keys set, every other key commented out at its default."""
    defaults = VmConfig()
    out = ["# host-install VM configuration (docs/host.md). Uncomment a line to change it.", ""]
    for f in fields(VmConfig):
        out.append(f"# {COMMENTS.get(f.name, 'see docs/host.md')}")  # a test keeps COMMENTS complete
        if f.name in config:
            out.append(f"{f.name} = {_toml_value(config[f.name])}")
        else:
            default = getattr(defaults, f.name)
            shown = _EXAMPLES.get(f.name, default)  # a key without a default shows an example value
            out.append(f"# {f.name} = {_toml_value(shown)}")
    return "\n".join(out) + "\n"


def init_vm(path: str | os.PathLike[str], **config: Any) -> VmDir:
    """Create the VM directory (or use an empty existing one) and write its vm.toml; never overwrite."""
    p = Path(path).absolute()
    known = {f.name for f in fields(VmConfig)}
    unknown = set(config) - known
    if unknown:
        raise VmConfigError(str(p / CONFIG_NAME), None, f"unknown keys {sorted(unknown)}")
    text = commented_toml(config)
    parse_config(text, str(p / CONFIG_NAME))  # the same checks as a hand-written file, before any change
    if (p / CONFIG_NAME).exists():
        raise VmDirError(f"{p} already holds a {CONFIG_NAME}", "edit it, or pick a new directory")
    if p.exists() and not p.is_dir():
        raise VmDirError(f"{p} exists and is not a directory", "pick a new path for the VM directory")
    p.mkdir(parents=True, exist_ok=True)
    tmp = p / (CONFIG_NAME + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    try:
        os.link(tmp, p / CONFIG_NAME)  # fails if another init won the race: never overwrite
    except FileExistsError:
        raise VmDirError(f"{p} already holds a {CONFIG_NAME}", "edit it, or pick a new directory") from None
    finally:
        tmp.unlink()
    return VmDir.open(p)
