"""A VM is a directory: vm.toml, a content-addressed firmware store, the
`firmware` link to the image in force, and an append-only journal.

Layout (docs/host.md has the full description)::

    <vm>/vm.toml          configuration written by the host operator (trusted)
    <vm>/firmware         symlink -> store/<sha384>.rom, switched atomically
    <vm>/store/           content-addressed images, named by their SHA-384
    <vm>/journal.jsonl    append-only, fsync'd JSON lines, each chained by digest
    <vm>/lock             flock()ed by the one host-install working on this VM
    <vm>/qmp.sock, qemu.pid, serial.log, debug.log, channel.sock   runtime files
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import VmConfigError, VmDirError

CONFIG_NAME = "vm.toml"
FIRMWARE_LINK = "firmware"
STORE_DIR = "store"
JOURNAL_NAME = "journal.jsonl"
LOCK_NAME = "lock"
PID_NAME = "qemu.pid"
CHANNEL_NAME = "channel.sock"
GUEST_STATUS_NAME = "guest-status.json"  # fw_cfg opt/org.firmgate/status (host_install.guest_status)

# A unix socket path must fit sockaddr_un.sun_path (108 bytes on Linux, unix(7)).
_SUN_PATH_MAX = 107
_ACCELS = ("auto", "kvm", "tcg")
_FORMATS = ("ovmf", "igvm")
_LAUNCH_MODES = ("snp", "plain")
_ACPI_SHUTDOWN = ("auto", "always", "never")
_DEFAULT_ROM_MAX = 16 * 1024 * 1024  # largest OVMF builds are 4 MiB; leave room, but bound it


@dataclass(frozen=True)
class VmConfig:
    """vm.toml, typed. Relative paths are relative to the VM directory."""

    qemu: str = "qemu-system-x86_64"
    machine: str = "q35"
    accel: str = "auto"              # "kvm", "tcg", or "auto" (kvm when /dev/kvm opens)
    memory_mib: int = 2048
    vcpus: int = 1
    cpu: str | None = None           # -cpu model, e.g. "EPYC-v4"; None = QEMU's default
    extra_args: tuple[str, ...] = ()
    update_port: bool = False        # virtio-serial port org.firmgate.update -> <vm>/channel.sock
    snp: bool = False                # an SNP guest: images must carry SEV metadata
    launch_mode: str | None = None   # "snp" (sev-snp-guest object) or "plain"; default follows `snp`
    firmware_format: str = "ovmf"    # "igvm" only for a VM launched with IGVM
    rom_max_bytes: int = _DEFAULT_ROM_MAX
    id_blocks: str | None = None     # the owner's firmgate-idblocks/1 set (host_install/idblocks.py)
    require_id_block: bool = False   # refuse firmware the owner signed no ID block for (exit 2)
    cbitpos: int = 51                # sev-snp-guest parameters (EPYC Milan/Genoa values)
    reduced_phys_bits: int = 1
    qmp_socket: str = "qmp.sock"
    serial_log: str = "serial.log"
    debug_log: str = "debug.log"
    boot_marker: str = "BdsDxe"      # text the firmware prints once it reached boot device selection
    kernel: str | None = None        # direct kernel boot (-kernel/-initrd/-append), e.g. the test guest
    initrd: str | None = None
    append: str | None = None
    # text that proves the boot failed (edk2's CpuExceptionHandlerLib dump); "" = none
    boot_fail_marker: str = "!!!! X64 Exception Type"
    boot_timeout: float = 60.0       # seconds for QMP "running" + the marker
    stop_timeout: float = 30.0       # seconds for a guest to honour system_powerdown
    # "auto": ACPI power-down only when extra_args give the guest a boot medium (an OS that can honour it);
    # firmware alone never does, so its VM is quit at once. "always" / "never" force the choice.
    acpi_shutdown: str = "auto"

    @property
    def effective_launch_mode(self) -> str:
        return self.launch_mode or ("snp" if self.snp else "plain")

    def to_toml(self) -> str:
        out = ["# host-install VM configuration (docs/host.md)"]
        for key, value in asdict(self).items():
            if value is None:
                continue
            out.append(f"{key} = {_toml_value(value)}")
        return "\n".join(out) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to vm.toml")


def _line_of(text: str, key: str) -> int | None:
    pat = re.compile(rf'^[ \t]*"?{re.escape(key)}"?[ \t]*=', re.M)
    m = pat.search(text)
    return text.count("\n", 0, m.start()) + 1 if m else None


def parse_config(text: str, path: str = CONFIG_NAME) -> VmConfig:
    """Parse and validate vm.toml; every problem names the line and the reason."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"at line (\d+)", str(exc))
        raise VmConfigError(path, int(m.group(1)) if m else None, f"not valid TOML: {exc}") from exc
    known = {f.name: f for f in fields(VmConfig)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        line = _line_of(text, key)
        if key not in known:
            raise VmConfigError(path, line, f"unknown key {key!r} (known: {', '.join(sorted(known))})")
        values[key] = _check_value(key, value, path, line)
    cfg = VmConfig(**values)
    def bad(key: str, why: str) -> VmConfigError:
        return VmConfigError(path, _line_of(text, key), why)
    if cfg.accel not in _ACCELS:
        raise bad("accel", f"accel must be one of {_ACCELS}, not {cfg.accel!r}")
    if cfg.firmware_format not in _FORMATS:
        raise bad("firmware_format", f"firmware_format must be one of {_FORMATS}, not {cfg.firmware_format!r}")
    if cfg.acpi_shutdown not in _ACPI_SHUTDOWN:
        raise bad("acpi_shutdown", f"acpi_shutdown must be one of {_ACPI_SHUTDOWN}, not {cfg.acpi_shutdown!r}")
    if cfg.launch_mode is not None and cfg.launch_mode not in _LAUNCH_MODES:
        raise bad("launch_mode", f"launch_mode must be one of {_LAUNCH_MODES}, not {cfg.launch_mode!r}")
    if cfg.launch_mode == "snp" and not cfg.snp:
        raise bad("launch_mode", 'launch_mode = "snp" needs snp = true')
    if cfg.require_id_block and not (cfg.snp and cfg.id_blocks):
        raise bad("require_id_block", "require_id_block needs snp = true and id_blocks (the owner's ID-block set)")
    if cfg.id_blocks is not None and (not cfg.id_blocks or "\0" in cfg.id_blocks):
        raise bad("id_blocks", "id_blocks must be a path (relative to the VM directory)")
    if not 16 <= cfg.memory_mib <= 16 * 1024 * 1024:
        raise bad("memory_mib", f"memory_mib {cfg.memory_mib} is out of range 16..16777216")
    if not 1 <= cfg.vcpus <= 512:
        raise bad("vcpus", f"vcpus {cfg.vcpus} is out of range 1..512")
    if not 64 * 1024 <= cfg.rom_max_bytes <= 256 * 1024 * 1024:
        raise bad("rom_max_bytes", f"rom_max_bytes {cfg.rom_max_bytes} is out of range 64 KiB..256 MiB")
    for key in ("boot_timeout", "stop_timeout"):
        if not 0 < getattr(cfg, key) <= 3600:
            raise bad(key, f"{key} must be in (0, 3600] seconds")
    for key in ("qmp_socket", "serial_log", "debug_log"):
        value = getattr(cfg, key)
        if not value or "," in value or "\0" in value:
            raise bad(key, f"{key} must be a non-empty path without ',' (QEMU option syntax)")
    if cfg.kernel is None and (cfg.initrd is not None or cfg.append is not None):
        raise bad("initrd" if cfg.initrd is not None else "append", "initrd and append need kernel")
    for key in ("kernel", "initrd"):
        value = getattr(cfg, key)
        if value is not None and (not value or "\0" in value):
            raise bad(key, f"{key} must be a non-empty path")
    if cfg.append is not None and (len(cfg.append) > 4096 or any(c in cfg.append for c in "\0\n")):
        raise bad("append", "append must be one line of at most 4096 characters")
    if not cfg.boot_marker:
        raise bad("boot_marker", "boot_marker must not be empty (it is how a boot is confirmed)")
    if not cfg.qemu:
        raise bad("qemu", "qemu must name the QEMU binary")
    return cfg


def _check_value(key: str, value: Any, path: str, line: int | None) -> Any:
    f = {f.name: f for f in fields(VmConfig)}[key]
    want = str(f.type)
    def fail(kind: str) -> VmConfigError:
        return VmConfigError(path, line, f"{key} must be {kind}, not {type(value).__name__} {value!r}")
    if want == "bool":
        if not isinstance(value, bool):
            raise fail("true or false")
    elif want == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
    elif want == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        value = float(value)
    elif want in ("str", "str | None"):
        if not isinstance(value, str):
            raise fail("a string")
    elif want == "tuple[str, ...]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise fail("a list of strings")
        value = tuple(value)
    return value


@dataclass(frozen=True)
class VmDir:
    """A VM directory and its configuration."""

    path: Path
    config: VmConfig = field(default_factory=VmConfig)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> VmDir:
        p = Path(path).absolute()
        if not p.is_dir():
            raise VmDirError(f"VM directory {p} does not exist",
                             "pass the directory that holds vm.toml (create one with `host-install init --vm DIR`)")
        cfg_path = p / CONFIG_NAME
        try:
            text = cfg_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise VmDirError(f"{p} has no {CONFIG_NAME}", "this is not a host-install VM directory") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise VmConfigError(str(cfg_path), None, f"cannot read: {exc}") from exc
        vm = cls(p, parse_config(text, str(cfg_path)))
        vm._check_socket_paths()
        vm.store_dir.mkdir(exist_ok=True)
        return vm

    @classmethod
    def create(cls, path: str | os.PathLike[str], **config: Any) -> VmDir:
        """Make a VM directory with a vm.toml holding `config` (VmConfig's fields)."""
        p = Path(path).absolute()
        p.mkdir(parents=True, exist_ok=True)
        if (p / CONFIG_NAME).exists():
            raise VmDirError(f"{p} already holds a {CONFIG_NAME}", "open it with VmDir.open instead")
        if "extra_args" in config:
            config["extra_args"] = tuple(config["extra_args"])
        known = {f.name for f in fields(VmConfig)}
        unknown = set(config) - known
        if unknown:
            raise VmConfigError(str(p / CONFIG_NAME), None, f"unknown keys {sorted(unknown)}")
        text = VmConfig(**config).to_toml()
        parse_config(text, str(p / CONFIG_NAME))  # same checks as a hand-written file
        tmp = p / (CONFIG_NAME + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p / CONFIG_NAME)
        return cls.open(p)

    def _check_socket_paths(self) -> None:
        for name in (self.config.qmp_socket, CHANNEL_NAME):
            if len(os.fsencode(str(self.path / name))) > _SUN_PATH_MAX:
                raise VmDirError(f"socket path {self.path / name} is longer than {_SUN_PATH_MAX} bytes",
                                 "use a shorter VM directory path or a shorter qmp_socket")

    def rel(self, name: str) -> Path:
        return self.path / name

    @property
    def store_dir(self) -> Path:
        return self.path / STORE_DIR

    @property
    def firmware_link(self) -> Path:
        return self.path / FIRMWARE_LINK

    @property
    def journal_path(self) -> Path:
        return self.path / JOURNAL_NAME

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_NAME

    @property
    def pid_path(self) -> Path:
        return self.path / PID_NAME

    @property
    def qmp_path(self) -> Path:
        return self.path / self.config.qmp_socket

    @property
    def channel_path(self) -> Path:
        return self.path / CHANNEL_NAME

    @property
    def guest_status_path(self) -> Path:
        return self.path / GUEST_STATUS_NAME

    @property
    def serial_log(self) -> Path:
        return self.path / self.config.serial_log

    @property
    def debug_log(self) -> Path:
        return self.path / self.config.debug_log
