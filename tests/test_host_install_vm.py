"""vm.toml parsing, VM directories, the content-addressed store, the link and the journal (no QEMU)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from host_install.errors import InstallFailed, VmConfigError, VmDirError
from host_install.journal import Journal
from host_install.qemu import build_command
from host_install.store import Store, link_target, remove_link_temporaries, sha384, switch_link
from host_install.vm import VmConfig, VmDir, parse_config


def test_create_and_reopen_round_trips_config(tmp_path: Path) -> None:
    vm = VmDir.create(tmp_path / "vm", memory_mib=256, vcpus=2, snp=True, extra_args=["-no-reboot"],
                      boot_timeout=7.5)
    again = VmDir.open(tmp_path / "vm")
    assert again.config == vm.config
    assert again.config.extra_args == ("-no-reboot",)
    assert again.config.effective_launch_mode == "snp"
    assert (tmp_path / "vm" / "store").is_dir()


def test_create_refuses_existing_vm_and_unknown_keys(tmp_path: Path) -> None:
    VmDir.create(tmp_path / "vm")
    with pytest.raises(VmDirError, match="already holds"):
        VmDir.create(tmp_path / "vm")
    with pytest.raises(VmConfigError, match="unknown keys"):
        VmDir.create(tmp_path / "other", memroy_mib=256)


def test_missing_dir_and_missing_toml(tmp_path: Path) -> None:
    with pytest.raises(VmDirError, match="does not exist") as e:
        VmDir.open(tmp_path / "nope")
    assert e.value.exit_code == 2 and e.value.hint
    (tmp_path / "empty").mkdir()
    with pytest.raises(VmDirError, match="no vm.toml"):
        VmDir.open(tmp_path / "empty")


@pytest.mark.parametrize("text, line, why", [
    ('memory_mib = 256\nvcpus = = 2\n', 2, "not valid TOML"),
    ('memory_mib = 256\n\nmemroy = 3\n', 3, "unknown key 'memroy'"),
    ('snp = "yes"\n', 1, "snp must be true or false"),
    ('qemu = "q"\nmemory_mib = "256"\n', 2, "memory_mib must be an integer"),
    ('vcpus = 0\n', 1, "vcpus 0 is out of range"),
    ('accel = "hvf"\n', 1, "accel must be one of"),
    ('launch_mode = "snp"\n', 1, 'needs snp = true'),
    ('rom_max_bytes = 100\n', 1, "rom_max_bytes 100 is out of range"),
    ('extra_args = ["-a", 3]\n', 1, "a list of strings"),
    ('qmp_socket = "a,b"\n', 1, "without ','"),
    ('boot_timeout = -1\n', 1, "boot_timeout must be in"),
])
def test_broken_vm_toml_names_line_and_reason(tmp_path: Path, text: str, line: int, why: str) -> None:
    with pytest.raises(VmConfigError) as e:
        parse_config(text, "vm.toml")
    assert e.value.line == line
    assert why in e.value.why
    assert e.value.diagnostics().startswith(f"vm.toml:{line}: ")
    assert e.value.exit_code == 2


def test_too_long_socket_path_is_refused(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)
    with pytest.raises(VmDirError, match="longer than 107"):
        VmDir.create(deep)


def test_build_command_plain_and_snp(tmp_path: Path) -> None:
    plain = VmDir.create(tmp_path / "a", accel="tcg", memory_mib=256, cpu="EPYC-v4", extra_args=["-no-reboot"])
    cmd = build_command(plain)
    assert cmd[0] == "qemu-system-x86_64"
    assert cmd[cmd.index("-machine") + 1] == "q35,accel=tcg"
    assert cmd[cmd.index("-bios") + 1] == str(plain.firmware_link)
    assert "-daemonize" in cmd and cmd[-1] == "-no-reboot"
    assert cmd[cmd.index("-cpu") + 1] == "EPYC-v4"
    assert not any("sev-snp-guest" in a for a in cmd)
    snp = VmDir.create(tmp_path / "b", accel="kvm", snp=True, memory_mib=2048, cbitpos=51)
    cmd = build_command(snp)
    assert cmd[cmd.index("-machine") + 1] == "q35,accel=kvm,confidential-guest-support=sev0,memory-backend=ram0"
    objs = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-object"]
    assert objs == ["memory-backend-memfd,id=ram0,size=2048M,share=true",
                    "sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1"]
    # an SNP guest whose image must carry SEV metadata, run as a plain VM (hosts without SNP)
    test_mode = VmDir.create(tmp_path / "c", accel="tcg", snp=True, launch_mode="plain")
    assert not any("sev" in a for a in build_command(test_mode))
    port = VmDir.create(tmp_path / "e", accel="tcg", update_port=True)
    cmd = build_command(port)
    assert f"socket,id=fgupd,path={port.channel_path},reconnect=1" in cmd
    assert "virtserialport,bus=fgser.0,chardev=fgupd,name=org.firmgate.update" in cmd
    igvm = VmDir.create(tmp_path / "d", accel="tcg", snp=True, firmware_format="igvm")
    cmd = build_command(igvm)
    assert "-bios" not in cmd
    assert f"igvm-cfg,id=igvm0,file={igvm.firmware_link}" in cmd
    assert "igvm-cfg=igvm0" in cmd[cmd.index("-machine") + 1]


# -- store and link -------------------------------------------------------------
def test_store_is_content_addressed_and_detects_corruption(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    data = os.urandom(4096)
    digest = store.put(data)
    assert digest == sha384(data)
    assert store.path_of(digest).read_bytes() == data
    assert store.verify(digest) and store.read(digest) == data
    assert store.put(data) == digest  # idempotent
    assert store.digests() == [digest]
    p = store.path_of(digest)
    os.chmod(p, 0o644)
    p.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert not store.verify(digest)
    with pytest.raises(InstallFailed, match="does not match its digest"):
        store.read(digest)
    with pytest.raises(ValueError):
        store.path_of("../etc/passwd")


def test_store_leftover_temporaries_are_removed(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    store.root.mkdir()
    (store.root / ".tmp-deadbeef").write_bytes(b"half")
    assert store.remove_temporaries() == [".tmp-deadbeef"]
    assert list(store.root.iterdir()) == []


def test_switch_link_is_atomic_rename(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    a, b = store.put(b"a" * 10), store.put(b"b" * 10)
    link = tmp_path / "firmware"
    assert link_target(link) is None
    switch_link(link, a)
    assert link_target(link) == a and link.read_bytes() == b"a" * 10
    switch_link(link, b)
    assert link_target(link) == b and link.read_bytes() == b"b" * 10
    os.symlink("store/x", tmp_path / ".firmware.tmp-1234")
    assert remove_link_temporaries(link) == [".firmware.tmp-1234"]
    link.unlink()
    os.symlink("/etc/passwd", link)
    with pytest.raises(InstallFailed, match="not at a store image"):
        link_target(link)


# -- journal ------------------------------------------------------------------
def test_journal_chains_records_and_finds_in_force(tmp_path: Path) -> None:
    j = Journal(tmp_path / "journal.jsonl")
    assert j.records() == [] and j.in_force() is None
    j.append("begin", "t1", new="aa", old=None)
    assert j.open_transaction()[0]["event"] == "begin"
    j.append("committed", "t1", in_force="aa", fwid="one")
    assert j.open_transaction() == []
    assert j.in_force()["in_force"] == "aa"
    recs = j.records()
    assert [r["seq"] for r in recs] == [1, 2]
    assert recs[0]["prev"] == "" and len(recs[1]["prev"]) == 96


def test_journal_torn_tail_is_ignored_then_cut(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    j = Journal(path)
    j.append("committed", "t1", in_force="aa", fwid="one")
    with open(path, "ab") as f:
        f.write(b'{"event":"begin","tx":"t2"')  # a crash mid-write: no newline
    assert [r["event"] for r in j.records()] == ["committed"]
    rec = j.append("begin", "t3", new="bb", old="aa")
    assert rec["dropped_torn_bytes"] == len(b'{"event":"begin","tx":"t2"')
    assert [r["tx"] for r in j.records()] == ["t1", "t3"]


def test_journal_edit_breaks_chain(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    j = Journal(path)
    j.append("committed", "t1", in_force="aa", fwid="one")
    j.append("committed", "t2", in_force="bb", fwid="two")
    lines = path.read_bytes().splitlines()
    rec = json.loads(lines[0])
    rec["in_force"] = "cc"
    path.write_bytes(json.dumps(rec, sort_keys=True, separators=(",", ":")).encode() + b"\n" + lines[1] + b"\n")
    with pytest.raises(InstallFailed, match="chain broken"):
        j.records()
    path.write_bytes(b"not json\n")
    with pytest.raises(InstallFailed, match="not a JSON record"):
        j.records()


def test_default_config_is_valid() -> None:
    assert parse_config(VmConfig().to_toml()) == VmConfig()
