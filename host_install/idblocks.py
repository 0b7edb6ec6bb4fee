"""Pick the owner's signed ID block for the firmware this VM runs, and say what QEMU gets.

vm.toml `id_blocks = "<file>"` names the owner's `firmgate-idblocks/1` set (verifier/idblockset.py;
relative to the VM directory). For a firmware image, host-install recomputes the launch
MEASUREMENT for this VM's shape with the verifier's own measurement code (vCPUs from vm.toml,
vCPU type = `cpu` or EPYC-v4, VMM qemu, SEV features 0x1, no kernel hashes: host-install boots
the ROM with -bios) and takes the block whose launch digest equals it; every block's signatures
are verified on read. `require_id_block = true` refuses firmware without one (exit 2) before
anything on disk changes. QEMU then gets `id-block`, `id-auth`, `author-key-enabled` and the
block's `policy` on its sev-snp-guest object (the PSP refuses a policy other than the block's).
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import TYPE_CHECKING

from verifier.errors import FirmgateError
from verifier.idblockset import SignedLaunch, load_set

from .errors import ImageRejected
from .vm import VmDir

if TYPE_CHECKING:
    from verifier.measure.launch import Shape

DEFAULT_VCPU_TYPE = "EPYC-v4"   # QEMU's usual -cpu for SNP guests (the same default as sim.host)


@dataclass(frozen=True)
class Selection:
    measurement: bytes
    block: SignedLaunch | None
    why: str                    # why there is no block ("" when there is one)


def vm_shape(vm: VmDir) -> Shape:
    from verifier.measure.launch import Shape
    cfg = vm.config
    return Shape(vcpus=cfg.vcpus, vcpu_type=cfg.cpu or DEFAULT_VCPU_TYPE, vmm="qemu", guest_features=0x1)


def select(vm: VmDir, payload: bytes) -> Selection | None:
    """The owner's block for `payload` in this VM's shape; None when the VM names no ID-block set.
    Raises ImageRejected when the VM requires a block and there is none (or the set is unusable)."""
    cfg = vm.config
    if not cfg.id_blocks:
        return None
    from verifier.measure.launch import expected_measurement
    try:
        shape = vm_shape(vm)
        measurement = expected_measurement(payload, shape)
        blocks = load_set(vm.rel(cfg.id_blocks))
    except FirmgateError as exc:
        if cfg.require_id_block:
            raise ImageRejected(f"no usable ID block: {exc.diagnostics()}",
                                "ask the owner for a valid `firmgate idblock sign` set for this firmware") from exc
        return Selection(b"", None, exc.diagnostics())
    block = blocks.for_measurement(measurement)
    if block is None:
        why = (f"the owner's ID-block set has no block for MEASUREMENT {measurement.hex()[:16]}... "
               f"(this firmware in shape {shape.key()})")
        if cfg.require_id_block:
            raise ImageRejected(f"vm.toml requires an ID block and {why}",
                                "ask the owner to run `firmgate idblock sign` for this firmware and shape, "
                                "or set require_id_block = false")
        return Selection(measurement, None, why)
    return Selection(measurement, block, "")


def qemu_properties(sel: Selection | None) -> str:
    """The sev-snp-guest properties for a selection ("" without a block)."""
    if sel is None or sel.block is None:
        return ""
    b = sel.block
    return (f",id-block={base64.b64encode(b.id_block).decode()},id-auth={base64.b64encode(b.id_auth).decode()},"
            f"author-key-enabled={'on' if b.author_key_enabled else 'off'},policy={b.verified.block.policy:#x}")
