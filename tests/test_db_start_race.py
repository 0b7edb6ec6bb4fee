"""gunicorn workers (or replicas) that open a fresh SQLite file at the same moment: one creates the
schema, the others wait for it; none fails (it did: "table fg_schema_version already exists", or
"database is locked" from the switch to WAL)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.db import make_engine, schema_version

WORKER = """
import sys, time
from broker.db import make_engine, migrate
engine = make_engine(sys.argv[1])
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
migrate(engine)
"""


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(3))
def test_workers_starting_together_on_a_fresh_sqlite_file_all_start(tmp_path: Path, round_: int) -> None:
    url = f"sqlite:///{tmp_path / 'broker.db'}"
    start = time.time() + 1.5   # every process imported and connected before any migrates
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, url, str(start)], stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    from broker.db import SCHEMA_VERSION
    assert schema_version(make_engine(url)) == SCHEMA_VERSION
