"""Tenants' policies from a git working tree: load, reload on change, keep the last good one.

`PolicyStore(directory)` loads every `<tenant>.toml` in `directory` and records
the commit (`git rev-parse HEAD`) and whether the file differs from it (dirty),
so every verdict can name the exact policy it used. `refresh()` is cheap (a
stat per file, at most once per `min_interval` seconds) and runs inside
`get()`, so a change on disk is picked up without a restart. A changed file
that fails the check is refused: the last good policy stays in force, the
errors are kept (`last_errors(tenant)`) and logged. A deleted file removes the
tenant (deleting is a deliberate change, not a broken one).

At scale (issue 21): tables share measurements and firmware-file facts
(verifier/appraise/shared.py), each tenant is installed as soon as it is built
(so a reload serves the tenants already done), `candidates(measurement)` names
the tenants whose table holds a measurement (verifier/appraise/index.py), and
`background=True` makes the first load run in a thread while `loading()` is true.

Thread-safe: the broker's worker threads share one store.
"""
from __future__ import annotations

import gc
import hashlib
import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FirmgateError, FirmwareError, PolicyErrors, PolicyFileError, UsageError
from ..observe import emit
from .index import MeasurementIndex, admits_unlisted_firmware
from .policy import FirmwareEntry, TenantPolicy, load_policy_file
from .reference import ReferenceTable, split_firmware
from .shared import MeasurementMemo

log = logging.getLogger("firmgate.policy")

GIT_TIMEOUT_S = 10
FREEZE_GC_MIN_TENANTS = 500  # below this, a full collection over the policies costs little
MAX_UPLOADED = 64          # firmware images (bytes) the store keeps for "uploaded" entries
MAX_TREE_FILES = 4096      # files of the policy tree watched for changes (RT-5)
MAX_ENDORSEMENTS = 256     # endorsements kept that arrived before their firmware (admin upload)


class FirmwareNotAdmitted(FirmwareError):
    """Firmware no policy allows. `diagnostics()` says why each endorsement was refused, naming the
    refusing policies' publisher rules (their names, fwid patterns, minimum svn, trust expiry):
    for the operator. `public` holds only the requester's own facts (docs/security.md RT-3)."""

    def __init__(self, why: str, public: str) -> None:
        super().__init__(why)
        self.public = public


class UnknownTenant(FirmgateError):
    """No usable policy for this tenant (no file, or it never passed the check)."""

    exit_code = 2


@dataclass
class LoadedPolicy:
    """One tenant's policy in force, with where it came from and its reference table."""

    policy: TenantPolicy
    commit: str | None            # git HEAD when loaded; None outside a git work tree
    dirty: bool                   # the file differs from HEAD (or is untracked)
    table: ReferenceTable
    loaded_at: float = field(default_factory=time.time)

    @property
    def tenant(self) -> str:
        return self.policy.tenant

    @property
    def digest(self) -> str:
        return self.policy.digest

    @property
    def policy_id(self) -> str:
        """Changes whenever the policy in force changes: tenant@commit, plus the file digest if dirty."""
        if self.commit and not self.dirty:
            return f"{self.tenant}@{self.commit}"
        base = f"{self.tenant}@{self.commit}+dirty" if self.commit else f"{self.tenant}"
        return f"{base}:sha256:{self.digest}"

    def allows_firmware_digest(self, sha384_hex: str) -> bool:
        fw = self.policy.firmware_by_digest(sha384_hex)
        return fw is not None and fw.id not in self.policy.revoked

    def add_firmware_bytes(self, data: bytes, fwid: str | None = None) -> FirmwareEntry:
        """Firmware that came with the evidence or an upload: extracted, accepted only if allowed, measured."""
        return self.table.add_firmware_bytes(data, fwid)


def _git(directory: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, timeout=GIT_TIMEOUT_S,
                             check=False, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"})
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.decode("utf-8", "replace")


def git_state(directory: Path) -> tuple[str | None, set[str]]:
    """(HEAD commit or None, absolute paths under `directory` that differ from HEAD or are untracked)."""
    head = _git(directory, "rev-parse", "--verify", "-q", "HEAD")
    top = _git(directory, "rev-parse", "--show-toplevel")
    if head is None or top is None:
        return None, set()
    # --ignored: a file git ignores never shows as changed, so its edits would keep the policy_id
    # (the broker's verdict cache key) of the version first loaded; listed here, it counts as dirty (RT-2).
    status = _git(directory, "status", "--porcelain=v1", "-z", "--untracked-files=all", "--ignored=traditional",
                  "--", ".") or ""
    dirty: set[str] = set()
    root = Path(top.strip())
    entries = status.split("\0")
    i = 0
    while i < len(entries):
        e = entries[i]
        i += 1
        if len(e) < 4:
            continue
        code, path = e[:2], e[3:]
        if "R" in code or "C" in code:
            i += 1  # the rename's source path follows
        dirty.add(str((root / path).resolve()))
    return head.strip(), dirty


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class PolicyStore:
    def __init__(self, directory: str | Path, *, cache_dir: str | Path | None = None,
                 min_interval: float = 1.0, background: bool = False, freeze_gc: bool = False) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise UsageError(f"policy directory {self.directory} does not exist")
        self.min_interval = min_interval
        self._cache: Any = None
        if cache_dir is not None:
            from ..measure.cache import MeasurementCache
            self._cache = MeasurementCache(cache_dir)
        self._lock = threading.RLock()
        self._loaded: dict[str, LoadedPolicy] = {}
        self._errors: dict[str, list[PolicyFileError]] = {}
        self._seen: dict[str, tuple[int, int, int] | None] = {}   # tenant -> stat key of the file last read
        self._head_seen: tuple[int, int, int] | None = None
        self._tree_seen: frozenset[tuple[str, tuple[int, int, int] | None]] | None = None
        self._gitdir: Path | None = None
        self._gitdir_checked = False
        self._checked_at = 0.0
        self._uploaded: dict[str, bytes] = {}   # sha384 hex -> firmware payload, survives reloads
        # Builds admitted on an endorsement: sha384 -> (payload, endorsements); re-admitted on every
        # reload, under the policy then in force (a revoked or expired one then drops out).
        self._endorsed: dict[str, tuple[bytes, tuple[bytes, ...]]] = {}
        self._endorsements: dict[str, list[bytes]] = {}   # firmware sha384 -> endorsements waiting for it
        self._gen: dict[str, int] = {}           # tenant -> number of the newest reload started
        self._memo = MeasurementMemo()
        self._index = MeasurementIndex()
        self._pending: set[str] = set()          # tenants with a file being built and no version in force
        self._first_done = threading.Event()
        self._freeze_gc = freeze_gc
        if background:
            threading.Thread(target=self._first_load, name="policy-load", daemon=True).start()
        else:
            self._first_load()

    def _first_load(self) -> None:
        try:
            self.refresh(force=True)
        except Exception:  # a crash here must not leave the broker "loading" forever
            log.exception("loading the policies failed")
        finally:
            if self._freeze_gc and len(self._loaded) >= FREEZE_GC_MIN_TENANTS:
                # Thousands of tenants' policies and tables live as long as the process: out of the
                # cyclic collector's sight, a full collection no longer walks them (~110 ms at 10,000).
                gc.freeze()
            self._first_done.set()

    def loading(self) -> bool:
        """True until the first load has finished, or while a tenant's file waits for its first version."""
        with self._lock:
            return not self._first_done.is_set() or bool(self._pending)

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self._first_done.wait(timeout)

    def pending(self, tenant: str) -> bool:
        """The tenant has a policy file that is still being loaded for the first time."""
        with self._lock:
            return tenant in self._pending

    def candidates(self, measurement: bytes) -> list[str]:
        """Tenants whose policy in force could accept `measurement` (a superset; never misses one)."""
        self.refresh()
        return self._index.candidates(measurement)

    # -- reading -------------------------------------------------------------------
    def tenants(self) -> list[str]:
        self.refresh()
        with self._lock:
            return sorted(self._loaded)

    def get(self, tenant: str, *, refresh: bool = True) -> LoadedPolicy:
        if refresh:
            self.refresh()
        with self._lock:
            loaded = self._loaded.get(tenant)
            if loaded is None:
                errs = self._errors.get(tenant)
                if errs:
                    raise PolicyErrors(errs)
                raise UnknownTenant(f"no policy for tenant {tenant!r}")
            return loaded

    def last_errors(self, tenant: str) -> list[PolicyFileError]:
        """Errors of the tenant's newest file if it was refused (empty when the file in force is current)."""
        with self._lock:
            return list(self._errors.get(tenant, ()))

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {t: {"policy_id": lp.policy_id, "commit": lp.commit, "dirty": lp.dirty,
                        "loaded_at": lp.loaded_at, "refused": [e.diagnostics() for e in self._errors.get(t, ())]}
                    for t, lp in self._loaded.items()} | {
                t: {"policy_id": None, "refused": [e.diagnostics() for e in errs]}
                for t, errs in self._errors.items() if t not in self._loaded}

    # -- reloading -----------------------------------------------------------------
    def _head_key(self) -> tuple[int, int, int] | None:
        # HEAD moves when a commit lands; its reflog file changes on every commit and checkout.
        if not self._gitdir_checked:
            gitdir = _git(self.directory, "rev-parse", "--absolute-git-dir")
            self._gitdir = Path(gitdir.strip()) if gitdir else None
            self._gitdir_checked = True
        gd = self._gitdir
        if gd is None:
            return None
        return _stat_key(gd / "logs" / "HEAD") or _stat_key(gd / "HEAD")

    def _scan(self) -> tuple[dict[str, str], dict[str, tuple[int, int, int] | None]] | None:
        """Every `*.toml` regular file (symlinks followed) by tenant, in name order, and its stat key.
        os.scandir: one stat per file (pathlib's glob + is_file + stat costs ~6x more at 10,000 files)."""
        found: list[tuple[str, str, tuple[int, int, int]]] = []
        try:
            with os.scandir(self.directory) as it:
                for e in it:
                    if not e.name.endswith(".toml") or len(e.name) <= 5:
                        continue
                    try:
                        if not e.is_file():
                            continue
                        st = e.stat()
                    except OSError:
                        continue
                    found.append((e.name[:-5], e.path, (st.st_mtime_ns, st.st_size, st.st_ino)))
        except OSError as exc:  # keep what is in force: an unreadable directory deletes nothing
            log.warning("policy directory %s unreadable (%s); policies in force kept", self.directory, exc)
            return None
        found.sort(key=lambda f: f[0])
        return {t: p for t, p, _ in found}, {t: k for t, _, k in found}

    def _tree_key(self) -> frozenset[tuple[str, tuple[int, int, int] | None]]:
        """Stat keys of the files a policy may reference (publisher keys, revocation lists, firmware
        bytes): every file of the tree but the top-level *.toml, hidden directories left out. They are
        read at load, so a change to one must reload the policies (RT-5). Bounded: a tree of more
        files than that is watched through its first MAX_TREE_FILES."""
        out: list[tuple[str, tuple[int, int, int] | None]] = []
        for top, dirs, names in os.walk(self.directory):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for n in sorted(names):
                if top == str(self.directory) and n.endswith(".toml"):
                    continue
                out.append((os.path.join(top, n), _stat_key(Path(top, n))))
                if len(out) >= MAX_TREE_FILES:
                    return frozenset(out)
        return frozenset(out)

    def refresh(self, *, force: bool = False) -> bool:
        """Pick up changed, new and deleted policy files. Returns True if anything was (re)considered.

        The cheap part (stat, bookkeeping) holds the lock; parsing and measuring do not,
        so request threads keep appraising under the policy in force meanwhile. A
        generation number per tenant makes sure a slow, older reload never replaces a newer one.
        """
        now = time.monotonic()
        with self._lock:
            if not force and now - self._checked_at < self.min_interval:
                return False
            self._checked_at = now
            scanned = self._scan()
            if scanned is None:
                return False
            files, keys = scanned
            head_key = self._head_key()
            head_moved = head_key != self._head_seen
            tree_key = self._tree_key()
            changed = [t for t in files if keys[t] != self._seen.get(t, ())]
            if tree_key != self._tree_seen:
                # A file a policy may reference changed (say, the publisher's new revocation list next to
                # an unchanged <tenant>.toml): parse every policy again, not just relabel it (RT-5). A
                # commit that changes only <tenant>.toml files re-reads just those (issue 21); one that
                # changes no bytes only relabels the policies in force (below).
                changed = list(files)
            removed = [t for t in list(self._loaded) + list(self._errors) if t not in files]
            if not changed and not removed and not head_moved:
                return False
            self._head_seen = head_key
            self._tree_seen = tree_key
            for t in set(removed):
                self._loaded.pop(t, None)
                self._index.remove(t)
                self._pending.discard(t)
                self._errors.pop(t, None)
                self._seen.pop(t, None)
                self._gen[t] = self._gen.get(t, 0) + 1
                log.info("policy for tenant %s removed (file deleted)", t)
            jobs = []
            for t in changed:
                self._seen[t] = keys[t]
                self._gen[t] = self._gen.get(t, 0) + 1
                jobs.append((t, Path(files[t]), self._gen[t]))
                if t not in self._loaded:
                    self._pending.add(t)
            uploaded = dict(self._uploaded)
        commit, dirty = git_state(self.directory)
        for t, path, gen in jobs:
            # Installed one by one: the tenants done so far serve while the rest load.
            policy, table, errors = self._build(path, uploaded)
            with self._lock:
                if self._gen.get(t) != gen:
                    continue  # a newer change of this tenant is being (or was) loaded
                self._pending.discard(t)
                self._install(t, path, policy, table, errors, commit, dirty)
        with self._lock:
            if head_moved:  # same bytes, new commit: the verdict must name the new commit
                for t, lp in list(self._loaded.items()):
                    if t in changed or t not in files:
                        continue
                    is_dirty = str(Path(files[t]).resolve()) in dirty
                    if (lp.commit, lp.dirty) != (commit, is_dirty):
                        self._loaded[t] = LoadedPolicy(lp.policy, commit, is_dirty, lp.table, lp.loaded_at)
        return True

    def _build(self, path: Path, uploaded: dict[str, bytes]
               ) -> tuple[TenantPolicy | None, ReferenceTable | None, list[PolicyFileError]]:
        """Parse, check and measure one policy file (no lock held)."""
        with self._lock:
            endorsed = dict(self._endorsed)
        policy, errors = load_policy_file(path)
        if policy is None:
            return None, None, errors
        try:
            table = ReferenceTable(policy, self._cache, self._memo)
            table.load_files()
            for digest, payload in uploaded.items():
                fw = policy.firmware_by_digest(digest)
                if fw is not None and fw.id not in policy.revoked:
                    table.add_payload(fw, payload)
            for digest, (payload, ends) in endorsed.items():
                _readmit(table, digest, payload, ends)
        except FirmgateError as exc:
            return None, None, [PolicyFileError(str(path), None, "firmware", exc.diagnostics())]
        return policy, table, []

    def _install(self, tenant: str, path: Path, policy: TenantPolicy | None, table: ReferenceTable | None,
                 errors: list[PolicyFileError], commit: str | None, dirty: set[str]) -> None:
        if errors or policy is None or table is None:
            self._errors[tenant] = errors
            emit("policy_reload", tenant=tenant, result="refused", fallback="yes" if tenant in self._loaded else "no")
            if tenant in self._loaded:
                log.warning("policy change for tenant %s refused; keeping %s in force:\n%s", tenant,
                            self._loaded[tenant].policy_id, "\n".join(e.diagnostics() for e in errors))
            else:
                log.warning("policy for tenant %s refused (no earlier good version):\n%s", tenant,
                            "\n".join(e.diagnostics() for e in errors))
            return
        # Firmware uploaded while this table was being built.
        for digest, payload in self._uploaded.items():
            fw = policy.firmware_by_digest(digest)
            if fw is not None and fw.id not in policy.revoked and not table.measured(fw.id):
                table.add_payload(fw, payload)
        for digest, (payload, ends) in self._endorsed.items():
            _readmit(table, digest, payload, ends)
        self._errors.pop(tenant, None)
        # The index learns of measurements added from now on, then takes the table's current ones.
        table.on_add = lambda ms, t=tenant: self._index.add(t, ms)
        self._index.set_tenant(tenant, [m for m, _ in table.entries()], admits_unlisted_firmware(policy))
        lp = LoadedPolicy(policy, commit, str(path.resolve()) in dirty, table)
        previous = self._loaded.get(tenant)
        self._loaded[tenant] = lp
        emit("policy_reload", tenant=tenant, result="loaded", fallback="no")
        log.debug("policy for tenant %s loaded: %s (%d reference measurements)%s", tenant, lp.policy_id,
                 len(table), f", replacing {previous.policy_id}" if previous else "")

    # -- firmware arriving from outside ----------------------------------------------------
    def add_firmware(self, data: bytes, fwid: str | None = None, endorsements: tuple[bytes, ...] = ()) -> list[str]:
        """Firmware bytes (an add-on or an image) for every tenant whose policy allows their digest,
        or admits them on an endorsement (carried in the add-on's `.corim` sections, given here, or
        uploaded earlier) from a publisher it trusts.

        Returns the tenants that accepted it; raises FirmwareError if none does, naming why each
        endorsement was refused (never which tenant refused it).
        """
        from ..endorse.admit import EndorsementRefused
        payload, carried = split_firmware(data, fwid)
        digest = hashlib.sha384(payload).hexdigest()
        accepted: list[str] = []
        refusals: list[str] = []
        admitted = False
        with self._lock:
            ends = tuple(dict.fromkeys(carried + tuple(endorsements) + tuple(self._endorsements.get(digest, ()))))
            for t, lp in self._loaded.items():
                if lp.allows_firmware_digest(digest):
                    lp.table.add_firmware_bytes(payload)
                    accepted.append(t)
                elif lp.policy.publishers:
                    try:   # admission, then measuring: reference.ReferenceTable.add_endorsed
                        lp.table.add_endorsed(payload, ends)
                    except EndorsementRefused as exc:
                        refusals.append(exc.diagnostics())
                        continue
                    accepted.append(t)
                    admitted = True
            if not accepted:
                why = f"firmware sha384 {digest[:16]}... is not allowed by any tenant's policy"
                # The same words whoever trusts which publisher: only what the requester sent.
                public = why + ("; no endorsement it came with admits it (the reasons are in the operator's "
                                "audit log)" if ends else "; it came with no endorsement")
                if refusals:
                    why += "; " + "; ".join(dict.fromkeys(refusals))
                raise FirmwareNotAdmitted(why, public)
            if admitted and digest not in self._endorsed and len(self._endorsed) < MAX_UPLOADED:
                self._endorsed[digest] = (payload, ends)
            elif not admitted and digest not in self._uploaded and len(self._uploaded) < MAX_UPLOADED:
                self._uploaded[digest] = payload
        return accepted

    def add_endorsement(self, data: bytes) -> str:
        """An endorsement on its own (admin upload, or beside the guest's firmware): kept for when its
        firmware arrives, if some tenant trusts its signer. Returns its id; EndorsementRefused otherwise."""
        from ..endorse.admit import EndorsementRefused, verify_with
        with self._lock:
            # Each tenant's publishers on their own: in one merged list the first rule with the signer's
            # kid would decide, and another tenant's rule for the same key (say, pinned by fingerprint
            # where this one has the key file) could refuse what the uploader's policy trusts (RT-4).
            signed, refused = None, None
            for lp in self._loaded.values():
                if not lp.policy.publishers:
                    continue
                try:
                    _, signed = verify_with(data, lp.policy.publishers)
                    break
                except EndorsementRefused as exc:
                    refused = refused or exc
            if signed is None:
                raise refused or EndorsementRefused("no tenant's policy trusts a firmware publisher")
            e = signed.endorsement
            waiting = self._endorsements.setdefault(e.sha384, [])
            if data not in waiting:
                if sum(len(v) for v in self._endorsements.values()) >= MAX_ENDORSEMENTS:
                    raise EndorsementRefused(f"at most {MAX_ENDORSEMENTS} endorsements are kept")
                waiting.append(bytes(data))
        return e.id


def _readmit(table: ReferenceTable, digest: str, payload: bytes, ends: tuple[bytes, ...]) -> None:
    """Admit an earlier endorsed build under a (re)loaded policy; one no longer admitted is left out."""
    if table.policy.firmware_by_digest(digest) is not None or not table.policy.publishers:
        return
    try:
        table.add_endorsed(payload, ends)
    except FirmgateError as exc:
        log.info("policy %s no longer admits firmware %s...: %s", table.policy.tenant, digest[:16], exc.diagnostics())


def load_for_cli(path: str | Path, tenant: str | None = None, *, cache_dir: str | Path | None = None
                 ) -> LoadedPolicy:
    """`firmgate verify --policy FILE_OR_DIR [--tenant T]`: one tenant's policy, ready to appraise.

    A directory is loaded as a PolicyStore (tenant required); a file is that tenant's
    policy (`--tenant`, if given, must match its name). A file that fails the check
    raises PolicyErrors with every error (file:line: reason).
    """
    p = Path(path)
    if p.is_dir():
        if tenant is None:
            raise UsageError("--policy names a directory: --tenant is needed to pick the policy")
        return PolicyStore(p, cache_dir=cache_dir).get(tenant, refresh=False)
    if not p.is_file():
        raise UsageError(f"policy {p} does not exist")
    policy, errors = load_policy_file(p)
    if errors or policy is None:
        raise PolicyErrors(errors)
    if tenant is not None and tenant != policy.tenant:
        raise UsageError(f"policy file {p.name} is tenant {policy.tenant!r}, not {tenant!r}")
    cache = None
    if cache_dir is not None:
        from ..measure.cache import MeasurementCache
        cache = MeasurementCache(cache_dir)
    table = ReferenceTable(policy, cache)
    try:
        table.load_files()
    except FirmgateError as exc:
        raise PolicyErrors([PolicyFileError(str(p), None, "firmware", exc.diagnostics())]) from exc
    commit, dirty = git_state(p.parent)
    return LoadedPolicy(policy, commit, str(p.resolve()) in dirty, table)
