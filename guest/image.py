"""Build a small real guest (Debian kernel + an initramfs of our own) that runs guest.boot at boot.

Runs on the host (`make guest-image`, or `python -m guest.image build`). Nothing
is downloaded except Debian packages through apt (`apt-get download`, unpacked
with `dpkg-deb -x`, so the host's own kernel and boot setup are untouched):

- linux-image-amd64's kernel (vmlinuz) and the few modules the client needs
  (virtio-pci + virtio_console for the org.firmgate.update port, qemu_fw_cfg for
  the host's status file, button + evdev for the ACPI power button), with the
  dependencies named in each module's .modinfo, loaded in order by /init;
- busybox-static as /init's shell (mount, insmod, acpid, poweroff);
- Debian's own Python 3.11 (/usr/bin/python3.11 and the shared libraries it
  links, from the host's python3.11 packages) with only the standard-library
  modules the client imports, found by importing it under that interpreter and
  compiled to sourceless .pyc;
- firmgate's `guest`, `host_install.channel` and `verifier.firmware.addon` (and
  pefile, their one third-party dependency) as .pyc under /usr/lib/firmgate.

The result (in the cache directory, default ~/.cache/firmgate/guest-image or
$FIRMGATE_GUEST_IMAGE) is `vmlinuz`, `initrd.base` (gzip'd cpio) and
`manifest.json`. A VM's initrd is that base plus a second cpio holding its
add-on at /boot/efi/EFI/Linux/firmgate.efi.extra.d/firmware.addon.efi
(`GuestImage.initrd_with_addon`): the kernel unpacks concatenated archives in
order. A rebuild happens only when an input changed (the manifest records the
digests of the packages and of the client's sources).
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("linux-image-amd64", "busybox-static")
GUEST_PYTHON = "/usr/bin/python3.11"            # Debian's python3.11-minimal (not a venv's or pyenv's)
PYTHON_PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib")
MODULES = ("virtio_pci", "virtio_console", "qemu_fw_cfg", "button", "evdev")
ADDON_PATH = "boot/efi/EFI/Linux/firmgate.efi.extra.d/firmware.addon.efi"
APPEND = "console=ttyS0 quiet"
# The client's own modules (paths relative to the source root) and what it imports from them.
CLIENT_ENTRY = ("guest.boot", "guest.update", "verifier.firmware.addon")
CLIENT_SOURCES = ("guest/__init__.py", "guest/boot.py", "guest/update.py", "guest/errors.py",
                  "host_install/__init__.py", "host_install/channel.py", "host_install/errors.py", "host_install/listen_log.py",
                  "host_install/vm.py", "verifier/__init__.py", "verifier/errors.py", "verifier/verdict.py",
                  "verifier/firmware/__init__.py", "verifier/firmware/addon.py")
# hashlib falls back to the interpreter's built-in _sha512 etc.; _hashlib would bring libcrypto (4 MiB)
SKIP_EXTENSIONS = ("_hashlib",)
FORMAT = 1

INIT = r"""#!/bin/busybox sh
# firmgate test guest: mount the kernel's file systems, load the client's modules, run it once.
/bin/busybox mkdir -p /proc /sys /dev /tmp /run
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
export PATH=/bin
for m in $(cat /etc/firmgate/modules); do insmod "/lib/modules/$m.ko" 2>/dev/null; done
# the ACPI power button (host-install stops a VM with system_powerdown) powers off at once;
# acpid opens the event devices it finds when it starts, so wait for them (and for the port)
n=0; while { [ ! -e /dev/input/event0 ] || [ ! -e /sys/class/virtio-ports ]; } && [ $n -lt 50 ]; do
  sleep 0.1; n=$((n+1))
done
acpid -c /etc/acpi -a /etc/acpid.conf -l /dev/console
/usr/bin/python3.11 -I -S /usr/lib/firmgate/boot.py
echo "firmgate-guest: done (exit $?); idle"
while :; do sleep 3600; done
"""
BOOT_PY = """import sys
sys.path.insert(0, "/usr/lib/firmgate")
from guest.boot import main
sys.exit(main())
"""
ACPID_CONF = "PWRF PWRF/00000080\n"
POWEROFF = "#!/bin/sh\necho 'firmgate-guest: power button: powering off'\nsync\npoweroff -f\n"

# Run under Debian's python3.11: import the client, print the files of every module it loaded.
_TRACE = r"""
import importlib, json, sys
sys.path[:0] = json.loads(sys.argv[1])
for name in json.loads(sys.argv[2]):
    importlib.import_module(name)
import contextlib, io
with contextlib.redirect_stdout(io.StringIO()):  # run the client once (no ESP, no port): its lazy imports
    importlib.import_module("guest.boot").main(["--esp", "/nonexistent"])
# error paths and console codecs
import traceback, linecache, tokenize, locale, encodings.latin_1, encodings.ascii
out = {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())}
print(json.dumps({"modules": out, "stdlib": sys.prefix + "/lib/python3.11", "version": sys.version}))
"""
_COMPILE = r"""
import json, py_compile, sys
for src, dst in json.loads(sys.stdin.read()):
    py_compile.compile(src, cfile=dst, dfile=src, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
"""


class ImageBuildError(Exception):
    """The guest image cannot be built here; the message says why and what to do."""


def default_cache_dir() -> Path:
    env = os.environ.get("FIRMGATE_GUEST_IMAGE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "firmgate" / "guest-image"


@dataclass(frozen=True)
class GuestImage:
    directory: Path
    kernel: Path
    initrd_base: Path
    manifest: dict[str, object]

    @property
    def append(self) -> str:
        return APPEND

    def initrd_with_addon(self, addon: bytes | None, out: Path) -> Path:
        """The base initrd plus one cpio with `addon` at ADDON_PATH (None: a guest without an add-on)."""
        extra = Cpio()
        if addon is not None:
            extra.file(ADDON_PATH, addon, 0o644)
        tmp = out.with_name(out.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(self.initrd_base.read_bytes())
            fh.write(gzip.compress(extra.finish(), compresslevel=1, mtime=0))
        os.replace(tmp, out)
        return out


def load(directory: Path | None = None) -> GuestImage | None:
    """The built image in `directory`, or None when it is missing or from another format."""
    d = directory or default_cache_dir()
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    kernel, initrd = d / "vmlinuz", d / "initrd.base"
    if not kernel.is_file() or not initrd.is_file():
        return None
    return GuestImage(d, kernel, initrd, manifest)


class Cpio:
    """A newc ("070701") cpio archive, what the kernel's initramfs unpacker reads."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nb = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0)
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + nb)
        self.buf.write(b"\0" * (-(110 + len(nb)) % 4) + data + b"\0" * (-len(data) % 4))
        self.ino += 1

    def directory(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self.dirs:
                self.dirs.add(d)
                self._entry(d, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        self.directory(os.path.dirname(name))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self.directory(os.path.dirname(name))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        name = name.strip("/")
        self.directory(os.path.dirname(name))
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def _run(cmd: list[str], cwd: Path | None = None, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(cmd, cwd=cwd, input=stdin, capture_output=True, check=False, timeout=900)
    except FileNotFoundError:
        raise ImageBuildError(f"{cmd[0]} is not installed (a Debian or Ubuntu host is needed)") from None


def _is_root() -> bool:
    return os.geteuid() == 0


def _apt_download(names: Iterable[str], dest: Path, log: Callable[[str], None]) -> None:
    names = list(names)
    res = _run(["apt-get", "download", *names], cwd=dest)
    if res.returncode != 0 and _is_root():
        log("apt-get update (package lists missing or stale)")
        _run(["apt-get", "update", "-qq"])
        res = _run(["apt-get", "download", *names], cwd=dest)
    if res.returncode != 0:
        err = res.stderr.decode(errors="replace").strip().splitlines()
        raise ImageBuildError(f"apt-get download {' '.join(names)} failed: {err[-1] if err else res.returncode}"
                              + ("" if _is_root() else " (run `apt-get update` as root first)"))


def _kernel_package() -> str:
    res = _run(["apt-cache", "depends", "linux-image-amd64"])
    m = re.search(rb"Depends: (linux-image-[0-9][^\s]*-amd64)", res.stdout)
    if not m:
        raise ImageBuildError("apt-cache knows no linux-image-amd64 (run `apt-get update` as root)")
    return m.group(1).decode()


def _fetch_debs(debs: Path, log: Callable[[str], None]) -> list[Path]:
    debs.mkdir(parents=True, exist_ok=True)
    os.chmod(debs, 0o755)
    wanted = [_kernel_package(), "busybox-static"]
    have = {p.name.split("_")[0]: p for p in debs.glob("*.deb")}
    for name, stale in have.items():  # an older kernel package: not an input any more
        if name not in wanted:
            stale.unlink()
    missing = [n for n in wanted if n not in have]
    if missing:
        log("apt-get download " + " ".join(missing))
        _apt_download(missing, debs, log)
    have = {p.name.split("_")[0]: p for p in debs.glob("*.deb")}
    for n in wanted:
        if n not in have:
            raise ImageBuildError(f"apt-get download left no {n}*.deb in {debs}")
    return [have[n] for n in wanted]


def _ensure_python(log: Callable[[str], None]) -> None:
    if os.access(GUEST_PYTHON, os.X_OK):
        return
    if not _is_root():
        raise ImageBuildError(f"{GUEST_PYTHON} is missing: run `apt-get install {' '.join(PYTHON_PACKAGES)}` as root")
    log("apt-get install " + " ".join(PYTHON_PACKAGES))
    res = _run(["apt-get", "install", "-y", "-qq", *PYTHON_PACKAGES])
    if res.returncode != 0:
        raise ImageBuildError(f"apt-get install {' '.join(PYTHON_PACKAGES)} failed")


def _modinfo_depends(ko: bytes) -> list[str]:
    # .modinfo holds NUL-separated "key=value" strings; a module has at most one "depends=".
    m = re.search(rb"\0depends=([A-Za-z0-9_,\-]*)\0", ko)
    return [d.replace("-", "_") for d in m.group(1).decode().split(",") if d] if m else []


def _modules(root: Path, wanted: Iterable[str]) -> tuple[str, list[tuple[str, bytes]]]:
    mod_roots = sorted((root / "lib" / "modules").glob("*"))
    if len(mod_roots) != 1:
        raise ImageBuildError(f"expected one kernel in the package, found {len(mod_roots)}")
    version = mod_roots[0].name
    files = {p.name[:-3].replace("-", "_"): p for p in mod_roots[0].rglob("*.ko")}
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, depth: int = 0) -> None:
        if name in seen:
            return
        if depth > 32 or name not in files:
            raise ImageBuildError(f"kernel module {name} not found in linux-image {version}")
        data = files[name].read_bytes()
        for dep in _modinfo_depends(data):
            visit(dep, depth + 1)
        seen.add(name)
        order.append((name, data))
    for w in wanted:
        visit(w)
    return version, order


def _libs(binary: str) -> list[str]:
    res = _run(["ldd", binary])
    out: list[str] = []
    for line in res.stdout.decode().splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            out.append(m.group(1))
    return out


def _client_inputs(src_root: Path) -> dict[str, bytes]:
    import ordlookup
    import pefile
    files = {rel: (src_root / rel).read_bytes() for rel in CLIENT_SOURCES}
    files["pefile.py"] = Path(pefile.__file__).read_bytes()
    for p in sorted(Path(ordlookup.__file__).parent.glob("*.py")):
        files[f"ordlookup/{p.name}"] = p.read_bytes()
    return files


def _digest(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()


def build(directory: Path | None = None, *, log: Callable[[str], None] = print, force: bool = False) -> GuestImage:
    """Build (or reuse) the guest image; ImageBuildError when this host cannot."""
    d = (directory or default_cache_dir()).absolute()
    d.mkdir(parents=True, exist_ok=True)
    src_root = Path(__file__).resolve().parent.parent
    _ensure_python(log)
    debs = _fetch_debs(d / "debs", log)
    client = _client_inputs(src_root)
    inputs = _digest([p.name.encode() for p in debs] + [INIT.encode(), BOOT_PY.encode(), _TRACE.encode(), _COMPILE.encode(), str(FORMAT).encode(),
                      Path(GUEST_PYTHON).read_bytes()] + [k.encode() + v for k, v in sorted(client.items())])
    old = load(d)
    if old is not None and old.manifest.get("inputs") == inputs and not force:
        log(f"guest image up to date in {d}")
        return old
    t0 = time.monotonic()
    root = d / "root"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    for deb in debs:
        res = _run(["dpkg-deb", "-x", str(deb), str(root)])
        if res.returncode != 0:
            raise ImageBuildError(f"dpkg-deb -x {deb.name} failed: {res.stderr.decode(errors='replace').strip()}")
    kver, modules = _modules(root, MODULES)
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageBuildError(f"expected one vmlinuz in {debs[0].name}, found {len(kernels)}")

    cpio = Cpio()
    for dname in ("proc", "sys", "dev", "tmp", "run", "etc/acpi/PWRF", "boot/efi"):
        cpio.directory(dname)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3)
    cpio.file("init", INIT.encode(), 0o755)
    cpio.file("bin/busybox", (root / "bin" / "busybox").read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    for name, data in modules:
        cpio.file(f"lib/modules/{name}.ko", data)
    cpio.file("etc/firmgate/modules", "".join(f"{n}\n" for n, _ in modules).encode())
    cpio.file("etc/acpid.conf", ACPID_CONF.encode())
    cpio.file("etc/acpi/PWRF/00000080", POWEROFF.encode(), 0o755)

    # Debian's python3.11 and the libraries it links
    cpio.file(GUEST_PYTHON.lstrip("/"), Path(GUEST_PYTHON).read_bytes(), 0o755)
    python_libs = _libs(GUEST_PYTHON)
    for lib in python_libs:
        real = os.path.realpath(lib)
        cpio.file(real.lstrip("/"), Path(real).read_bytes(), 0o755)
        if real != lib:
            cpio.symlink(lib.lstrip("/"), real)
    staging = d / "client-src"
    shutil.rmtree(staging, ignore_errors=True)
    for rel, data in client.items():
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_bytes(data)
    res = _run([GUEST_PYTHON, "-I", "-S", "-c", _TRACE, json.dumps([str(staging)]), json.dumps(list(CLIENT_ENTRY))])
    if res.returncode != 0:
        raise ImageBuildError("the client does not import under Debian's python3.11: "
                              + res.stderr.decode(errors="replace").strip().splitlines()[-1])
    trace = json.loads(res.stdout)
    stdlib = trace["stdlib"]
    compile_jobs: list[tuple[str, str]] = []
    pyc = d / "pyc"
    shutil.rmtree(pyc, ignore_errors=True)
    for name, path in sorted(trace["modules"].items()):
        if not path or name in SKIP_EXTENSIONS:
            continue
        if path.startswith(str(staging) + "/"):
            rel = "usr/lib/firmgate/" + path[len(str(staging)) + 1:]
        elif path.startswith(stdlib + "/"):
            rel = "usr/lib/python3.11/" + path[len(stdlib) + 1:]
        else:
            raise ImageBuildError(f"module {name} comes from {path}, outside Debian's stdlib and the client")
        if path.endswith(".py"):
            compile_jobs.append((path, str(pyc / (rel[:-3] + ".pyc"))))
        elif path.endswith(".so"):
            cpio.file(rel, Path(path).read_bytes(), 0o755)
            for lib in _libs(path):
                if lib not in python_libs:
                    real = os.path.realpath(lib)
                    cpio.file(real.lstrip("/"), Path(real).read_bytes(), 0o755)
                    if real != lib:
                        cpio.symlink(lib.lstrip("/"), real)
    res = _run([GUEST_PYTHON, "-I", "-S", "-c", _COMPILE], stdin=json.dumps(compile_jobs).encode())
    if res.returncode != 0:
        raise ImageBuildError("compiling the client failed: " + res.stderr.decode(errors="replace")[-300:])
    for _src, dst in compile_jobs:
        rel = os.path.relpath(dst, pyc)
        cpio.file(rel, Path(dst).read_bytes())
    cpio.file("usr/lib/firmgate/boot.py", BOOT_PY.encode())

    raw = cpio.finish()
    tmp = d / "initrd.base.tmp"
    tmp.write_bytes(gzip.compress(raw, compresslevel=6, mtime=0))
    os.replace(tmp, d / "initrd.base")
    shutil.copyfile(kernels[0], d / "vmlinuz.tmp")
    os.replace(d / "vmlinuz.tmp", d / "vmlinuz")
    manifest = {"format": FORMAT, "inputs": inputs, "kernel": kernels[0].name, "kernel_version": kver,
                "packages": [p.name for p in debs], "python": trace["version"].split()[0],
                "modules": [n for n, _ in modules], "initrd_bytes": (d / "initrd.base").stat().st_size,
                "initrd_raw_bytes": len(raw), "python_modules": len(compile_jobs),
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (d / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(pyc, ignore_errors=True)
    log(f"guest image built in {d} in {time.monotonic() - t0:.1f}s: kernel {kver}, "
        f"initrd {manifest['initrd_bytes'] // 1024} KiB ({len(compile_jobs)} Python modules)")
    img = load(d)
    if img is None:
        raise ImageBuildError(f"the image just built in {d} does not load")
    return img


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m guest.image", description="build firmgate's test guest image")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the kernel + initramfs into the cache directory")
    b.add_argument("--dir", type=Path, help=f"cache directory (default {default_cache_dir()})")
    b.add_argument("--force", action="store_true", help="rebuild even when nothing changed")
    i = sub.add_parser("initrd", help="write a VM's initrd: the base plus this add-on on the ESP")
    i.add_argument("--dir", type=Path)
    i.add_argument("--addon", type=Path, required=True)
    i.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        if args.cmd == "build":
            build(args.dir, force=args.force)
            return 0
        img = load(args.dir)
        if img is None:
            raise ImageBuildError("no guest image built yet: run `make guest-image`")
        img.initrd_with_addon(args.addon.read_bytes(), args.output)
        print(args.output)
        return 0
    except (ImageBuildError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
