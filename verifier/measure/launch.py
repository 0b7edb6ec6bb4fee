"""Expected SEV-SNP launch measurements for one firmware and many VM shapes.

Typed inputs over sev-snp-measure (pinned 0.0.13); the measurement itself is
sev-snp-measure's (GCTX, snp_update_metadata_pages, VMSA), never re-derived here.
What firmgate adds: refusing firmware that is not an SNP firmware first
(sev-snp-measure measures it without complaint), and the order of work:

1. one pass over the firmware pages (what `calc_snp_ovmf_hash` computes: the
   "snp:ovmf-hash" seed), reused for every shape;
2. per (VMM, kernel hashes): the SEV metadata pages, from that seed;
3. per (vCPU type, guest features): the BSP and AP VMSA pages; shapes that
   differ only in vCPU count extend one chain, smallest count first.

Each step is exactly the sequence `snp_calc_launch_digest` performs with
`snp_ovmf_hash_str` set, so every table entry equals what the
`sev-snp-measure --mode snp --snp-ovmf-hash ...` command line prints.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import version as _dist_version
from pathlib import Path
from typing import Literal, Protocol, get_args

from sevsnpmeasure import guest as _ssm_guest
from sevsnpmeasure.gctx import GCTX
from sevsnpmeasure.ovmf import FOUR_GB, OVMF
from sevsnpmeasure.sev_hashes import SevHashes
from sevsnpmeasure.sev_mode import SevMode
from sevsnpmeasure.vcpu_types import CPU_SIGS
from sevsnpmeasure.vmm_types import VMMType
from sevsnpmeasure.vmsa import VMSA

from ..errors import FirmwareError, UsageError
from ..firmware.image import IGVM_MAGIC, PAGE, FirmwareImage, require_snp_firmware
from .igvm import IgvmMeasurement, measure_igvm

SEV_SNP_MEASURE_VERSION = _dist_version("sev-snp-measure")
MEASUREMENT_SIZE = 48  # SHA-384: MEASUREMENT field of the SNP report (ABI spec 56860, Table 23)


class MeasurementCache(Protocol):
    """What measurement_table needs of a cache (cache.MeasurementCache is the on-disk one).

    A protocol here, so that launch.py does not import cache.py, which imports launch's constants.
    """

    def get(self, fw_sha384: str, shape_key: str) -> bytes | None: ...
    def put(self, fw_sha384: str, shape_key: str, measurement: bytes) -> None: ...
    def get_seed(self, fw_sha384: str) -> bytes | None: ...
    def put_seed(self, fw_sha384: str, seed: bytes) -> None: ...

Vmm = Literal["qemu", "ec2", "gce"]
VMMS: tuple[str, ...] = get_args(Vmm)
_VMM_TYPES = {"qemu": VMMType.QEMU, "ec2": VMMType.ec2, "gce": VMMType.gce}
VCPU_TYPES: tuple[str, ...] = tuple(CPU_SIGS)
# KVM_MAX_VCPUS on x86-64 is 4096: no SNP guest can have more, and each vCPU
# costs one SHA-384 per shape, so the bound also caps the work per shape.
MAX_VCPUS = 4096
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class KernelHashes:
    """SHA-256 of the kernel, initrd and command line that QEMU puts in the
    SEV hashes table (`-kernel/-initrd/-append` with kernel-hashes=on)."""

    kernel: bytes
    initrd: bytes
    cmdline: bytes

    def __post_init__(self) -> None:
        for name in ("kernel", "initrd", "cmdline"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != 32:
                raise UsageError(f"kernel hashes: {name} must be a 32-byte SHA-256 digest")

    @classmethod
    def from_files(cls, kernel: str | Path, initrd: str | Path | None = None,
                   append: str | None = None) -> KernelHashes:
        """The digests exactly as sev-snp-measure computes them from these files."""
        try:
            h = SevHashes(str(kernel), str(initrd) if initrd else "", append or "")
        except OSError as exc:
            raise UsageError(f"cannot read kernel/initrd: {exc}") from exc
        return cls(kernel=h.kernel_hash, initrd=h.initrd_hash, cmdline=h.cmdline_hash)

    @classmethod
    def from_bytes(cls, kernel: bytes, initrd: bytes | None = None, append: str | None = None) -> KernelHashes:
        """Same digests as from_files, for inputs already in memory (sev_hashes.py rules:
        no initrd hashes as empty; the command line is hashed with its NUL)."""
        return cls(kernel=hashlib.sha256(kernel).digest(),
                   initrd=hashlib.sha256(initrd or b"").digest(),
                   cmdline=hashlib.sha256((append or "").encode() + b"\0").digest())


@dataclass(frozen=True)
class Shape:
    """One VM shape: everything besides the firmware that the launch measurement depends on."""

    vcpus: int
    vcpu_type: str
    vmm: Vmm = "qemu"
    guest_features: int = 0x1
    kernel_hashes: KernelHashes | None = None

    def __post_init__(self) -> None:
        if isinstance(self.vcpus, bool) or not isinstance(self.vcpus, int) or not 1 <= self.vcpus <= MAX_VCPUS:
            raise UsageError(f"vcpus must be an integer 1..{MAX_VCPUS}, got {self.vcpus!r}")
        if self.vcpu_type not in CPU_SIGS:
            raise UsageError(f"unknown vcpu type {self.vcpu_type!r}; known: {', '.join(VCPU_TYPES)}")
        if self.vmm not in _VMM_TYPES:
            raise UsageError(f"unknown vmm {self.vmm!r}; expected one of {', '.join(VMMS)}")
        if not isinstance(self.guest_features, int) or not 0 <= self.guest_features < 1 << 64:
            raise UsageError(f"guest_features must be a 64-bit value, got {self.guest_features!r}")
        # Shapes are dict keys several times per table entry; the generated
        # dataclass __hash__ rebuilds a tuple each call (half the per-shape cost).
        object.__setattr__(self, "_hash", hash((self.vcpus, self.vcpu_type, self.vmm, self.guest_features,
                                                self.kernel_hashes)))

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined, no-any-return]

    def __reduce__(self) -> tuple[type[Shape], tuple[object, ...]]:
        # Rebuild through the constructor: a pickled _hash would be stale in a
        # process with another string-hash seed.
        return (Shape, (self.vcpus, self.vcpu_type, self.vmm, self.guest_features, self.kernel_hashes))

    @property
    def vcpu_sig(self) -> int:
        return int(CPU_SIGS[self.vcpu_type])

    def key(self) -> str:
        """Stable text form; Shape.parse(s.key()) == s."""
        parts = [f"vcpus={self.vcpus}", f"vcpu_type={self.vcpu_type}", f"vmm={self.vmm}",
                 f"guest_features={self.guest_features:#x}"]
        kh = self.kernel_hashes
        if kh is not None:
            parts += [f"kernel={kh.kernel.hex()}", f"initrd={kh.initrd.hex()}", f"cmdline={kh.cmdline.hex()}"]
        return ",".join(parts)

    def __str__(self) -> str:
        return self.key()

    @classmethod
    def parse(cls, text: str) -> Shape:
        """Parse the key() form (fields in any order; guest_features and vmm optional)."""
        fields: dict[str, str] = {}
        for part in text.strip().split(","):
            name, sep, value = part.partition("=")
            name, value = name.strip(), value.strip()
            if not sep or not name:
                raise UsageError(f"shape {text!r}: expected name=value, got {part!r}")
            if name in fields:
                raise UsageError(f"shape {text!r}: {name} given twice")
            fields[name] = value
        known = {"vcpus", "vcpu_type", "vmm", "guest_features", "kernel", "initrd", "cmdline"}
        extra = set(fields) - known
        if extra:
            raise UsageError(f"shape {text!r}: unknown field(s) {', '.join(sorted(extra))}")
        if "vcpus" not in fields or "vcpu_type" not in fields:
            raise UsageError(f"shape {text!r}: vcpus and vcpu_type are required")
        if not re.fullmatch(r"[0-9]{1,5}", fields["vcpus"]):
            raise UsageError(f"shape {text!r}: vcpus must be a decimal number")
        try:
            features = int(fields.get("guest_features", "0x1"), 0)
        except ValueError as exc:
            raise UsageError(f"shape {text!r}: guest_features is not a number") from exc
        hashes = [fields.get(n) for n in ("kernel", "initrd", "cmdline")]
        kh = None
        if any(h is not None for h in hashes):
            if not all(h is not None and re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes):
                raise UsageError(f"shape {text!r}: kernel, initrd and cmdline must all be 64 hex digits")
            kh = KernelHashes(*(bytes.fromhex(h) for h in hashes if h is not None))
        vmm = fields.get("vmm", "qemu")
        if vmm not in _VMM_TYPES:
            raise UsageError(f"shape {text!r}: unknown vmm {vmm!r}; expected one of {', '.join(VMMS)}")
        return cls(vcpus=int(fields["vcpus"]), vcpu_type=fields["vcpu_type"], vmm=vmm,  # type: ignore[arg-type]
                   guest_features=features, kernel_hashes=kh)


# -- sev-snp-measure adapters ---------------------------------------------------
class _InMemoryOVMF(OVMF):  # type: ignore[misc]
    """sev-snp-measure's OVMF over bytes already checked by require_snp_firmware
    (its constructor only reads a file, then runs these same parsers)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._parse_footer_table()
        self._parse_sev_metadata()
        self._gpa = FOUR_GB - len(data)


class _Hashes(SevHashes):  # type: ignore[misc]
    """SevHashes from digests we already hold (its constructor reads files)."""

    def __init__(self, kh: KernelHashes) -> None:
        self.kernel_hash, self.initrd_hash, self.cmdline_hash = kh.kernel, kh.initrd, kh.cmdline


@dataclass(frozen=True)
class PreparedFirmware:
    """A firmware that passed require_snp_firmware, parsed by sev-snp-measure too."""

    data: bytes
    image: FirmwareImage
    ovmf: OVMF


def prepare_firmware(firmware: bytes) -> PreparedFirmware:
    """Refuse non-SNP firmware, then parse it with sev-snp-measure and cross-check the two parsers."""
    data = bytes(firmware)
    image = require_snp_firmware(data)
    if image.kind == "igvm":
        raise FirmwareError("firmware is an IGVM file: it is measured by verifier.measure.igvm "
                            "(measurement_table does so), not as an OVMF ROM")
    try:
        ovmf = _InMemoryOVMF(data)
        theirs = [(d.gpa, d.size, d.section_type_int) for d in ovmf.metadata_items()]
        eip = ovmf.sev_es_reset_eip()
    except (ValueError, RuntimeError, KeyError) as exc:
        raise FirmwareError(f"sev-snp-measure cannot parse this firmware: {exc}") from exc
    ours = [(s.gpa, s.size, s.type_id) for s in image.sev_metadata or ()]
    if theirs != ours or eip != image.sev_es_reset_eip:
        raise FirmwareError("firmgate and sev-snp-measure read different SEV metadata from this firmware; refusing it")
    return PreparedFirmware(data=data, image=image, ovmf=ovmf)


def firmware_seed(fw: PreparedFirmware) -> bytes:
    """The firmware-pages-only digest (`calc_snp_ovmf_hash`, "snp:ovmf-hash")."""
    gctx = GCTX()
    gctx.update_normal_pages(fw.ovmf.gpa(), fw.ovmf.data())
    return bytes(gctx.ld())


def _check_kernel_hashes(fw: PreparedFirmware) -> None:
    sections = [s for s in fw.image.sev_metadata or () if s.type == "SNP_KERNEL_HASHES"]
    if not sections:
        raise FirmwareError("kernel hashes given, but the firmware has no SNP_KERNEL_HASHES section")
    gpa = fw.image.sev_hash_table_gpa or 0
    table_len = len(_Hashes(KernelHashes(bytes(32), bytes(32), bytes(32))).construct_table())
    for s in sections:
        # sev-snp-measure writes the table into one page at gpa's offset (guest.py snp_update_kernel_hashes)
        if s.size != PAGE or (gpa & (PAGE - 1)) + table_len > PAGE:
            raise FirmwareError(f"SNP_KERNEL_HASHES section at {s.gpa:#x} cannot hold the hashes table at {gpa:#x}")


def _metadata_digest(fw: PreparedFirmware, seed: bytes, vmm: str, kh: KernelHashes | None) -> bytes:
    gctx = GCTX(seed=seed)
    hashes = _Hashes(kh) if kh is not None else None
    try:
        _ssm_guest.snp_update_metadata_pages(gctx, fw.ovmf, hashes, _VMM_TYPES[vmm])
    except (ValueError, RuntimeError, AssertionError) as exc:  # bounded above; this is the last guard
        raise FirmwareError(f"sev-snp-measure refused the firmware's SEV metadata: {exc}") from exc
    return bytes(gctx.ld())


def measurement_table(firmware: bytes, shapes: Iterable[Shape], *, cache: MeasurementCache | None = None,
                      progress: Progress | None = None, igvm_rule: str = "qemu") -> dict[Shape, bytes]:
    """{shape: 48-byte MEASUREMENT} for every shape, one pass over the firmware.

    An IGVM file fixes its own shape (igvm_shape_matches): its table holds only
    the shapes it can launch as, under `igvm_rule` (verifier/measure/igvm.py).
    """
    if bytes(firmware[:4]) == IGVM_MAGIC:
        return igvm_measurement_table(firmware, shapes, rule=igvm_rule)
    return measure_prepared(prepare_firmware(firmware), shapes, cache=cache, progress=progress).measurements


def igvm_shape_matches(m: IgvmMeasurement, shape: Shape) -> bool:
    """Whether a QEMU launch of this IGVM file can have this shape.

    The file fixes the vCPU count (one VP context per vCPU), SEV_FEATURES and the
    CPUID signature QEMU loads into RDX (both in its VMSA); it cannot carry
    kernel hashes and only QEMU launches IGVM. A VMSA whose RDX is no known
    signature names no vCPU type: then every vcpu_type matches (the VMM's CPU
    model shows only in the unmeasured CPUID page).
    """
    known = {int(sig) for sig in CPU_SIGS.values()}
    return (shape.vcpus == m.vcpus and shape.vmm == "qemu" and shape.kernel_hashes is None
            and shape.guest_features == m.sev_features
            and (m.vcpu_sig not in known or shape.vcpu_sig == m.vcpu_sig))


def igvm_measurement_table(firmware: bytes, shapes: Iterable[Shape], *, rule: str = "qemu") -> dict[Shape, bytes]:
    wanted = list(dict.fromkeys(shapes))
    m = measure_igvm(bytes(firmware), rule)
    out = {s: m.digest for s in wanted if igvm_shape_matches(m, s)}
    if wanted and not out:
        raise FirmwareError(f"IGVM firmware launches only as vcpus={m.vcpus}, vmm=qemu, guest_features="
                            f"{m.sev_features:#x}, vcpu signature {m.vcpu_sig:#x}: none of the {len(wanted)} "
                            "shapes matches")
    return out


@dataclass(frozen=True)
class Table:
    seed: bytes | None                    # snp:ovmf-hash; None when every shape came from the cache
    measurements: dict[Shape, bytes]


def measure_prepared(fw: PreparedFirmware, shapes: Iterable[Shape], *, cache: MeasurementCache | None = None,
                     progress: Progress | None = None) -> Table:
    """measurement_table for a firmware already through prepare_firmware; also returns the seed."""
    wanted = list(dict.fromkeys(shapes))
    total = len(wanted)
    if any(s.kernel_hashes is not None for s in wanted):
        _check_kernel_hashes(fw)
    # The firmware digest only keys the cache: hashing 4 MiB again is not free.
    fw_digest = fw.image.sha384 if cache is not None else ""
    out: dict[Shape, bytes] = {}
    if cache is not None:
        for s in wanted:
            hit = cache.get(fw_digest, s.key())
            if hit is not None:
                out[s] = hit
    todo = [s for s in wanted if s not in out]
    done = len(out)
    if progress is not None:
        progress(done, total)
    if not todo:
        return Table(seed=cache.get_seed(fw_digest) if cache is not None else None,
                     measurements={s: out[s] for s in wanted})

    seed = cache.get_seed(fw_digest) if cache is not None else None
    if seed is None:
        seed = firmware_seed(fw)
        if cache is not None:
            cache.put_seed(fw_digest, seed)

    groups: dict[tuple[str, KernelHashes | None], list[Shape]] = {}
    for s in todo:
        groups.setdefault((s.vmm, s.kernel_hashes), []).append(s)
    for (vmm, kh), members in groups.items():
        meta = _metadata_digest(fw, seed, vmm, kh)
        chains: dict[tuple[int, int], list[Shape]] = {}
        for s in members:
            chains.setdefault((s.vcpu_sig, s.guest_features), []).append(s)
        for (sig, features), chain in chains.items():
            vmsa = VMSA(SevMode.SEV_SNP, fw.ovmf.sev_es_reset_eip(), sig, features, _VMM_TYPES[vmm])
            bsp, ap = bytes(vmsa.bsp_save_area), bytes(vmsa.ap_save_area)
            gctx = GCTX(seed=meta)
            gctx.update_vmsa_page(bsp)  # VMSA.pages(): vCPU 0 is the BSP, the rest APs
            measured = 1
            for s in sorted(chain, key=lambda x: x.vcpus):
                while measured < s.vcpus:
                    gctx.update_vmsa_page(ap)
                    measured += 1
                out[s] = bytes(gctx.ld())
                if cache is not None:
                    cache.put(fw_digest, s.key(), out[s])
                done += 1
                if progress is not None:
                    progress(done, total)
    return Table(seed=seed, measurements={s: out[s] for s in wanted})


def expected_measurement(firmware: bytes, shape: Shape) -> bytes:
    """The MEASUREMENT one shape yields with this firmware."""
    return measurement_table(firmware, [shape])[shape]


def shapes_product(vcpus: Iterable[int], vcpu_types: Iterable[str], vmms: Iterable[str] = ("qemu",),
                   guest_features: Iterable[int] = (0x1,), kernel_hashes: KernelHashes | None = None) -> list[Shape]:
    """Every combination, in a stable order (vmm, vcpu type, features, vcpus)."""
    return [Shape(vcpus=n, vcpu_type=t, vmm=v, guest_features=f, kernel_hashes=kernel_hashes)  # type: ignore[arg-type]
            for v in vmms for t in vcpu_types for f in guest_features for n in vcpus]
