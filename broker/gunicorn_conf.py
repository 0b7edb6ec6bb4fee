"""gunicorn settings for the broker: metrics that add up across workers.

    gunicorn -c python:broker.gunicorn_conf -w 4 -b 0.0.0.0:8080 'broker:create_app()'

prometheus_client's multiprocess mode keeps each worker's values in files under
PROMETHEUS_MULTIPROC_DIR, and /metrics adds them up. This module (read by the
gunicorn master before any worker imports the app) makes sure that directory
exists and is private (a temporary 0700 directory, removed at exit, unless the
operator set one), wipes values left by an earlier run when the server starts
(else counters would resume from a dead server's values), and tells
prometheus_client when a worker exits (its live gauges are dropped; its
counters stay in the sum, so a restarted worker does not make counts go back).
Give each gunicorn server its own directory (a second server wiping a shared
one would reset the first one's counts). Other gunicorn settings come from the
command line or GUNICORN_CMD_ARGS as usual.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

ENV = "PROMETHEUS_MULTIPROC_DIR"
# What prometheus_client names its files: counter_<pid>.db, gauge_livesum_<pid>.db, histogram_<pid>.db ...
_VALUE_FILE = re.compile(r"^(counter|gauge_[a-z]+|histogram|summary)_\d+\.db$")

_created: str | None = None
if not os.environ.get(ENV):
    _created = tempfile.mkdtemp(prefix="firmgate-metrics-")  # 0700, owned by the server's user
    os.environ[ENV] = _created


def wipe(directory: str) -> int:
    """Remove prometheus_client value files (and nothing else) from `directory`; returns how many."""
    n = 0
    for p in Path(directory).iterdir():
        if _VALUE_FILE.match(p.name) and p.is_file() and not p.is_symlink():
            p.unlink()
            n += 1
    return n


def on_starting(server: Any) -> None:
    directory = os.environ[ENV]
    Path(directory).mkdir(mode=0o700, parents=True, exist_ok=True)
    removed = wipe(directory)
    server.log.info("metrics: multiprocess values in %s (%d stale files removed)", directory, removed)


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess
    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]


def on_exit(server: Any) -> None:
    if _created is not None:
        shutil.rmtree(_created, ignore_errors=True)
