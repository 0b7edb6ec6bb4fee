"""Prometheus text exposition (format 0.0.4) of per-process counters.

Under gunicorn each worker counts its own requests; scrape each worker or sum
them (Prometheus sums series by label). Nothing here affects decisions.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict

from flask import Flask, Response, g, request

_lock = threading.Lock()
_requests: dict[tuple[str, str, str], int] = defaultdict(int)
_latency_sum: dict[str, float] = defaultdict(float)
_latency_count: dict[str, int] = defaultdict(int)
_events: dict[tuple[str, str], int] = defaultdict(int)
# Latency histogram buckets in seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_hist: dict[tuple[str, float], int] = defaultdict(int)


def count_event(event: str, outcome: str) -> None:
    with _lock:
        _events[(event, outcome)] += 1


def init_app(app: Flask) -> None:
    @app.before_request
    def _start() -> None:
        g.fg_t0 = time.perf_counter()

    @app.after_request
    def _stop(resp: Response) -> Response:
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        dt = time.perf_counter() - g.get("fg_t0", time.perf_counter())
        with _lock:
            _requests[(request.method, rule, str(resp.status_code))] += 1
            _latency_sum[rule] += dt
            _latency_count[rule] += 1
            for b in BUCKETS:
                if dt <= b:
                    _hist[(rule, b)] += 1
        return resp


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render() -> str:
    lines = ["# HELP firmgate_http_requests_total HTTP requests by method, route and status.",
             "# TYPE firmgate_http_requests_total counter"]
    with _lock:
        for (m, r, s), n in sorted(_requests.items()):
            lines.append(f'firmgate_http_requests_total{{method="{m}",route="{_esc(r)}",status="{s}"}} {n}')
        lines += ["# HELP firmgate_http_request_duration_seconds Request latency by route.",
                  "# TYPE firmgate_http_request_duration_seconds histogram"]
        for r in sorted(_latency_count):
            for b in BUCKETS:
                lines.append(f'firmgate_http_request_duration_seconds_bucket{{route="{_esc(r)}",le="{b}"}} '
                             f"{_hist[(r, b)]}")
            lines.append(f'firmgate_http_request_duration_seconds_bucket{{route="{_esc(r)}",le="+Inf"}} '
                         f"{_latency_count[r]}")
            lines.append(f'firmgate_http_request_duration_seconds_sum{{route="{_esc(r)}"}} {_latency_sum[r]:.6f}')
            lines.append(f'firmgate_http_request_duration_seconds_count{{route="{_esc(r)}"}} {_latency_count[r]}')
        lines += ["# HELP firmgate_events_total Protocol outcomes (auth, attest, release, deny).",
                  "# TYPE firmgate_events_total counter"]
        for (e, o), n in sorted(_events.items()):
            lines.append(f'firmgate_events_total{{event="{e}",outcome="{o}"}} {n}')
    return "\n".join(lines) + "\n"
