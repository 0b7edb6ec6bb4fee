"""Memory and storage with 10,000 and 20,000 open KBS sessions.

    .venv/bin/python bench/sessions.py [--sessions 10000] [--ttl 300] [--db URL]

A guest that calls /auth and never attests leaves an open session (its nonce,
its cookie). Since /auth became stateless (broker/nonces.py), an open session
is nothing but the nonce the guest holds: the broker writes no row for it, so
the figures (the broker process's RSS, session and audit rows, database size)
must stay flat however many are open. Before, each /auth wrote a session row
and an `auth` audit row, kept until TTL + grace and 24 h (docs/security.md).
A session row appears only when /attest spends the nonce, and is purged (from
/attest, about one call in 50) an hour after it expired.
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
                      "POLICIES_DIR": str(tmp / "policies")})
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
    snap(f"TTL {args.ttl}s passed", "clock moved on: the open sessions' nonces expired")
    print(f"Open KBS sessions: broker process memory and storage ({'SQLite' if url.startswith('sqlite') else url.split(':')[0]}, "
          f"TTL {args.ttl}s)")
    print(f"{'step':<28} {'sessions':>8} {'live':>7} {'audit':>7} {'RSS MiB':>8} {'DB MiB':>7}  note")
    for step, total, live, aud, rss, dbm, note in table:
        print(f"{step:<28} {total:>8,} {live:>7,} {aud:>7,} {rss:>8.1f} {dbm:>7.2f}  {note}")
    base, peak = table[0], max(table, key=lambda r: r[4])
    print(f"RSS growth from baseline to peak: {peak[4] - base[4]:+.1f} MiB over {2 * n:,} sessions "
          f"({(peak[4] - base[4]) * 2**20 / (2 * n):,.0f} bytes/session); database rows written by /auth: "
          f"{table[-1][1] + table[-1][3] - base[1] - base[3]}")
    st.engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
