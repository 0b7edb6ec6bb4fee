"""The reference table: allowed firmware x allowed shapes -> expected MEASUREMENT.

Built when a policy loads (issue 3's `measurement_table`, cached on disk), so
an appraisal is one dictionary lookup that also names which firmware and
which shape matched. Revoked firmware stays in the table on purpose: a match
then says "firmware X is revoked" instead of "unknown measurement".

Firmware whose bytes the policy does not hold (`bytes = "uploaded"`) enters
the table when its bytes arrive (uploaded to the broker, or in the guest's
add-on with the evidence): accepted only if its SHA-384 is listed.

Firmware the policy does not list enters only through `add_endorsed`: first the
admission (verifier.endorse.admit: a trusted publisher's valid endorsement of
exactly these bytes), then the same measuring as any listed build. The
endorsement's own measurements are cross-checked against ours, never used.
"""
from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..endorse.admit import Admission, EndorsementRefused, admit
from ..errors import FirmgateError, FirmwareError
from ..measure.launch import KernelHashes, Shape, measurement_table
from ..observe import emit
from .policy import FirmwareEntry, ShapeRule, TenantPolicy, read_firmware_file

MAX_KNOWN_FIRMWARE = 64   # firmware images held in memory per table (each a few MiB)
ENDORSED = "endorsed"     # FirmwareEntry.location of a build admitted by a publisher's endorsement


@dataclass(frozen=True)
class Match:
    firmware: FirmwareEntry
    shape: Shape


def shapes_of(rules: tuple[ShapeRule, ...]) -> list[Shape]:
    """Every concrete Shape the rules allow (vcpus x vcpu_types per rule)."""
    out: list[Shape] = []
    for r in rules:
        kh = (KernelHashes(bytes.fromhex(r.kernel.kernel), bytes.fromhex(r.kernel.initrd),
                           bytes.fromhex(r.kernel.cmdline)) if r.kernel is not None else None)
        for n, t in r.expand():
            out.append(Shape(vcpus=n, vcpu_type=t, vmm=r.vmm,  # type: ignore[arg-type]
                             guest_features=r.guest_features, kernel_hashes=kh))
    return list(dict.fromkeys(out))


def extract_firmware(data: bytes, fwid: str | None = None) -> bytes:
    """The firmware image inside `data`: a UKI add-on's `.efifw` entry, or `data` itself if it is not a PE file."""
    from ..firmware.addon import MAX_ADDON_SIZE, read_addon
    if len(data) > MAX_ADDON_SIZE:
        raise FirmwareError(f"firmware blob is {len(data)} bytes; at most {MAX_ADDON_SIZE}")
    if data[:2] == b"MZ":
        addon = read_addon(data)
        if fwid is not None and fwid in addon.fwids:
            return addon.select(fwid).payload
        if len(addon.entries) == 1:
            return addon.entries[0].payload
        raise FirmwareError(f"add-on holds {len(addon.entries)} firmware images; name the one to use")
    return bytes(data)


def split_firmware(data: bytes, fwid: str | None = None) -> tuple[bytes, tuple[bytes, ...]]:
    """(firmware image, endorsements carried beside it): an add-on's `.corim` sections, none for a raw image."""
    payload = extract_firmware(data, fwid)
    if data[:2] != b"MZ":
        return payload, ()
    from ..firmware.addon import read_addon
    return payload, read_addon(data).endorsements


class ReferenceTable:
    """measurement -> Match; thread-safe (firmware may be added while appraisals run)."""

    def __init__(self, policy: TenantPolicy, cache: object | None = None) -> None:
        self.policy = policy
        self.shapes = shapes_of(policy.shapes)
        self._cache = cache
        self._lock = threading.Lock()
        self._by_measurement: dict[bytes, Match] = {}
        self._measured: set[str] = set()        # firmware ids whose measurements are in the table
        self.missing: dict[str, str] = {}       # firmware id -> why it has no measurements (yet)
        self._endorsed: dict[str, tuple[FirmwareEntry, Admission]] = {}   # sha384 -> admitted build

    # -- building ------------------------------------------------------------------
    def load_files(self) -> None:
        """Measure every firmware whose bytes are a file in the policy directory."""
        base = Path(self.policy.base_dir)
        for fw in self.policy.firmware:
            if fw.uploaded:
                self.missing[fw.id] = "bytes not uploaded yet"
                continue
            try:
                payload = read_firmware_file(base / fw.location, fw.id, root=base)
            except OSError as exc:
                raise FirmwareError(f"firmware {fw.id}: cannot read {fw.location}: {exc.strerror or exc}") from exc
            self.add_payload(fw, payload)

    def add_payload(self, fw: FirmwareEntry, payload: bytes) -> None:
        """Measure `payload` (already known to be firmware `fw`) for every shape and add it."""
        actual = hashlib.sha384(payload).hexdigest()
        if actual != fw.sha384:
            raise FirmwareError(f"firmware {fw.id}: bytes have sha384 {actual[:16]}..., the policy lists "
                                f"{fw.sha384[:16]}...")
        t0 = time.perf_counter()
        table = measurement_table(payload, self.shapes, cache=self._cache)  # type: ignore[arg-type]
        emit("measurement_table", time.perf_counter() - t0)
        with self._lock:
            for shape, m in table.items():
                self._by_measurement.setdefault(m, Match(fw, shape))
            self._measured.add(fw.id)
            self.missing.pop(fw.id, None)

    def add_firmware_bytes(self, data: bytes, fwid: str | None = None) -> FirmwareEntry:
        """Firmware bytes that arrived from outside (an add-on or a raw image): accepted only if listed."""
        try:
            payload = extract_firmware(data, fwid)
        except FirmgateError:
            raise
        digest = hashlib.sha384(payload).hexdigest()
        fw = self.policy.firmware_by_digest(digest)
        if fw is None:
            raise FirmwareError(f"firmware sha384 {digest[:16]}... is not allowed by tenant "
                                f"{self.policy.tenant!r}'s policy")
        if fw.id in self.policy.revoked:
            raise FirmwareError(f"firmware {fw.id} (sha384 {digest[:16]}...) is revoked by the policy")
        with self._lock:
            if fw.id in self._measured:
                return fw
            if len(self._measured) >= MAX_KNOWN_FIRMWARE:
                raise FirmwareError(f"at most {MAX_KNOWN_FIRMWARE} firmware images per policy")
        self.add_payload(fw, payload)
        return fw

    def add_endorsed(self, payload: bytes, endorsements: tuple[bytes, ...], now: int | None = None) -> Admission:
        """Admit `payload` on the first of `endorsements` a trusted publisher signed for it, then measure it.

        EndorsementRefused (naming the endorsement and the reason) when none admits it.
        """
        digest = hashlib.sha384(payload).hexdigest()
        with self._lock:
            known = self._endorsed.get(digest)
        if known is not None:
            return known[1]
        if not self.policy.publishers:
            raise EndorsementRefused(f"tenant {self.policy.tenant!r}'s policy trusts no firmware publisher")
        if not endorsements:
            raise EndorsementRefused(f"firmware sha384 {digest[:16]}... is not listed and came with no endorsement")
        reasons: list[str] = []
        for raw in endorsements[:8]:   # bounded: each costs a signature check
            try:
                adm = admit(self.policy.publishers, raw, digest, now)
            except EndorsementRefused as exc:
                reasons.append(exc.diagnostics())
                continue
            self._measure_endorsed(payload, digest, adm)
            return adm
        raise EndorsementRefused("; ".join(dict.fromkeys(reasons)))

    def _measure_endorsed(self, payload: bytes, digest: str, adm: Admission) -> None:
        e = adm.endorsement
        who = f"endorsement {e.id} of {e.fwid} by publisher {adm.publisher}"
        listed = self.policy.firmware_by_id(e.fwid)
        if listed is not None and listed.sha384 != digest:
            raise EndorsementRefused(f"{who}: the policy lists fwid {e.fwid} with another digest")
        with self._lock:
            other = next((f for f, _ in self._endorsed.values() if f.id == e.fwid), None)
            if other is not None:
                raise EndorsementRefused(f"{who}: fwid {e.fwid} is already admitted with another digest")
            if len(self._measured) >= MAX_KNOWN_FIRMWARE:
                raise FirmwareError(f"at most {MAX_KNOWN_FIRMWARE} firmware images per policy")
        rule = next((p for p in self.policy.publishers if p.key_sha256 == adm.key_sha256), None)
        fw = FirmwareEntry(e.fwid, digest, e.svn, ENDORSED, rule.enforces_boot_chain if rule is not None else None)
        table = measurement_table(payload, self.shapes, cache=self._cache)  # type: ignore[arg-type]
        claimed = dict(e.measurements)
        for shape, m in table.items():   # cross-check only: ours is the reference
            theirs = claimed.get(shape.key())
            if theirs is not None and theirs != m:
                raise EndorsementRefused(f"{who}: its MEASUREMENT for shape {shape.key()} is {theirs.hex()[:16]}..., "
                                         f"recomputed from the bytes it is {m.hex()[:16]}...")
        with self._lock:
            for shape, m in table.items():
                self._by_measurement.setdefault(m, Match(fw, shape))
            self._measured.add(fw.id)
            self._endorsed[digest] = (fw, adm)

    def endorsed(self, sha384_hex: str) -> tuple[FirmwareEntry, Admission] | None:
        """The build admitted by an endorsement with this digest, if any."""
        with self._lock:
            return self._endorsed.get(sha384_hex.lower())

    # -- lookups -----------------------------------------------------------------------
    def lookup(self, measurement: bytes) -> Match | None:
        with self._lock:
            return self._by_measurement.get(bytes(measurement))

    def measured(self, fwid: str) -> bool:
        with self._lock:
            return fwid in self._measured

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_measurement)

    def entries(self) -> list[tuple[bytes, Match]]:
        with self._lock:
            return list(self._by_measurement.items())
