"""An owner's appraisal policy: one TOML file per tenant, parsed into frozen values.

The format is documented in docs/policy.md. Rules of the format:
- every key is known (an unknown key is an error: a typo must not silently
  turn a rule off);
- `min_*` is a lower bound, and an absent `min_*` (or an absent list) means
  "not checked" -- the verdict then shows that rule as skipped;
- booleans default to the safe side (`unsafe_allow_debug = false`,
  `allow_migrate_ma = false`, `allow_simulated_platform = false`,
  `allow_provisional_firmware = false`).

`parse_policy(text, path)` returns the policy and EVERY error found
(`PolicyFileError` with file, line, field, reason); `load_policy(path)`
raises `PolicyErrors` when there is any. Nothing here touches the report.
"""
from __future__ import annotations

import hashlib
import os
import re
import stat
import tomllib
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..abi.fields import Product
from ..errors import FirmgateError, PolicyErrors, PolicyFileError
from ..measure.launch import VCPU_TYPES as _MEASURE_VCPU_TYPES
from ..measure.launch import VMMS as _MEASURE_VMMS
from .lines import LineIndex

if TYPE_CHECKING:
    from ..endorse.admit import PublisherRule
    from .report_rules import ReportRules

FORMAT_VERSION = 1
MAX_POLICY_SIZE = 1024 * 1024          # a policy is text written by people; bound what we read
# The one name rule of firmgate (the broker uses these too); always `fullmatch` (`$` alone
# matches before a final newline). A resource part is at most 64 characters: the broker stores
# "<tenant>/<type>/<tag>" in 256 and has always refused longer parts.
TENANT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
FIRMWARE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
RESOURCE_PART_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
UPLOADED = "uploaded"
INITDATA = "initdata"
VMMS = _MEASURE_VMMS                    # sev-snp-measure --vmm-type values
SIGNERS = ("VCEK", "VLEK")
TCB_COMPONENTS = ("bootloader", "tee", "snp", "microcode", "fmc")   # fmc: Turin only (SNP ABI Table 3)
MAX_VCPUS = 512
MAX_SHAPES = 1024                       # vcpus x vcpu_types summed over [[shapes]]
MAX_LIST = 256                          # entries per list: bounds the reference table (firmware x shapes)


# The vCPU type names sev-snp-measure knows (its CPUID signature table): the VMSA, hence the measurement, depends on them.
VCPU_TYPES = frozenset(_MEASURE_VCPU_TYPES)


@dataclass(frozen=True)
class FirmwareEntry:
    id: str
    sha384: str                 # lowercase hex, 96 chars
    svn: int
    location: str               # "uploaded" or a path relative to the policy file's directory
    # The owner's statement that this firmware itself pins what it boots (e.g. "Secure Boot db
    # with our key built in"); None = it boots whatever the disk holds (docs/policy.md, binding).
    enforces_boot_chain: str | None = None

    @property
    def uploaded(self) -> bool:
        return self.location == UPLOADED


@dataclass(frozen=True)
class KernelHashes:
    """SHA-256 (hex) of the kernel, initrd and command line QEMU measured into the hashes table
    (sev-snp-measure's digests: an absent initrd hashes as empty, the command line with its NUL)."""

    kernel: str
    initrd: str
    cmdline: str


@dataclass(frozen=True)
class ShapeRule:
    vmm: str
    vcpus: tuple[int, ...]
    vcpu_types: tuple[str, ...]
    guest_features: int
    kernel: KernelHashes | None  # None: booted without kernel hashes

    def expand(self) -> list[tuple[int, str]]:
        return [(n, t) for t in self.vcpu_types for n in self.vcpus]


@dataclass(frozen=True)
class TcbFloor:
    """Minimum SPL per TCB component; None = not checked."""

    bootloader: int | None = None
    tee: int | None = None
    snp: int | None = None
    microcode: int | None = None
    fmc: int | None = None

    def items(self) -> list[tuple[str, int]]:
        return [(k, v) for k in TCB_COMPONENTS if (v := getattr(self, k)) is not None]

    def __str__(self) -> str:
        return " ".join(f"{k}>={v}" for k, v in self.items()) or "(none)"


@dataclass(frozen=True)
class PlatformRules:
    products: tuple[Product, ...] | None = None
    signers: tuple[str, ...] | None = None
    min_tcb: tuple[tuple[Product, TcbFloor], ...] = ()
    min_launch_tcb: tuple[tuple[Product, TcbFloor], ...] = ()
    allow_provisional_firmware: bool = False
    allow_simulated_platform: bool = False
    vmpls: tuple[int, ...] | None = None
    host_data: bytes | Literal["initdata"] | None = None

    def floor(self, which: Literal["min_tcb", "min_launch_tcb"], product: Product) -> TcbFloor | None:
        floors: tuple[tuple[Product, TcbFloor], ...] = getattr(self, which)
        for p, f in floors:
            if p is product:
                return f
        return None


@dataclass(frozen=True)
class GuestRules:
    unsafe_allow_debug: bool = False
    allow_migrate_ma: bool = False
    allow_smt: bool = True
    require_single_socket: bool = False
    min_abi: tuple[int, int] | None = None
    min_guest_svn: int | None = None


@dataclass(frozen=True)
class SecretRule:
    path: str                                # "<tenant>/<type>/<tag>"
    firmware: tuple[str, ...] | None = None  # ids that may receive it; None = any allowed firmware
    min_svn: int | None = None
    unsafe_unbound: bool = False             # released even to a launch not bound to its owner (warned)


@dataclass(frozen=True)
class IdBlockRules:
    """[id_block]: the owner-signed ID block (SNP ABI Table 75/76) as the report shows it.
    Digests are SHA-384 of AMD's 0x404-byte public-key structure (ID_KEY_DIGEST, AUTHOR_KEY_DIGEST)."""

    trusted_id_keys: tuple[bytes, ...] | None = None
    trusted_author_keys: tuple[bytes, ...] | None = None
    require_id_block: bool = False
    require_author_key: bool = False

    @property
    def names_owner(self) -> bool:
        return bool(self.trusted_id_keys) or bool(self.trusted_author_keys)


@dataclass(frozen=True)
class TenantPolicy:
    tenant: str
    path: str
    digest: str                              # sha256 of the file's bytes
    description: str
    firmware: tuple[FirmwareEntry, ...]
    min_firmware_svn: int | None
    revoked: frozenset[str]
    shapes: tuple[ShapeRule, ...]
    platform: PlatformRules
    guest: GuestRules
    secrets: tuple[SecretRule, ...]
    # Where firmware files named by relative path are looked up.
    base_dir: str = field(default=".", compare=False)
    id_block: IdBlockRules = field(default_factory=IdBlockRules)
    report_rules: ReportRules | None = None   # [report] (verifier.appraise.report_rules); None: none checked
    # [[firmware.publishers]] (publishers.py): admit builds not listed above, on a signed endorsement.
    publishers: tuple[PublisherRule, ...] = ()

    def firmware_by_id(self, fwid: str) -> FirmwareEntry | None:
        return next((f for f in self.firmware if f.id == fwid), None)

    def firmware_by_digest(self, sha384_hex: str) -> FirmwareEntry | None:
        h = sha384_hex.lower()
        return next((f for f in self.firmware if f.sha384 == h), None)

    def secret(self, path: str) -> SecretRule | None:
        return next((s for s in self.secrets if s.path == path), None)


# -- validation ---------------------------------------------------------------
P = tuple[str | int, ...]


class _Errors:
    """Collects (path, reason) pairs; rendered with file:line at the end."""

    def __init__(self) -> None:
        self.items: list[tuple[P, str]] = []

    def add(self, path: P, why: str) -> None:
        self.items.append((path, why))


def _dotted(path: P) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _tname(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", str: "a string", list: "an array", dict: "a table",
            float: "a float"}.get(type(v), type(v).__name__)


def _table(errs: _Errors, path: P, value: Any, allowed: set[str]) -> dict[str, Any]:
    """A table with only known keys (unknown keys are reported, then ignored)."""
    if not isinstance(value, dict):
        errs.add(path, f"must be a table, not {_tname(value)}")
        return {}
    for key in value:
        if key not in allowed:
            errs.add(path + (key,), f"unknown key {key!r} (known: {', '.join(sorted(allowed))})")
    return value


def _int(errs: _Errors, path: P, v: Any, lo: int, hi: int) -> int | None:
    if isinstance(v, bool) or not isinstance(v, int):
        errs.add(path, f"must be an integer, not {_tname(v)}")
        return None
    if not lo <= v <= hi:
        errs.add(path, f"{v} is out of range {lo}..{hi}")
        return None
    return v


def _bool(errs: _Errors, path: P, v: Any) -> bool | None:
    if not isinstance(v, bool):
        errs.add(path, f"must be true or false, not {_tname(v)}")
        return None
    return v


def _str(errs: _Errors, path: P, v: Any) -> str | None:
    if not isinstance(v, str):
        errs.add(path, f"must be a string, not {_tname(v)}")
        return None
    return v


def _one_of(errs: _Errors, allowed: Collection[str], why: Callable[[str], str]) -> Callable[[P, Any], str | None]:
    """An item check for _list: a string from `allowed`; anything else is reported with why(value)."""
    def check(path: P, v: Any) -> str | None:
        s = _str(errs, path, v)
        if s is not None and s not in allowed:
            errs.add(path, why(s))
            return None
        return s
    return check


def _list(errs: _Errors, path: P, v: Any, item: Callable[[P, Any], Any], *, nonempty: bool = True) -> list[Any]:
    if not isinstance(v, list):
        errs.add(path, f"must be an array, not {_tname(v)}")
        return []
    if nonempty and not v:
        errs.add(path, "must not be empty (leave the key out to not check it)")
    if len(v) > MAX_LIST:
        errs.add(path, f"has {len(v)} entries; at most {MAX_LIST}")
        return []
    out = []
    for i, x in enumerate(v):
        r = item(path + (i,), x)
        if r is not None:
            out.append(r)
    return out


def _hexbytes(errs: _Errors, path: P, v: Any, size: int, what: str) -> str | None:
    s = _str(errs, path, v)
    if s is None:
        return None
    if not re.fullmatch(r"[0-9a-fA-F]*", s):
        errs.add(path, f"{what} must be hex digits")
        return None
    if len(s) != 2 * size:
        errs.add(path, f"{what} must be {2 * size} hex digits ({size} bytes); got {len(s)}")
        return None
    return s.lower()


def _floor(errs: _Errors, path: P, v: Any, product: Product) -> TcbFloor | None:
    t = _table(errs, path, v, set(TCB_COMPONENTS))
    vals: dict[str, int] = {}
    for k, x in t.items():
        if k not in TCB_COMPONENTS:
            continue
        if k == "fmc" and product is not Product.TURIN:
            errs.add(path + (k,), f"fmc exists only in Turin's TCB (SNP ABI Table 3), not {product}")
            continue
        n = _int(errs, path + (k,), x, 0, 255)
        if n is not None:
            vals[k] = n
    return TcbFloor(**vals) if t else None


def _floors(errs: _Errors, path: P, v: Any, products: tuple[Product, ...] | None) -> tuple[tuple[Product, TcbFloor], ...]:
    if not isinstance(v, dict):
        errs.add(path, f"must be a table of products, not {_tname(v)}")
        return ()
    out: list[tuple[Product, TcbFloor]] = []
    for name, sub in v.items():
        try:
            product = Product.parse(name)
        except FirmgateError:
            errs.add(path + (name,), f"unknown product {name!r}; expected Milan, Genoa or Turin")
            continue
        if products is not None and product not in products:
            errs.add(path + (name,), f"product {product} is not in platform.products")
        f = _floor(errs, path + (name,), sub, product)
        if f is not None:
            out.append((product, f))
    return tuple(out)


def _firmware(errs: _Errors, doc: dict[str, Any]
              ) -> tuple[list[tuple[int, FirmwareEntry]], int | None, frozenset[str]]:
    if "firmware" not in doc:
        errs.add(("firmware",), "missing [firmware] (with at least one [[firmware.allowed]] entry)")
        return [], None, frozenset()
    fw = _table(errs, ("firmware",), doc["firmware"], {"allowed", "revoked", "min_svn", "publishers"})
    min_svn = _int(errs, ("firmware", "min_svn"), fw["min_svn"], 0, 2**32 - 1) if "min_svn" in fw else None
    entries: list[tuple[int, FirmwareEntry]] = []   # (index in firmware.allowed, entry)
    seen_ids: dict[str, int] = {}
    seen_digests: dict[str, str] = {}
    allowed = fw.get("allowed")
    if allowed is None or allowed == []:
        if not fw.get("publishers"):  # a policy may trust publishers only
            errs.add(("firmware",), "no [[firmware.allowed]] or [[firmware.publishers]] entry: nothing could ever match")
    elif not isinstance(allowed, list):
        errs.add(("firmware", "allowed"), f"must be an array of tables ([[firmware.allowed]]), not {_tname(allowed)}")
    else:
        for i, raw in enumerate(allowed[:MAX_LIST]):
            p: P = ("firmware", "allowed", i)
            t = _table(errs, p, raw, {"id", "sha384", "svn", "bytes", "enforces_boot_chain"})
            for req in ("id", "sha384", "svn", "bytes"):
                if t and req not in t:
                    errs.add(p, f"firmware entry is missing {req!r}")
            fwid = _str(errs, p + ("id",), t["id"]) if "id" in t else None
            if fwid is not None and not FIRMWARE_ID_RE.fullmatch(fwid):
                errs.add(p + ("id",), f"firmware id {fwid!r} must be 1-64 of A-Z a-z 0-9 . _ + - (not starting with a symbol)")
                fwid = None
            if fwid is not None:
                if fwid in seen_ids:
                    errs.add(p + ("id",), f"duplicate firmware id {fwid!r} (first at firmware.allowed[{seen_ids[fwid]}])")
                    fwid = None
                else:
                    seen_ids[fwid] = i
            digest = _hexbytes(errs, p + ("sha384",), t["sha384"], 48, "sha384 digest") if "sha384" in t else None
            if digest is not None and digest in seen_digests:
                errs.add(p + ("sha384",), f"digest already listed as firmware {seen_digests[digest]!r}")
                digest = None
            svn = _int(errs, p + ("svn",), t["svn"], 0, 2**32 - 1) if "svn" in t else None
            loc = _str(errs, p + ("bytes",), t["bytes"]) if "bytes" in t else None
            if loc is not None and loc != UPLOADED:
                rel = Path(loc)
                if not loc or rel.is_absolute() or ".." in rel.parts:
                    errs.add(p + ("bytes",), f"bytes must be {UPLOADED!r} or a path inside the policy directory, not {loc!r}")
                    loc = None
            chain: str | None = None
            if "enforces_boot_chain" in t:
                chain = _str(errs, p + ("enforces_boot_chain",), t["enforces_boot_chain"])
                if chain is not None and not 8 <= len(chain.strip()) <= 500:
                    errs.add(p + ("enforces_boot_chain",), "enforces_boot_chain is the owner's reason (8-500 "
                             "characters) why this firmware boots only what the owner allows")
                    chain = None
            if fwid is not None and digest is not None and svn is not None and loc is not None:
                seen_digests[digest] = fwid
                entries.append((i, FirmwareEntry(fwid, digest, svn, loc, chain.strip() if chain else None)))
        if len(allowed) > MAX_LIST:
            errs.add(("firmware", "allowed"), f"at most {MAX_LIST} firmware entries")
    revoked: set[str] = set()
    if "revoked" in fw:
        def rev(p: P, x: Any) -> str | None:
            s = _str(errs, p, x)
            if s is not None and s not in seen_ids:
                errs.add(p, f"revoked names unknown firmware id {s!r}")
            return s
        revoked = set(_list(errs, ("firmware", "revoked"), fw["revoked"], rev, nonempty=False))
    return entries, min_svn, frozenset(revoked)


def _shapes(errs: _Errors, doc: dict[str, Any]) -> tuple[ShapeRule, ...]:
    raw = doc.get("shapes")
    if raw is None:
        errs.add(("shapes",), "missing [[shapes]]: at least one allowed VM shape is needed to compute measurements")
        return ()
    if not isinstance(raw, list):
        errs.add(("shapes",), f"must be an array of tables ([[shapes]]), not {_tname(raw)}")
        return ()
    out = []
    for i, item in enumerate(raw[:MAX_LIST]):
        p: P = ("shapes", i)
        t = _table(errs, p, item, {"vmm", "vcpus", "vcpu_types", "guest_features", "kernel"})
        for req in ("vcpus", "vcpu_types"):
            if t and req not in t:
                errs.add(p, f"shape is missing {req!r}")
        vmm = _str(errs, p + ("vmm",), t.get("vmm", "qemu"))
        if vmm is not None and vmm not in VMMS:
            errs.add(p + ("vmm",), f"vmm {vmm!r} is not one of {', '.join(VMMS)}")
            vmm = None
        vcpus = _list(errs, p + ("vcpus",), t["vcpus"],
                      lambda q, x: _int(errs, q, x, 1, MAX_VCPUS)) if "vcpus" in t else []

        vtype = _one_of(errs, VCPU_TYPES, lambda s: f"unknown vCPU type {s!r} "
                        f"(sev-snp-measure knows: {', '.join(sorted(VCPU_TYPES))})")
        vtypes = _list(errs, p + ("vcpu_types",), t["vcpu_types"], vtype) if "vcpu_types" in t else []
        gf = _int(errs, p + ("guest_features",), t.get("guest_features", 1), 0, 2**64 - 1)
        kernel: KernelHashes | None = None
        if "kernel" in t:
            k = _table(errs, p + ("kernel",), t["kernel"], {"kernel", "initrd", "cmdline"})
            hs = {n: _hexbytes(errs, p + ("kernel", n), k[n], 32, f"{n} sha256") if n in k else None
                  for n in ("kernel", "initrd", "cmdline")}
            for n in hs:
                if k and n not in k:
                    errs.add(p + ("kernel",), f"kernel hashes need {n!r} (sha256 of the {n})")
            if all(hs.values()):
                kernel = KernelHashes(**hs)  # type: ignore[arg-type]
        if vmm and vcpus and vtypes and gf is not None and ("kernel" not in t or kernel is not None):
            out.append(ShapeRule(vmm, tuple(vcpus), tuple(vtypes), gf, kernel))
    if len(raw) > MAX_LIST:
        errs.add(("shapes",), f"at most {MAX_LIST} shape entries")
    total = sum(len(s.vcpus) * len(s.vcpu_types) for s in out)
    if total > MAX_SHAPES:
        errs.add(("shapes",), f"the shape rules expand to {total} shapes; at most {MAX_SHAPES} "
                              "(each costs a measurement per firmware)")
    return tuple(out)


def _platform(errs: _Errors, doc: dict[str, Any]) -> PlatformRules:
    if "platform" not in doc:
        return PlatformRules()
    t = _table(errs, ("platform",), doc["platform"],
               {"products", "signers", "min_tcb", "min_launch_tcb", "allow_provisional_firmware",
                "allow_simulated_platform", "vmpls", "host_data"})
    p: P = ("platform",)
    products: tuple[Product, ...] | None = None
    if "products" in t:
        def prod(q: P, x: Any) -> Product | None:
            s = _str(errs, q, x)
            if s is None:
                return None
            try:
                return Product.parse(s)
            except FirmgateError:
                errs.add(q, f"unknown product {s!r}; expected Milan, Genoa or Turin")
                return None
        products = tuple(_list(errs, p + ("products",), t["products"], prod))
    signers: tuple[str, ...] | None = None
    if "signers" in t:
        sig = _one_of(errs, SIGNERS, lambda s: f"signer {s!r} is not VCEK or VLEK")
        signers = tuple(_list(errs, p + ("signers",), t["signers"], sig))
    vmpls: tuple[int, ...] | None = None
    if "vmpls" in t:
        vmpls = tuple(_list(errs, p + ("vmpls",), t["vmpls"], lambda q, x: _int(errs, q, x, 0, 3)))
    host_data: bytes | Literal["initdata"] | None = None
    if "host_data" in t:
        v = t["host_data"]
        if v == INITDATA:
            host_data = "initdata"
        else:
            h = _hexbytes(errs, p + ("host_data",), v, 32, f'host_data (or "{INITDATA}")')
            host_data = bytes.fromhex(h) if h else None
    flags = {}
    for name in ("allow_provisional_firmware", "allow_simulated_platform"):
        if name in t:
            b = _bool(errs, p + (name,), t[name])
            if b is not None:
                flags[name] = b
    return PlatformRules(
        products=products, signers=signers,
        min_tcb=_floors(errs, p + ("min_tcb",), t["min_tcb"], products) if "min_tcb" in t else (),
        min_launch_tcb=_floors(errs, p + ("min_launch_tcb",), t["min_launch_tcb"], products)
        if "min_launch_tcb" in t else (),
        vmpls=vmpls, host_data=host_data, **flags)


def _guest(errs: _Errors, doc: dict[str, Any]) -> GuestRules:
    if "guest" not in doc:
        return GuestRules()
    p: P = ("guest",)
    t = _table(errs, p, doc["guest"], {"unsafe_allow_debug", "allow_migrate_ma", "allow_smt",
                                       "require_single_socket", "min_abi", "min_guest_svn"})
    kw: dict[str, Any] = {}
    for name in ("unsafe_allow_debug", "allow_migrate_ma", "allow_smt", "require_single_socket"):
        if name in t:
            b = _bool(errs, p + (name,), t[name])
            if b is not None:
                kw[name] = b
    if "min_abi" in t:
        s = _str(errs, p + ("min_abi",), t["min_abi"])
        m = re.fullmatch(r"(\d{1,3})\.(\d{1,3})", s) if s is not None else None
        if s is not None and (not m or int(m[1]) > 255 or int(m[2]) > 255):
            errs.add(p + ("min_abi",), f'min_abi must be "MAJOR.MINOR" (each 0-255), not {s!r}')
        elif m:
            kw["min_abi"] = (int(m[1]), int(m[2]))
    if "min_guest_svn" in t:
        n = _int(errs, p + ("min_guest_svn",), t["min_guest_svn"], 0, 2**32 - 1)
        if n is not None:
            kw["min_guest_svn"] = n
    return GuestRules(**kw)


def _secrets(errs: _Errors, doc: dict[str, Any], tenant: str, fw_ids: set[str]) -> tuple[SecretRule, ...]:
    raw = doc.get("secrets")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        errs.add(("secrets",), f"must be an array of tables ([[secrets]]), not {_tname(raw)}")
        return ()
    out: list[SecretRule] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw[:MAX_LIST]):
        p: P = ("secrets", i)
        t = _table(errs, p, item, {"path", "firmware", "min_svn", "unsafe_unbound"})
        if t and "path" not in t:
            errs.add(p, "secret is missing 'path' (\"<tenant>/<type>/<tag>\")")
        path = _str(errs, p + ("path",), t["path"]) if "path" in t else None
        if path is not None:
            parts = path.split("/")
            if len(parts) != 3 or not all(RESOURCE_PART_RE.fullmatch(x) for x in parts):
                errs.add(p + ("path",), f"secret path {path!r} must be <repository>/<type>/<tag>")
                path = None
            elif parts[0] != tenant:
                errs.add(p + ("path",), f"secret path {path!r} is not owned by tenant {tenant!r} "
                                        f"(the repository part must be {tenant!r})")
                path = None
            elif path in seen:
                errs.add(p + ("path",), f"duplicate secret {path!r} (first at secrets[{seen[path]}])")
                path = None
            else:
                seen[path] = i
        firmware: tuple[str, ...] | None = None
        if "firmware" in t:
            fid = _one_of(errs, fw_ids, lambda s: f"secret names unknown firmware id {s!r}")
            firmware = tuple(_list(errs, p + ("firmware",), t["firmware"], fid))
        min_svn = _int(errs, p + ("min_svn",), t["min_svn"], 0, 2**32 - 1) if "min_svn" in t else None
        unbound = _bool(errs, p + ("unsafe_unbound",), t["unsafe_unbound"]) if "unsafe_unbound" in t else False
        if path is not None:
            out.append(SecretRule(path, firmware, min_svn, bool(unbound)))
    return tuple(out)


def tenant_of(path: str | Path) -> str:
    return Path(path).stem


def read_firmware_file(path: Path, fwid: str | None = None, root: Path | None = None) -> bytes:
    """The firmware image in a file: a UKI add-on (its `.efifw` entry `fwid`, or its only one) or a raw image.

    With `root` (the policy file's directory): the file must resolve inside it, symlinks
    included, and be a regular file of at most MAX_ADDON_SIZE bytes. It is opened non-blocking,
    so a FIFO or a device named by a policy fails at once instead of hanging the loader
    (docs/security.md REVIEW-6). Nothing about a refused file's content is ever read.
    """
    from ..firmware.addon import MAX_ADDON_SIZE, read_addon
    target = path
    if root is not None:
        target = path.resolve(strict=True)  # OSError (ENOENT, ELOOP) for a missing file or a loop
        if not target.is_relative_to(root.resolve(strict=True)):
            raise FirmgateError(f"{path.name} resolves outside the policy's directory "
                                "(firmware files must live in the policy tree)")
    # O_NOFOLLOW on the resolved name: a symlink swapped in after resolve() is refused too.
    nofollow = os.O_NOFOLLOW if root is not None else 0
    fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | nofollow)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FirmgateError(f"{path.name} is not a regular file")
        if st.st_size > MAX_ADDON_SIZE:
            raise FirmgateError(f"{path.name} is larger than {MAX_ADDON_SIZE} bytes")
        data = fh.read(MAX_ADDON_SIZE + 1)
    if len(data) > MAX_ADDON_SIZE:
        raise FirmgateError(f"{path.name} is larger than {MAX_ADDON_SIZE} bytes")
    if data[:2] == b"MZ":  # a PE file: the add-on that carries the firmware
        addon = read_addon(data)
        if fwid is not None and fwid in addon.fwids:
            return addon.select(fwid).payload
        return addon.select(None).payload
    return data


def _check_files(errs: _Errors, firmware: list[tuple[int, FirmwareEntry]], base: Path) -> None:
    """Every firmware file named in the policy exists and has the listed digest."""
    for i, fw in firmware:
        if fw.uploaded:
            continue
        p: P = ("firmware", "allowed", i, "bytes")
        f = base / fw.location
        try:
            payload = read_firmware_file(f, fw.id, root=base)
        except OSError as exc:
            errs.add(p, f"firmware file {fw.location!r} cannot be read: {exc.strerror or exc}")
            continue
        except FirmgateError as exc:
            errs.add(p, f"firmware file {fw.location!r}: {exc.diagnostics()}")
            continue
        actual = hashlib.sha384(payload).hexdigest()
        if actual != fw.sha384:
            errs.add(p, f"firmware file {fw.location!r} has sha384 {actual[:16]}...; "
                        f"the policy lists {fw.sha384[:16]}... for {fw.id!r}")
            continue
        from ..firmware.image import require_snp_firmware
        try:
            require_snp_firmware(payload)
        except FirmgateError as exc:
            errs.add(p, f"firmware file {fw.location!r} cannot be an SEV-SNP firmware: {exc.diagnostics()}")


def parse_policy(text: str | bytes, path: str | Path, *, tenant: str | None = None, check_files: bool = True
                 ) -> tuple[TenantPolicy | None, list[PolicyFileError]]:
    """The policy in `text` (from file `path`) and every error found. The policy is None on any error.

    With `check_files`, firmware files named by path (relative to the policy file's
    directory) are read and their digests compared with the policy's.
    """
    spath = str(path)
    tenant = tenant if tenant is not None else tenant_of(path)
    errors: list[PolicyFileError] = []
    raw = text.encode() if isinstance(text, str) else bytes(text)
    if len(raw) > MAX_POLICY_SIZE:
        return None, [PolicyFileError(spath, None, None, f"policy is {len(raw)} bytes; at most {MAX_POLICY_SIZE}")]
    try:
        source = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = raw[:exc.start].count(b"\n") + 1
        return None, [PolicyFileError(spath, bad_line, None, "not valid UTF-8 (TOML files are UTF-8)")]
    if not TENANT_RE.fullmatch(tenant):
        errors.append(PolicyFileError(spath, None, None,
                                      f"tenant id {tenant!r} (the file name) must be 1-63 of a-z 0-9 _ - "
                                      "starting with a letter or digit"))
    try:
        doc = tomllib.loads(source)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = re.search(r"\(at line (\d+), column \d+\)", msg)
        line = int(m[1]) if m else None
        why = re.sub(r"\s*\(at line \d+, column \d+\)", "", msg) if m else msg
        if "end of document" in msg:
            line = source.count("\n") + 1
        errors.append(PolicyFileError(spath, line, None, f"TOML syntax: {why}"))
        return None, errors
    except RecursionError:
        errors.append(PolicyFileError(spath, None, None, "TOML syntax: arrays or tables nest too deeply"))
        return None, errors
    index = LineIndex(source)
    errs = _Errors()
    top = _table(errs, (), doc, {"version", "description", "firmware", "shapes", "platform", "guest", "secrets",
                                 "id_block", "report"})
    if "version" not in top:
        errs.add((), f"missing 'version = {FORMAT_VERSION}' (the policy format version)")
    else:
        v = _int(errs, ("version",), top["version"], 0, 2**31)
        if v is not None and v != FORMAT_VERSION:
            errs.add(("version",), f"policy format version {v} is not supported (this firmgate reads {FORMAT_VERSION})")
    description = ""
    if "description" in top:
        description = _str(errs, ("description",), top["description"]) or ""
    located, min_svn, revoked = _firmware(errs, top)
    firmware = tuple(f for _, f in located)
    shapes = _shapes(errs, top)
    platform = _platform(errs, top)
    guest = _guest(errs, top)
    secrets = _secrets(errs, top, tenant, {f.id for f in firmware})
    from .publishers import parse_publishers  # its own module; imports this one's helpers
    publishers = parse_publishers(errs, top.get("firmware"), Path(spath).parent, check_files=check_files)
    from .binding import id_block_rules, unbound_secrets
    id_rules = id_block_rules(errs, top)
    if not any(p[:1] == ("firmware",) or p[:1] == ("shapes",) or p[:1] == ("secrets",) for p, _ in errs.items):
        # Only a policy whose firmware, shapes and secrets parsed can be judged for binding.
        for p, why in unbound_secrets(firmware, shapes, platform, id_rules, secrets, revoked, min_svn):
            errs.add(p, why)
        from .publishers import unbound_publisher_secrets  # the same rule for builds publishers endorse
        for p, why in unbound_publisher_secrets(publishers, shapes, secrets):
            errs.add(p, why)
    # Imported here: report_rules builds on this module's helpers.
    from .report_rules import parse_report_rules

    report_rules = parse_report_rules(errs, top)
    if check_files:
        _check_files(errs, located, Path(spath).parent)
    for p, why in errs.items:
        # A missing top-level section has no line of its own: point at the file's start.
        line = index.line(p) or (1 if len(p) <= 1 else None)
        errors.append(PolicyFileError(spath, line, _dotted(p) or None, why))
    if errors:
        errors.sort(key=lambda e: (e.line or 0))
        return None, errors
    policy = TenantPolicy(
        tenant=tenant, path=spath, digest=hashlib.sha256(raw).hexdigest(), description=description,
        firmware=firmware, min_firmware_svn=min_svn, revoked=revoked, shapes=shapes, platform=platform,
        guest=guest, secrets=secrets, base_dir=str(Path(spath).parent), id_block=id_rules,
        report_rules=report_rules, publishers=publishers)
    return policy, []


def load_policy_file(path: str | Path, *, check_files: bool = True
                     ) -> tuple[TenantPolicy | None, list[PolicyFileError]]:
    """Read and parse one policy file; (policy or None, every error)."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            raw = fh.read(MAX_POLICY_SIZE + 1)
    except OSError as exc:
        return None, [PolicyFileError(str(p), None, None, f"cannot read: {exc.strerror or exc}")]
    return parse_policy(raw, p, check_files=check_files)


def load_policy(path: str | Path, *, check_files: bool = True) -> TenantPolicy:
    """Parse one policy file; raises PolicyErrors listing every problem."""
    policy, errors = load_policy_file(path, check_files=check_files)
    if errors or policy is None:
        raise PolicyErrors(errors)
    return policy
