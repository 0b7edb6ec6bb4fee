"""At boot, inside the VM: say which firmware runs, and ask the host once for the add-on's firmware.

`firmgate-guest-boot` (python -m guest.boot) runs once per boot, early (the
test image's /init, or the systemd unit of docs/host.md). It

1. prints the firmware's own identity from SMBIOS type 0 (/sys/class/dmi/id:
   bios_vendor, bios_version, bios_date), which the firmware writes itself;
2. finds the UKI firmware add-on on the ESP where systemd-stub looks for it
   (`EFI/Linux/<uki>.efi.extra.d/*.addon.efi`, global `loader/addons/*.addon.efi`)
   and reads it with the verifier's bounded reader;
3. reads what the host says about the firmware (fw_cfg file
   `opt/org.firmgate/status`, written by host-install at each launch: the
   SHA-384 of the image QEMU maps, and the outcome of the last request);
4. asks the host (`org.firmgate.update` virtio-serial port, guest.update) to
   install the add-on's firmware, unless it is in force already, or the host
   already tried that very image and could not boot it (so a bad image never
   makes the VM ask, relaunch and ask again forever).

The host's status is untrusted input, used only to avoid asking twice: a host
that lies can only make the guest not ask (it could refuse anyway), and what
the VM really runs is proven by its attestation (the MEASUREMENT), never by
this file. Every line printed starts with "firmgate-guest: " and is made
printable (host strings cannot inject control characters into the console).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "firmgate-guest: "
UP_MARKER = PREFIX + "up"    # printed first: host-install's boot_marker for this guest (docs/host.md)
STATUS_FWCFG = "/sys/firmware/qemu_fw_cfg/by_name/opt/org.firmgate/status/raw"
STATUS_MAX = 4096            # the host writes a few hundred bytes; more is not ours
DMI_DIR = "/sys/class/dmi/id"
DMI_FIELD_MAX = 256
DEFAULT_PORT = "/dev/virtio-ports/org.firmgate.update"
# systemd-stub's add-on locations, relative to the ESP (systemd-stub(7): "Companion Files")
ADDON_GLOBS = ("EFI/Linux/*.efi.extra.d/*.addon.efi", "loader/addons/*.addon.efi")
ESP_ROOTS = ("/boot/efi", "/efi", "/boot")
_HEX384 = re.compile(r"[0-9a-f]{96}")
FAILED_OUTCOMES = ("rolled-back", "aborted")


def printable(text: str, limit: int = 300) -> str:
    """Host or file text, safe for a console: control characters shown as \\xNN."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text[:limit])


def say(line: str) -> None:
    print(PREFIX + line, flush=True)


@dataclass(frozen=True)
class FirmwareIdentity:
    """SMBIOS type 0, as the firmware reports it (Linux exports it under /sys/class/dmi/id)."""

    vendor: str | None
    version: str | None
    date: str | None

    def describe(self) -> str:
        if self.version is None and self.vendor is None:
            return "unknown (no SMBIOS type 0)"
        return f"{self.vendor or '?'} {self.version or '?'} ({self.date or '?'})"


def _read_small(path: str | Path, limit: int) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read(limit + 1)
    except OSError:
        return None


def firmware_identity(dmi_dir: str | Path = DMI_DIR) -> FirmwareIdentity:
    def field(name: str) -> str | None:
        raw = _read_small(Path(dmi_dir) / name, DMI_FIELD_MAX)
        if raw is None:
            return None
        return printable(raw[:DMI_FIELD_MAX].decode("utf-8", "replace").strip(), DMI_FIELD_MAX) or None
    return FirmwareIdentity(field("bios_vendor"), field("bios_version"), field("bios_date"))


@dataclass(frozen=True)
class HostStatus:
    """What host-install says at launch: the image QEMU maps, and how the last request ended."""

    running: str                  # SHA-384 of the image in force at this launch
    fwid: str | None
    last_digest: str | None       # the image the last install request asked for
    last_outcome: str | None      # "launching" | "rolled-back" | "aborted" | ...
    last_reason: str | None


def parse_host_status(raw: bytes) -> HostStatus:
    """Parse the fw_cfg status file; ValueError (with a reason) for anything malformed."""
    if len(raw) > STATUS_MAX:
        raise ValueError(f"status is larger than {STATUS_MAX} bytes")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"status is not UTF-8 JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != 1 or type(doc.get("version")) is not int:
        raise ValueError("status is not a version-1 object")
    running = doc.get("running")
    if not isinstance(running, str) or not _HEX384.fullmatch(running):
        raise ValueError("status.running is not a SHA-384 hex digest")

    def opt_str(value: Any, what: str, pattern: re.Pattern[str] | None = None) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or len(value) > 1024 or (pattern and not pattern.fullmatch(value)):
            raise ValueError(f"status.{what} is malformed")
        return value
    last = doc.get("last")
    if last is not None and not isinstance(last, dict):
        raise ValueError("status.last is not an object")
    last = last or {}
    return HostStatus(running, opt_str(doc.get("fwid"), "fwid"),
                      opt_str(last.get("digest"), "last.digest", _HEX384),
                      opt_str(last.get("outcome"), "last.outcome"), opt_str(last.get("reason"), "last.reason"))


def read_host_status(path: str | Path = STATUS_FWCFG) -> tuple[HostStatus | None, str]:
    """(status, "") or (None, why not)."""
    raw = _read_small(path, STATUS_MAX)
    if raw is None:
        return None, "the host publishes no firmware status (no fw_cfg opt/org.firmgate/status)"
    try:
        return parse_host_status(raw), ""
    except ValueError as exc:
        return None, f"ignoring the host's firmware status: {exc}"


def find_addons(esp_roots: Sequence[str | Path] = ESP_ROOTS) -> list[Path]:
    """Firmware add-on candidates on the ESP, in systemd-stub's places (sorted, de-duplicated)."""
    found: dict[str, Path] = {}
    for root in esp_roots:
        for pattern in ADDON_GLOBS:
            for name in sorted(glob.glob(os.path.join(glob.escape(str(root)), pattern))):
                p = Path(name)
                if p.is_file():
                    found.setdefault(os.path.realpath(p), p)
    return list(found.values())


@dataclass(frozen=True)
class Decision:
    ask: bool
    why: str


def decide(addon_digest: str, status: HostStatus | None) -> Decision:
    """Whether to ask the host for the add-on's image (addon_digest: SHA-384 of that image)."""
    if status is None:
        # No word from the host: ask; a host whose firmware is already this one answers "unchanged".
        return Decision(True, "the host did not say which firmware is in force")
    if status.running == addon_digest:
        return Decision(False, "the add-on's firmware is in force; not asking")
    if status.last_digest == addon_digest and status.last_outcome in FAILED_OUTCOMES:
        reason = printable(status.last_reason or "no reason given")
        return Decision(False, f"the host tried the add-on's firmware and could not boot it ({reason}); "
                               "not asking again")
    return Decision(True, "the add-on's firmware is not in force")


def find_port(name: str = "org.firmgate.update", sys_dir: str = "/sys/class/virtio-ports",
              dev_dir: str = "/dev") -> str | None:
    """The port's device: udev's /dev/virtio-ports/<name> link, else found by name in sysfs (no udev)."""
    link = os.path.join(dev_dir, "virtio-ports", name)
    if os.path.exists(link):
        return link
    for entry in sorted(glob.glob(os.path.join(sys_dir, "vport*"))):
        raw = _read_small(os.path.join(entry, "name"), 256)
        if raw is not None and raw.strip() == name.encode():
            dev = os.path.join(dev_dir, os.path.basename(entry))
            if os.path.exists(dev):
                return dev
    return None


def run(*, esp_roots: Sequence[str | Path] = ESP_ROOTS, addon: str | None = None, fwid: str | None = None,
        port: str | None = None, status_path: str | Path = STATUS_FWCFG, dmi_dir: str | Path = DMI_DIR,
        request: Callable[[str, bytes, str | None], dict[str, Any]] | None = None) -> int:
    """One boot's work; returns an exit code (0 nothing to do or done, 1 refused, 2 bad add-on/config)."""
    from verifier.errors import FirmgateError
    from verifier.firmware.addon import MAX_ADDON_SIZE, read_addon

    say("up")
    ident = firmware_identity(dmi_dir)
    say(f"firmware (SMBIOS): {ident.describe()}")
    status, why_none = read_host_status(status_path)
    if status is not None:
        say(f"host says in force: {printable(status.fwid or '?')} sha384 {status.running[:16]}")
    else:
        say(why_none)
    paths = [Path(addon)] if addon else find_addons(esp_roots)
    if not paths:
        say("no firmware add-on on the ESP; nothing to ask")
        return 0
    if len(paths) > 1:
        say("several firmware add-ons on the ESP (" + ", ".join(printable(str(p)) for p in paths)
            + "); pass --addon to choose one")
        return 2
    path = paths[0]
    try:
        raw = _read_small(path, MAX_ADDON_SIZE)
        if raw is None or len(raw) > MAX_ADDON_SIZE:
            raise FirmgateError(f"cannot read it, or larger than {MAX_ADDON_SIZE} bytes")
        entry = read_addon(raw).select(fwid)
    except FirmgateError as exc:
        say(f"add-on {printable(str(path))} refused: {printable(exc.diagnostics())}")
        return 2
    digest = hashlib.sha384(entry.payload).hexdigest()
    say(f"add-on {printable(str(path))}: fwid {printable(entry.fwid)} sha384 {digest[:16]}")
    decision = decide(digest, status)
    say(decision.why)
    if not decision.ask:
        return 0
    dev = port or find_port()
    if dev is None:
        say("no org.firmgate.update port (the host gave this VM no update channel)")
        return 2
    say(f"asking the host to install {printable(entry.fwid)} over {printable(dev)}")
    if request is None:
        from .update import request_update
        request = request_update
    try:
        answer = request(dev, raw, entry.fwid)
    except FirmgateError as exc:
        say(f"no answer: {printable(exc.diagnostics())}")
        return 3
    ok = answer.get("ok") is True
    say(f"host answered {printable(str(answer.get('status')))}"
        + ("" if ok else f": {printable(str(answer.get('error')))}"))
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="firmgate-guest-boot", description=__doc__.splitlines()[0])
    p.add_argument("--addon", help="the add-on (default: the one systemd-stub would load from the ESP)")
    p.add_argument("--fwid", help="which .efifw entry to ask for (default: the only one)")
    p.add_argument("--esp", action="append", help="ESP mount point to search (repeatable; default "
                   + ", ".join(ESP_ROOTS) + ")")
    p.add_argument("--port", help=f"update channel (default {DEFAULT_PORT}, or the port found in sysfs)")
    args = p.parse_args(argv)
    return run(esp_roots=args.esp or ESP_ROOTS, addon=args.addon, fwid=args.fwid, port=args.port)


if __name__ == "__main__":
    sys.exit(main())
