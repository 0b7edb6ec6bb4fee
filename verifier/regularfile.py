"""Reading a file that must be a regular file of bounded size, without blocking on anything else."""
from __future__ import annotations

import errno
import os
import stat


def read_regular(path: str | os.PathLike[str], limit: int) -> bytes:
    """At most `limit` + 1 bytes of the regular file at `path` (the caller judges the size).

    Opened with O_NONBLOCK, and only a regular file is read: a FIFO given as the file would
    block the open, or the read, for ever (docs/security.md RT-6). Anything else, and every
    failure to read, is an OSError whose `strerror` says why ("not a regular file")."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return fh.read(limit + 1)
