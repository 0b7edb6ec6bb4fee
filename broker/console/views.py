"""The console's routes: read-only HTML pages over one tenant's data (or the operator's overview).

Query parameters are checked against fixed choices before anything else (a bad
one is a 400 page); a page that needs a sign-in answers 401 with the sign-in
form. Jinja autoescaping is on for every template: whatever came from evidence,
a policy file or a requester is text, never markup.
"""
from __future__ import annotations

from collections.abc import Collection
from importlib import resources
from typing import Any

from flask import (
    Response,
    make_response,
    redirect,
    render_template,
    request,
)
from sqlalchemy import text
from werkzeug.wrappers import Response as BaseResponse

from ..db import SCHEMA_VERSION
from ..state import get_orm, state
from . import auth, data
from .blueprint import bp
from .chart import hourly_chart

MAX_BEFORE = 2**63 - 1
_CSP = ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; "
        "base-uri 'none'")


@bp.after_request
def _headers(resp: Response) -> Response:
    resp.headers["Content-Security-Policy"] = _CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _page(template: str, status: int = 200, **ctx: object) -> Response:
    resp = make_response(render_template(template, **ctx), status)
    resp.mimetype = "text/html"
    return resp


def _login(status: int = 401, error: str | None = None) -> Response:
    return _page("console/login.html", status, error=error, viewer=None)


def _bad(why: str) -> Response:
    return _page("console/error.html", 400, message=why, viewer=None)


def _choice(name: str, choices: Collection[str], default: str) -> str | None:
    value = request.args.get(name, default)
    return value if value in choices else None


def _appraiser() -> Any:
    return state().appraiser


@bp.get("/style.css")
def style() -> Response:
    css = resources.files("broker.console").joinpath("static/console.css").read_bytes()
    resp = make_response(css)
    resp.mimetype = "text/css"
    return resp


@bp.post("/login")
def login() -> BaseResponse:
    if auth.cross_site_post():
        return _page("console/error.html", 403, message="sign-in from another site refused", viewer=None)
    token = request.form.get("token", "")
    viewer = auth.authenticate(token) if isinstance(token, str) else None
    if viewer is None:
        return _login(401, "That token is not valid.")
    resp = redirect("/console/", code=303)
    auth.set_session(resp, viewer)
    return resp


@bp.post("/logout")
def logout() -> BaseResponse:
    if auth.cross_site_post():
        return _page("console/error.html", 403, message="sign-out from another site refused", viewer=None)
    resp = redirect("/console/", code=303)
    auth.clear_session(resp)
    return resp


@bp.get("/")
def overview() -> Response:
    viewer = auth.current_viewer()
    if viewer is None:
        return _login(200)
    orm = get_orm()
    if viewer.tenant is None:
        return _operator(viewer)
    tenant = viewer.tenant
    hours = data.per_hour(orm, tenant)
    denials = data.activity(orm, tenant, outcome="denied", since="7d")[:5]
    loaded, refused = _policy_of(tenant)
    return _page("console/overview.html", viewer=viewer, tenant=tenant, chart=hourly_chart(hours),
                 denials=denials, policy_id=None if loaded is None else loaded.policy_id, refused=refused,
                 secrets=len(data.secrets_of(orm, tenant)))


def _policy_of(tenant: str) -> tuple[Any, list[str]]:
    getter = getattr(_appraiser(), "loaded_policy", None)
    if getter is None:
        return None, []
    loaded, refused = getter(tenant)
    return loaded, list(refused)


def _operator(viewer: auth.Viewer) -> Response:
    orm = get_orm()
    try:
        orm.execute(text("SELECT 1"))
        db_ok = True
    except Exception:  # noqa: BLE001 - the page reports it
        db_ok = False
    st = state()
    status_of = getattr(st.appraiser, "policy_status", None)
    status = status_of() if status_of is not None else {}
    from ..metrics import multiprocess_dir
    return _page("console/operator.html", viewer=viewer, db_ok=db_ok, schema=SCHEMA_VERSION,
                 appraiser="ok" if st.appraiser is not None else (st.appraiser_error or "unavailable"),
                 tenants=data.tenant_list(orm, status) if db_ok else [],
                 metrics_mode="multiprocess (gunicorn)" if multiprocess_dir() else "single process",
                 loaded=sum(1 for v in status.values() if v.get("policy_id")),
                 refused=sum(1 for v in status.values() if v.get("refused")))


def _tenant_viewer() -> auth.Viewer | Response:
    viewer = auth.current_viewer()
    if viewer is None:
        return _login(401)
    if viewer.tenant is None:
        return _page("console/error.html", 403, viewer=viewer,
                     message="The operator sees the tenant list and the broker's health; a tenant's pages need "
                             "that tenant's token.")
    return viewer


@bp.get("/policy")
def policy() -> Response:
    viewer = _tenant_viewer()
    if isinstance(viewer, Response):
        return viewer
    assert viewer.tenant is not None
    loaded, refused = _policy_of(viewer.tenant)
    view = data.policy_view(loaded, refused) if loaded is not None else None
    return _page("console/policy.html", viewer=viewer, tenant=viewer.tenant, view=view, refused=refused)


@bp.get("/activity")
def activity() -> Response:
    outcome = _choice("outcome", data.OUTCOMES, "all")
    event = _choice("event", data.EVENTS, "all")
    since = _choice("since", data.SINCE, "24h")
    raw_before = request.args.get("before")
    before: int | None = None
    if raw_before is not None:
        before = int(raw_before) if raw_before.isdecimal() and len(raw_before) <= 19 else -1
        if not 1 <= before <= MAX_BEFORE:
            return _bad("before must be an audit record id (1..2^63-1)")
    if outcome is None or event is None or since is None:
        return _bad("outcome, event or since is not one of the offered choices")
    viewer = _tenant_viewer()
    if isinstance(viewer, Response):
        return viewer
    assert viewer.tenant is not None
    rows = data.activity(get_orm(), viewer.tenant, outcome=outcome, event=event, since=since, before=before)
    older = rows[-1].id if len(rows) == data.PAGE_SIZE else None
    return _page("console/activity.html", viewer=viewer, tenant=viewer.tenant, rows=rows, outcome=outcome,
                 event=event, since=since, older=older, outcomes=data.OUTCOMES, events=data.EVENTS,
                 sinces=tuple(data.SINCE))


@bp.get("/secrets")
def secrets() -> Response:
    viewer = _tenant_viewer()
    if isinstance(viewer, Response):
        return viewer
    assert viewer.tenant is not None
    return _page("console/secrets.html", viewer=viewer, tenant=viewer.tenant,
                 secrets=data.secrets_of(get_orm(), viewer.tenant))
