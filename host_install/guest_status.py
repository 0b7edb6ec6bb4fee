"""What the guest is told at each launch: the firmware QEMU maps, and how its last request ended.

The answer to an install request is lost when the install relaunches the VM
(the requesting QEMU is gone). So, for a VM with `update_port = true`,
host-install writes <vm>/guest-status.json before every launch, and QEMU
passes it to the guest as fw_cfg file `opt/org.firmgate/status`
(/sys/firmware/qemu_fw_cfg/by_name/opt/org.firmgate/status/raw in Linux):

    {"version": 1,
     "running": "<sha384 of the image this launch maps>", "fwid": "<its fwid>" | null,
     "last": null | {"tx": "<16 hex>", "digest": "<sha384 asked for>", "fwid": ... ,
                     "outcome": "launching" | "committed" | "rolled-back" | "aborted" | "recovered",
                     "reason": "<why it failed>" | null}}

`last` is the most recent install transaction (a guest request or an
operator's install). guest.boot uses it not to ask again for its add-on's
image once that image is in force, or once the host could not boot it. For
the guest this is the host's word, not proof: the attestation is.
"""
from __future__ import annotations

import json
import os
from typing import Any

from .journal import TERMINAL, Journal
from .store import link_target
from .vm import VmDir

MAX_REASON = 300  # the guest reads at most 4 KiB


def _fwid_of(records: list[dict[str, Any]], digest: str | None) -> str | None:
    fwid: str | None = None
    for rec in records:
        if rec.get("event") == "begin":
            if rec.get("new") == digest:
                fwid = rec.get("fwid")
            elif rec.get("old") == digest:
                fwid = rec.get("old_fwid")
        elif rec.get("event") in TERMINAL and rec.get("in_force") == digest:
            fwid = rec.get("fwid")
    return fwid if isinstance(fwid, str) else None


def guest_status(vm: VmDir, journal: Journal) -> dict[str, Any] | None:
    """The status for the launch about to happen (None when no firmware is linked)."""
    running = link_target(vm.firmware_link)
    if running is None:
        return None
    records = journal.records()
    last: dict[str, Any] | None = None
    begins = [r for r in records if r.get("event") == "begin" and r.get("kind") == "install"]
    if begins:
        begin = begins[-1]
        tx = begin.get("tx")
        events = {r.get("event"): r for r in records if r.get("tx") == tx}
        reason = None
        if "rolled-back" in events or "aborted" in events:
            outcome = "rolled-back" if "rolled-back" in events else "aborted"
            reason = events.get("rolled-back", events.get("aborted", {})).get("reason")
        elif "boot-failed" in events:  # this launch is the rollback's relaunch
            outcome, reason = "rolled-back", events["boot-failed"].get("reason")
        elif "recovered" in events:
            outcome = "recovered"
        elif "committed" in events:
            outcome = "committed"
        else:
            outcome = "launching"
        last = {"tx": tx, "digest": begin.get("new"), "fwid": begin.get("fwid"), "outcome": outcome,
                "reason": str(reason)[:MAX_REASON] if reason is not None else None}
    return {"version": 1, "running": running, "fwid": _fwid_of(records, running), "last": last}


def write_guest_status(vm: VmDir, journal: Journal) -> None:
    """Write <vm>/guest-status.json for the next launch (only VMs with an update port get one)."""
    if not vm.config.update_port:
        return
    doc = guest_status(vm, journal)
    path = vm.guest_status_path
    try:
        if doc is None:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError:  # never block a launch on it; a stale file would mislead the guest, so drop it
        path.unlink(missing_ok=True)
