"""Content-addressed firmware store and the atomically switched `firmware` link.

Every write is crash-safe: a temporary file in the same directory, fsync, rename
over the final name, fsync of the directory (rename(2) is atomic within one file
system; the directory fsync makes the new name durable). The link is switched
the same way: a symlink under a temporary name, then rename over `firmware`.
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

from .errors import InstallFailed

# A crash-test checkpoint (install._checkpoint): called with the name of the point reached.
Checkpoint = Callable[[str], None]

SUFFIX = ".rom"
TMP_PREFIX = ".tmp-"
_DIGEST_RE = re.compile(r"^[0-9a-f]{96}$")


def sha384(data: bytes) -> str:
    return hashlib.sha384(data).hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_digest(digest: str) -> str:
    if not _DIGEST_RE.fullmatch(digest):
        raise ValueError(f"not a SHA-384 hex digest: {digest!r}")
    return digest


class Store:
    """store/<sha384>.rom; a name is only ever the digest of its content."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_of(self, digest: str) -> Path:
        return self.root / (_check_digest(digest) + SUFFIX)

    def put(self, data: bytes, checkpoint: Checkpoint | None = None) -> str:
        digest = sha384(data)
        final = self.path_of(digest)
        if self.verify(digest):
            return digest
        self.root.mkdir(exist_ok=True)
        tmp = self.root / f"{TMP_PREFIX}{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if checkpoint:
            checkpoint("store.tmp-written")
        os.replace(tmp, final)
        fsync_dir(self.root)
        return digest

    def verify(self, digest: str) -> bool:
        """True when store/<digest>.rom exists and its content hashes to its name."""
        try:
            data = self.path_of(digest).read_bytes()
        except FileNotFoundError:
            return False
        return sha384(data) == digest

    def read(self, digest: str) -> bytes:
        try:
            data = self.path_of(digest).read_bytes()
        except FileNotFoundError:
            raise InstallFailed(f"firmware {digest[:16]}… is missing from the store",
                                "run `host-install recover`, or reinstall the firmware") from None
        if sha384(data) != digest:
            raise InstallFailed(f"store file {digest[:16]}… does not match its digest (corrupted)",
                                "reinstall that firmware from the guest's add-on")
        return data

    def digests(self) -> list[str]:
        out = []
        for p in self.root.glob("*" + SUFFIX):
            name = p.name[: -len(SUFFIX)]
            if _DIGEST_RE.fullmatch(name):
                out.append(name)
        return sorted(out)

    def remove_temporaries(self) -> list[str]:
        gone = []
        for p in self.root.glob(TMP_PREFIX + "*"):
            p.unlink(missing_ok=True)
            gone.append(p.name)
        return gone


def link_target(link: Path) -> str | None:
    """The digest the `firmware` link names, or None when there is no link."""
    try:
        target = os.readlink(link)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a regular file where the link should be
        raise InstallFailed(f"{link} is not a symlink: {exc}", "remove it and run `host-install recover`") from exc
    name = os.path.basename(target)
    if not name.endswith(SUFFIX) or not _DIGEST_RE.fullmatch(name[: -len(SUFFIX)]):
        raise InstallFailed(f"{link} points at {target!r}, not at a store image",
                            "run `host-install rollback` or reinstall")
    return name[: -len(SUFFIX)]


def switch_link(link: Path, digest: str, checkpoint: Checkpoint | None = None) -> None:
    """Point `link` at store/<digest>.rom atomically (symlink under a temporary name + rename)."""
    target = os.path.join("store", _check_digest(digest) + SUFFIX)
    tmp = link.with_name(f".{link.name}{TMP_PREFIX}{secrets.token_hex(8)}")
    os.symlink(target, tmp)
    if checkpoint:
        checkpoint("link.tmp-created")
    os.replace(tmp, link)
    fsync_dir(link.parent)


def remove_link_temporaries(link: Path) -> list[str]:
    gone = []
    for p in link.parent.glob(f".{link.name}{TMP_PREFIX}*"):
        p.unlink(missing_ok=True)
        gone.append(p.name)
    return gone
