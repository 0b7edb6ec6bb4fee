"""Memory and storage with 10,000 open KBS sessions, and what expiry does to them.

    .venv/bin/python bench/sessions.py [--sessions 10000] [--ttl 5] [--db URL]

A guest that calls /auth and never attests leaves an open session (its nonce,
its cookie). The broker keeps sessions in the database, not in process memory,
so the figures are: the broker process's RSS as open sessions pile up, the
rows (sessions and their `auth` audit rows) and database size, and then the
same after the sessions expire and the broker's own purge (run from /auth,
about one call in 50, at most 500 sessions a time) removes them. Three knobs
make that visible in seconds instead of hours, all stated in the output: the
sessions' clock (broker.nonces.now_ms) is moved past the TTL instead of waiting
for it, the purge's grace period (broker.nonces.GRACE_MS, 1 h by default, kept
so the audit can still name a session) is set to 0, and so is the retention of
`auth` audit rows (AUTH_AUDIT_RETENTION_HOURS, 24 by default). Steady state:
sessions = auth rate x (TTL + grace), auth audit rows = auth rate x retention.
"""
from __future__ import annotations

import argparse
import gc
import secrets
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def db_mib(url: str) -> float:
    if url.startswith("sqlite:///"):
        p = Path(url.removeprefix("sqlite:///"))
        return sum(f.stat().st_size for f in p.parent.glob(p.name + "*")) / 2**20
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--ttl", type=int, default=300, help="session lifetime in seconds (broker default 300)")
    ap.add_argument("--db", help="SQLAlchemy URL (default: a temporary SQLite file)")
    args = ap.parse_args()

    from sqlalchemy import func, select

    from broker import create_app, nonces
    from broker.db import AuditRecord, Session
    tmp = Path(tempfile.mkdtemp(prefix="fg-bench-sessions-"))
    (tmp / "policies").mkdir()
    url = args.db or f"sqlite:///{tmp / 'broker.db'}"
    app = create_app({"DATABASE_URL": url, "MASTER_KEY": secrets.token_bytes(32), "SESSION_TTL": args.ttl,
                      "POLICIES_DIR": str(tmp / "policies"), "AUTH_AUDIT_RETENTION_HOURS": 0})
    nonces.GRACE_MS = 0  # see the docstring: shows the bound in seconds instead of an hour
    skew = {"ms": 0}
    real_now = nonces.now_ms
    nonces.now_ms = lambda: real_now() + skew["ms"]  # the sessions' clock; moved past the TTL below
    client = app.test_client()
    st = app.extensions["firmgate"]

    def rows() -> tuple[int, int]:
        with st.sessions() as orm:
            total = orm.execute(select(func.count()).select_from(Session)).scalar_one()
            live = orm.execute(select(func.count()).select_from(Session)
                               .where(Session.expires_at > nonces.now_ms())).scalar_one()
        return int(total), int(live)

    def audit_rows() -> int:
        with st.sessions() as orm:
            return int(orm.execute(select(func.count()).select_from(AuditRecord)).scalar_one())

    def auth(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            r = client.post("/kbs/v0/auth", json={"version": "0.4.0", "tee": "snp"})
            if r.status_code != 200:
                raise SystemExit(f"/auth answered {r.status_code}: {r.get_data()[:200]!r}")
        return time.perf_counter() - t0

    table: list[tuple[str, int, int, int, float, float, str]] = []

    def snap(step: str, note: str = "") -> None:
        gc.collect()
        total, live = rows()
        table.append((step, total, live, audit_rows(), rss_mib(), db_mib(url), note))

    auth(200)  # warm up: imports, first connections, caches
    snap("baseline (200 sessions)")
    n = args.sessions
    dt = auth(n)
    snap(f"+{n:,} open sessions", f"{n / dt:,.0f} auth/s")
    dt = auth(n)
    snap(f"+{n:,} more (2x)", f"{n / dt:,.0f} auth/s")
    skew["ms"] += (args.ttl + 1) * 1000
    snap(f"TTL {args.ttl}s passed", "clock moved on; expired, not yet purged")
    # The purge runs inside /auth; keep a trickle of guests coming until the backlog is gone.
    t0, calls = time.perf_counter(), 0
    while (rows()[0] - rows()[1] > 0 or audit_rows() > rows()[0]) and calls < 50 * 2 * n // 500 + 5000:
        auth(250)
        calls += 250
    snap("after purge", f"{calls:,} /auth calls purged the backlog in {time.perf_counter() - t0:.1f}s")

    print(f"Open KBS sessions: broker process memory and storage ({'SQLite' if url.startswith('sqlite') else url.split(':')[0]}, "
          f"TTL {args.ttl}s, purge grace 0, auth audit retention 0)")
    print(f"{'step':<28} {'sessions':>8} {'live':>7} {'audit':>7} {'RSS MiB':>8} {'DB MiB':>7}  note")
    for step, total, live, aud, rss, dbm, note in table:
        print(f"{step:<28} {total:>8,} {live:>7,} {aud:>7,} {rss:>8.1f} {dbm:>7.2f}  {note}")
    base, peak = table[0], max(table, key=lambda r: r[4])
    print(f"RSS growth from baseline to peak: {peak[4] - base[4]:+.1f} MiB over {2 * n:,} sessions "
          f"({(peak[4] - base[4]) * 2**20 / (2 * n):,.0f} bytes/session); sessions live in the database")
    st.engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
