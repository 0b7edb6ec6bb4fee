"""Take the firmware out of a guest's add-on and decide whether this VM may run it.

Parsing is the verifier's (verifier.firmware): this module only maps its
answers onto the VM's limits, before anything on disk is touched.
"""
from __future__ import annotations

from dataclasses import dataclass

from verifier.errors import FirmwareError

from .errors import AddonRejected, ImageRejected
from .store import sha384
from .vm import VmDir

ROM_ALIGN = 64 * 1024  # QEMU maps a -bios ROM below 4 GiB in 64 KiB units (hw/i386/x86.c, x86_bios_rom_init)


@dataclass(frozen=True)
class CandidateImage:
    fwid: str
    payload: bytes
    digest: str           # SHA-384 of payload
    kind: str             # "ovmf" | "igvm"
    addon_sha384: str


def extract(addon_bytes: bytes, fwid: str | None) -> tuple[str, bytes, str]:
    """(fwid, payload, add-on sha384) from the add-on, with exit-2 errors a host operator can act on."""
    from verifier.firmware.addon import read_addon

    try:
        addon = read_addon(addon_bytes)
    except FirmwareError as exc:
        raise AddonRejected(f"add-on rejected: {exc.diagnostics()}",
                            "ask the guest owner for a UKI add-on built with `ukify --efifw` "
                            "or `firmgate addon build`") from exc
    try:
        entry = addon.select(fwid)
    except FirmwareError as exc:
        raise AddonRejected(str(exc), f"pass --fwid with one of: {', '.join(addon.fwids)}") from exc
    return entry.fwid, entry.payload, addon.sha384


def check_image(vm: VmDir, fwid: str, payload: bytes, addon_sha384: str = "") -> CandidateImage:
    """The static checks of issue 6: ROM limit, format, SEV metadata (SNP VMs), 64 KiB alignment."""
    from verifier.firmware.image import inspect_firmware, require_snp_firmware

    cfg = vm.config
    size = len(payload)
    if size > cfg.rom_max_bytes:
        raise ImageRejected(f"firmware {fwid!r} is {size} bytes, above this VM's ROM limit of {cfg.rom_max_bytes}",
                            "raise rom_max_bytes in vm.toml if the host allows it, or use a smaller build")
    try:
        info = inspect_firmware(payload)
    except FirmwareError as exc:
        raise ImageRejected(f"firmware {fwid!r} is not a usable image: {exc.diagnostics()}",
                            "the add-on must carry a raw OVMF ROM or an IGVM file") from exc
    if info.kind != cfg.firmware_format:
        raise ImageRejected(f"firmware {fwid!r} is {info.kind}, but this VM launches {cfg.firmware_format} images",
                            "set firmware_format in vm.toml to match how QEMU launches this VM")
    if cfg.snp:  # an IGVM file must select SEV-SNP and pass the strict reader (verifier/firmware/igvm.py)
        try:
            require_snp_firmware(payload)
        except FirmwareError as exc:
            hint = ("use an OVMF build with SEV metadata (e.g. OVMF.amdsev.fd)" if info.kind == "ovmf" else
                    "use an IGVM file with a SEV_SNP platform, its guest policy and one VP context per vCPU")
            raise ImageRejected(f"firmware {fwid!r} cannot launch an SNP guest: {exc.diagnostics()}", hint) from exc
    if info.kind == "ovmf" and (size == 0 or size % ROM_ALIGN):
        raise ImageRejected(f"OVMF image {fwid!r} is {size} bytes, not a multiple of 64 KiB",
                            "a raw OVMF ROM (OVMF.fd / OVMF.amdsev.fd) is always 64 KiB-aligned; rebuild it")
    if cfg.snp and info.kind == "ovmf":
        from .idblocks import select
        select(vm, payload)   # require_id_block: refuse firmware the owner signed no ID block for (exit 2)
    return CandidateImage(fwid=fwid, payload=payload, digest=sha384(payload), kind=info.kind,
                          addon_sha384=addon_sha384)


def candidate_from_addon(vm: VmDir, addon_bytes: bytes, fwid: str | None) -> CandidateImage:
    name, payload, addon_digest = extract(addon_bytes, fwid)
    return check_image(vm, name, payload, addon_digest)
