"""Prometheus metrics through prometheus_client: one sum across gunicorn workers.

Two modes, chosen by prometheus_client when it is first imported:
- `firmgate serve` (one process): a plain registry in memory.
- gunicorn: multiprocess mode. Each worker writes its values to memory-mapped
  files in PROMETHEUS_MULTIPROC_DIR and a scrape of /metrics, whichever worker
  answers it, adds up every worker's files (live and exited). The directory must
  be set before the workers import this module and wiped when the server starts:
  `gunicorn -c python:broker.gunicorn_conf ...` does both (see broker/gunicorn_conf.py).

Labels are bounded by the code, never by a requester: a route is the URL rule
(not the path), a reason class is the KBS error variant, a check is a verifier
check name, and a tenant label is a tenant with a policy in force (a name a
guest made up is counted as ""). Nothing here affects a decision.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import sys
import time

from flask import Flask, Response, current_app, g, request
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from verifier import observe
from verifier.verdict import Verdict

from .errors import ApiError

log = logging.getLogger(__name__)

# Every other method is counted as "other": a requester must not mint label values.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Latency histogram buckets in seconds (unchanged from the hand-written exposition).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# A policy build measures firmware for every shape: up to minutes without a cache.
BUILD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_CHECK_NAME = re.compile(r"^[a-z0-9_.-]{1,64}$")

# The same series in both modes: multiprocess mode has no *_created samples, so plain mode drops them too.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)

HTTP_REQUESTS = Counter("firmgate_http_requests", "HTTP requests by method, route and status.",
                        ("method", "route", "status"), registry=REGISTRY)
HTTP_DURATION = Histogram("firmgate_http_request_duration_seconds", "Request latency by route.",
                          ("route",), buckets=BUCKETS, registry=REGISTRY)
EVENTS = Counter("firmgate_events", "Protocol outcomes (auth, attest, release, deny).",
                 ("event", "outcome"), registry=REGISTRY)
RELEASES = Counter("firmgate_releases", "Secrets released, by tenant.", ("tenant",), registry=REGISTRY)
DENIALS = Counter("firmgate_denials", "Requests denied, by tenant (\"\" = none or unknown), protocol step and "
                  "reason class (the KBS error variant the guest received).",
                  ("tenant", "event", "reason_class"), registry=REGISTRY)
FAILED_CHECKS = Counter("firmgate_appraisal_failed_checks",
                        "Failed checks, by check name, of appraisals a tenant's audit records: /attest naming the "
                        "tenant, and /resource denials of its resources (one count per decision).",
                        ("tenant", "check"), registry=REGISTRY)
ATTEST_DURATION = Histogram("firmgate_attestation_duration_seconds",
                            "Server time of /kbs/v0/attest (verify + appraise + token), by outcome "
                            "(the token's EAR status, or denied).",
                            ("outcome",), buckets=BUCKETS, registry=REGISTRY)
POLICY_RELOADS = Counter("firmgate_policy_reloads", "Policy files (re)considered, by tenant and result.",
                         ("tenant", "result"), registry=REGISTRY)
POLICY_FALLBACKS = Counter("firmgate_policy_last_good_fallbacks",
                           "Changed policy files refused while the last good version stays in force.",
                           ("tenant",), registry=REGISTRY)
KDS_REQUESTS = Counter("firmgate_kds_requests", "AMD KDS certificate requests, by kind and where the answer came "
                       "from (cache, network, error).", ("kind", "source"), registry=REGISTRY)
TABLE_BUILD = Histogram("firmgate_measurement_table_build_seconds",
                        "Time to measure one firmware for every shape of a policy.", buckets=BUILD_BUCKETS,
                        registry=REGISTRY)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def _on_verifier_event(name: str, value: float, labels: dict[str, str]) -> None:
    if name == "policy_reload":
        tenant = labels.get("tenant", "")
        POLICY_RELOADS.labels(tenant, labels.get("result", "")).inc()
        if labels.get("fallback") == "yes":
            POLICY_FALLBACKS.labels(tenant).inc()
    elif name == "kds_request":
        KDS_REQUESTS.labels(labels.get("kind", ""), labels.get("source", "")).inc()
    elif name == "measurement_table":
        TABLE_BUILD.observe(value)


# At import, not in init_app: the policy store loads its files while the app is being built.
observe.subscribe(_on_verifier_event)


def _known_tenant(tenant: str | None) -> str:
    """`tenant` if it has a policy in force, else "": a requester cannot mint label values."""
    if not tenant:
        return ""
    st = current_app.extensions.get("firmgate")
    appraiser = getattr(st, "appraiser", None)
    try:
        return tenant if appraiser is not None and appraiser.policy_id(tenant) is not None else ""
    except Exception:  # noqa: BLE001 - counting must not fail a request
        return ""


def count_event(event: str, outcome: str) -> None:
    EVENTS.labels(event, outcome).inc()


def denied(event: str, variant: str, tenant: str | None) -> None:
    """A denial at protocol step `event` answered with KBS error `variant`."""
    EVENTS.labels(event, "denied").inc()
    DENIALS.labels(_known_tenant(tenant), event, variant).inc()


def attested(status: str) -> None:
    """An /attest that issued a token with EAR status `status` (affirming, warning, contraindicated)."""
    EVENTS.labels("attest", status).inc()
    g.fg_attest_status = status


def released(tenant: str) -> None:
    EVENTS.labels("release", "ok").inc()
    RELEASES.labels(_known_tenant(tenant)).inc()


def appraised(tenant: str, verdict: Verdict) -> None:
    """Count the failed checks of an appraisal under `tenant`'s policy (so the tenant has one). Called
    where the tenant's audit gets the decision, not for other tenants' policies tried on a VM."""
    for c in verdict.failures:
        FAILED_CHECKS.labels(tenant, c.name if _CHECK_NAME.match(c.name) else "other").inc()


def init_app(app: Flask) -> None:
    if multiprocess_dir() is None and "gunicorn" in sys.modules:
        log.warning("running under gunicorn without %s: /metrics shows one worker's counts; start gunicorn "
                    "with -c python:broker.gunicorn_conf", MULTIPROC_ENV)

    @app.before_request
    def _start() -> None:
        g.fg_t0 = time.perf_counter()

    @app.after_request
    def _stop(resp: Response) -> Response:
        # Each use of a proxy (request, g) looks up the context again: once each, on every request.
        req, ctx = request._get_current_object(), g._get_current_object()  # type: ignore[attr-defined]
        t1 = time.perf_counter()
        dt = t1 - ctx.get("fg_t0", t1)
        url_rule = req.url_rule
        rule = url_rule.rule if url_rule is not None else "unmatched"
        method = req.method
        HTTP_REQUESTS.labels(method if method in _METHODS else "other", rule, str(resp.status_code)).inc()
        HTTP_DURATION.labels(rule).observe(dt)
        if req.endpoint == "kbs.attest":
            ATTEST_DURATION.labels(ctx.get("fg_attest_status", "denied")).observe(dt)
        return resp


def check_scrape_token() -> None:
    """/metrics names tenants and their activity: with METRICS_TOKEN (else OPERATOR_TOKEN) configured,
    a scrape must bring it as a bearer token. With neither (development), /metrics is open."""
    cfg = current_app.config
    want = cfg.get("METRICS_TOKEN") or cfg.get("OPERATOR_TOKEN")
    if not want:
        return
    h = request.headers.get("Authorization", "")
    got = h[7:].strip() if h[:7].lower() == "bearer " else ""
    # Hash both sides so the comparison is constant time whatever the lengths.
    if not hmac.compare_digest(hashlib.sha256(got.encode()).digest(), hashlib.sha256(str(want).encode()).digest()):
        raise ApiError("Unauthorized", "/metrics needs the metrics token (Authorization: Bearer ...)", 401)


def render() -> bytes:
    """The exposition: this process's registry, or the sum of every worker's files."""
    path = multiprocess_dir()
    if path is None:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


def content_type() -> str:
    # generate_latest writes names escaped to underscores: valid 0.0.4 text, which every Prometheus reads.
    return str(CONTENT_TYPE_PLAIN_0_0_4)
