"""The console over a broker on loopback, with data made by the real KBS flow (real verifier, sim
evidence, a real OVMF build): sign-in and its cookie, one tenant's data only, escaping, and a real
browser (Debian's chromium through chromium-driver, `make deps`) that signs in, sees a denial with its
reason, sees the reference table, fails to reach another tenant's data by URL, and saves a screenshot
of each page under the test's tmp dir (FIRMGATE_CONSOLE_SHOTS=DIR copies them there, for docs/).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import urllib.request
from collections.abc import Iterator
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

import pytest
from test_broker_e2e import FW_ACME, Env
from test_broker_support import (  # noqa: F401
    Guest,
    LiveServer,
    Reply,
    admin,
    db,
    http,
    random_master_key,
)

from broker import audit, create_app
from tests.conftest import FIRMWARE_DIR

OP = "console-operator-token"
HOSTILE = "<img src=x onerror=alert(1)>"


class World:
    def __init__(self, srv: LiveServer, env: Env, tokens: dict[str, str]) -> None:
        self.srv, self.env, self.tokens = srv, env, tokens


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if not (FIRMWARE_DIR / FW_ACME).is_file():
        pytest.fail(f"missing real firmware {FIRMWARE_DIR / FW_ACME}")
    root = tmp_path_factory.mktemp("console")
    env = Env(root)
    env.write_acme(note=" " + HOSTILE)   # the policy's description carries markup: it must show as text
    cfg = {"DATABASE_URL": f"sqlite:///{root / 'broker.db'}", "MASTER_KEY": random_master_key(),
           "OPERATOR_TOKEN": OP, "POLICIES_DIR": str(env.policies), "TRUST_ROOT_PEM": str(env.root_pem),
           "MEASURE_CACHE": str(env.cache)}
    srv = LiveServer(create_app(cfg))
    tokens = {}
    for t in ("acme", "globex"):
        tokens[t] = admin(srv.url, "POST", "/tenants", OP, {"name": t}).body["token"]
        assert admin(srv.url, "PUT", f"/secrets/{t}/key/disk", tokens[t], raw=f"{t}-luks-key".encode()).status == 201
    assert admin(srv.url, "PUT", "/secrets/globex/key/globex-only-name", tokens["globex"], raw=b"g").status == 201
    # acme: one release, one denial (a VM whose firmware acme's policy does not list).
    good = Guest(srv.url, env.evidence(), tenant_hint="acme")
    good.auth()
    assert good.attest().status == 200
    assert good.fetch("acme/key/disk") == b"acme-luks-key"
    bad = Guest(srv.url, env.evidence(measurement=hashlib.sha384(b"some other firmware").digest()),
                tenant_hint="acme")
    bad.auth()
    assert bad.attest().status == 200
    assert bad.resource("acme/key/disk").status == 401
    # globex: a denial of its own (acme's VM asks for globex's key).
    assert good.resource("globex/key/disk").status == 401
    # A record whose reason and checks carry markup (escaping is checked on every page that shows it).
    with srv.app.app_context():
        from broker.state import get_orm
        audit.record(get_orm(), event="deny", outcome="denied", reason="hostile " + HOSTILE, tenant="acme",
                     resource="acme/key/disk", verdict={"accepted": False, "policy_id": "acme@x", "checks": [
                         {"name": "report.markup", "outcome": "fail", "message": HOSTILE, "expected": HOSTILE,
                          "actual": "<b>bold</b>"}]})
    try:
        yield World(srv, env, tokens)
    finally:
        srv.stop()


class Browserless:
    """A cookie-keeping HTTP client that does not follow redirects (to see the console's own answers)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = CookieJar()

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *a: Any, **k: Any) -> None:
                return None

        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), NoRedirect)

    def get(self, path: str) -> Reply:
        return http("GET", self.base + path, opener=self.opener)

    def login(self, token: str, headers: dict[str, str] | None = None) -> Reply:
        return http("POST", self.base + "/console/login", raw=f"token={token}".encode(), opener=self.opener,
                    headers={"Content-Type": "application/x-www-form-urlencoded", **(headers or {})})


def text(r: Reply) -> str:
    return r.body.decode() if isinstance(r.body, bytes) else str(r.body)


def test_sign_in_sets_a_strict_httponly_cookie_and_wrong_tokens_fail(world: World) -> None:
    c = Browserless(world.srv.url)
    assert c.get("/console/policy").status == 401
    bad = c.login("fgt_not-a-real-token")
    assert bad.status == 401 and "That token is not valid." in text(bad)
    r = c.login(world.tokens["acme"])
    assert r.status == 303 and r.headers["Location"].endswith("/console/")
    cookie = r.headers["Set-Cookie"]
    assert cookie.startswith("firmgate-console=")
    for flag in ("HttpOnly", "SameSite=Strict", "Path=/console"):
        assert flag in cookie
    assert "Secure" not in cookie                       # plain HTTP on loopback; TLS would add it
    assert world.tokens["acme"] not in cookie           # the token itself is never in the cookie
    page = c.get("/console/")
    assert page.status == 200 and "tenant <b>acme</b>" in text(page)
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert page.headers["Cache-Control"] == "no-store"


def test_secure_cookie_over_tls(world: World) -> None:
    client = world.srv.app.test_client()
    r = client.post("/console/login", data={"token": world.tokens["acme"]}, base_url="https://broker.example")
    assert r.status_code == 303 and "Secure" in r.headers["Set-Cookie"]


def test_cross_site_sign_in_is_refused(world: World) -> None:
    c = Browserless(world.srv.url)
    assert c.login(world.tokens["acme"], {"Sec-Fetch-Site": "cross-site"}).status == 403
    assert c.login(world.tokens["acme"], {"Origin": "https://evil.example"}).status == 403
    assert c.login(world.tokens["acme"], {"Sec-Fetch-Site": "same-origin"}).status == 303


def test_a_tenant_sees_only_its_own_data(world: World) -> None:
    c = Browserless(world.srv.url)
    assert c.login(world.tokens["acme"]).status == 303
    pages = {}
    for path in ("/console/", "/console/policy", "/console/activity?since=all", "/console/secrets",
                 # another tenant's name in the URL changes nothing: there is no tenant parameter
                 "/console/activity?tenant=globex&since=all", "/console/policy?tenant=globex",
                 "/console/secrets?repo=globex"):
        r = c.get(path)
        assert r.status == 200, (path, r.status)
        pages[path] = text(r)
    for path, page in pages.items():
        assert "globex" not in page, path              # no globex record, secret, policy or name
        assert "globex-only-name" not in page
    assert "acme/key/disk" in pages["/console/secrets"]
    assert world.env.acme_measurement.hex() in pages["/console/policy"]
    # The denial of acme's look-alike VM, with its reason and the failing check.
    acts = pages["/console/activity?since=all"]
    assert "policy rejected the evidence" in acts and "firmware.measurement" in acts
    # Paging back by id reaches only acme's rows too.
    ids = [int(x) for x in re.findall(r'id="r(\d+)"', acts)]
    older = text(c.get(f"/console/activity?since=all&before={max(ids) + 1000}"))
    assert "globex" not in older


def test_globex_sees_its_denial_but_not_acme(world: World) -> None:
    c = Browserless(world.srv.url)
    assert c.login(world.tokens["globex"]).status == 303
    page = text(c.get("/console/activity?since=all&outcome=denied"))
    assert "globex/key/disk" in page
    # The record names the requester's evidence (its measurement), never acme's name, records or secrets.
    assert "acme" not in page


def test_everything_from_evidence_and_policies_is_escaped(world: World) -> None:
    c = Browserless(world.srv.url)
    c.login(world.tokens["acme"])
    for path in ("/console/", "/console/activity?since=all", "/console/policy"):
        page = text(c.get(path))
        assert "<img" not in page and "<b>bold" not in page, path
        assert "&lt;img src=x onerror=" in page, path


def test_operator_sees_tenants_and_health_only(world: World) -> None:
    c = Browserless(world.srv.url)
    assert c.login(OP).status == 303
    page = text(c.get("/console/"))
    assert "Broker health" in page and "reachable" in page
    assert "acme" in page and "globex" in page
    assert "acme/key/disk" not in page                 # no tenant's records or secrets
    for path in ("/console/policy", "/console/activity", "/console/secrets"):
        assert c.get(path).status == 403


def test_filters_are_checked_and_sign_out_ends_the_session(world: World) -> None:
    c = Browserless(world.srv.url)
    c.login(world.tokens["acme"])
    assert c.get("/console/activity?outcome=nope").status == 400
    assert c.get("/console/activity?before=-1").status == 400
    assert c.get("/console/activity?before=99999999999999999999").status == 400
    denied = text(c.get("/console/activity?outcome=denied&since=all"))
    assert "policy rejected the evidence" in denied and "release" not in re.findall(r"<td>(\w+)</td>", denied)
    r = http("POST", world.srv.url + "/console/logout", opener=c.opener, raw=b"")
    assert r.status == 303 and "firmgate-console=;" in r.headers["Set-Cookie"]
    assert c.get("/console/policy").status == 401


def test_a_deleted_token_ends_its_console_sessions(world: World) -> None:
    from sqlalchemy import delete

    from broker.db import ApiToken
    from broker.state import get_orm
    from broker.vault import new_token
    with world.srv.app.app_context():
        extra = new_token(get_orm(), "acme")
    c = Browserless(world.srv.url)
    assert c.login(extra).status == 303 and c.get("/console/secrets").status == 200
    with world.srv.app.app_context():
        orm = get_orm()
        orm.execute(delete(ApiToken).where(ApiToken.token_sha256 == hashlib.sha256(extra.encode()).hexdigest()))
        orm.commit()
    assert c.get("/console/secrets").status == 401


def test_forged_or_foreign_cookies_are_refused(world: World) -> None:
    client = world.srv.app.test_client()
    client.set_cookie("firmgate-console", "eyJ0IjoiZ2xvYmV4In0.AAAA.BBBB", path="/console")
    assert client.get("/console/secrets").status_code == 401
    client.set_cookie("firmgate-console", "x" * 1000, path="/console")
    assert client.get("/console/secrets").status_code == 401


# -- a real browser ----------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser() -> Iterator[Any]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium and chromium-driver are missing: `make deps` installs them")
        pytest.skip("chromium/chromium-driver not installed (make deps)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1280,1000", "--force-device-scale-factor=1"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _click_then(driver: Any, click: tuple[str, str], then: tuple[str, str]) -> Any:
    """Click, then the element the next page shows: a click returns before the navigation it starts
    ends, so looking at once could still see the page before (seen: 1 run in 3 here, and in a full run)."""
    from selenium.webdriver.support.ui import WebDriverWait
    driver.find_element(*click).click()
    return WebDriverWait(driver, 10).until(lambda drv: drv.find_elements(*then))[0]


def _shot(driver: Any, shots: Path, name: str) -> None:
    from selenium.webdriver.common.by import By
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(max(600, int(height) + 40), 2400))
    path = shots / f"console-{name}.png"
    assert driver.find_element(By.TAG_NAME, "body").screenshot(str(path))
    assert path.stat().st_size > 5000
    out = os.environ.get("FIRMGATE_CONSOLE_SHOTS")
    if out:
        shutil.copy(path, Path(out) / path.name)


@pytest.mark.slow
def test_console_in_a_real_browser(world: World, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    d, base = browser, world.srv.url
    d.get(base + "/console/")
    _shot(d, tmp_path, "sign-in")
    d.find_element(By.ID, "token").send_keys(world.tokens["acme"])
    assert _click_then(d, (By.ID, "sign-in"), (By.ID, "whoami")).text == "tenant acme"
    cookie = d.get_cookie("firmgate-console")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert d.execute_script("return document.cookie") == ""      # not readable by scripts
    assert int(d.find_element(By.ID, "denials-24h").text) >= 2
    assert int(d.find_element(By.ID, "releases-24h").text) == 1
    assert len(d.find_elements(By.CSS_SELECTOR, "svg rect.release")) == 24
    _shot(d, tmp_path, "overview")

    from selenium.webdriver.support.ui import Select
    Select(_click_then(d, (By.LINK_TEXT, "Activity"), (By.NAME, "outcome"))).select_by_value("denied")
    d.find_element(By.CSS_SELECTOR, "form.filters button").click()
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(d, 10).until(lambda drv: "outcome=denied" in drv.current_url)
    rows = d.find_elements(By.CSS_SELECTOR, "#activity tbody tr.record.denied")
    real = [r for r in rows if "policy rejected the evidence" in r.text]
    assert real, [r.text for r in rows]
    detail = real[0].find_element(By.XPATH, "following-sibling::tr[1]")
    assert "1 failed" in detail.text
    detail.find_element(By.TAG_NAME, "summary").click()          # open the verdict's checks
    first = detail.find_element(By.CSS_SELECTOR, "table.checks tbody tr").text
    assert first.startswith("firmware.measurement fail"), first  # the failure comes first
    assert not d.find_elements(By.CSS_SELECTOR, "#activity img")  # the hostile record stayed text
    _shot(d, tmp_path, "activity")

    table = _click_then(d, (By.LINK_TEXT, "Policy"), (By.ID, "reference-table")).text
    assert world.env.acme_measurement.hex() in table and "edk2-2025.02" in table
    assert HOSTILE in d.find_element(By.TAG_NAME, "main").text   # shown as text, not markup
    _shot(d, tmp_path, "policy")

    assert "acme/key/disk" in _click_then(d, (By.LINK_TEXT, "Secrets"), (By.ID, "secrets")).text
    _shot(d, tmp_path, "secrets")

    # Another tenant's data is not reachable by URL.
    for path in ("/console/activity?tenant=globex&since=all", "/console/secrets?tenant=globex",
                 "/admin/v0/secrets", "/admin/v0/audit"):
        d.get(base + path)
        assert "globex" not in d.page_source, path

    # The operator: tenant list and health.
    d.get(base + "/console/")
    _click_then(d, (By.CSS_SELECTOR, "form.who button"), (By.ID, "token")).send_keys(OP)  # signed out
    tenants = _click_then(d, (By.ID, "sign-in"), (By.ID, "tenants")).text
    assert "acme" in tenants and "globex" in tenants
    _shot(d, tmp_path, "operator")
    assert sorted(p.name for p in tmp_path.glob("console-*.png")) == [
        "console-activity.png", "console-operator.png", "console-overview.png", "console-policy.png",
        "console-secrets.png", "console-sign-in.png"]


def test_console_queries_on_each_database(db: Any) -> None:  # noqa: F811 - the fixture
    """The hourly counts (integer division in SQL), last releases and the tenant filter, on SQLite and PostgreSQL."""
    from sqlalchemy.orm import sessionmaker

    from broker.console import data
    from broker.db import Secret, make_engine, migrate
    engine = make_engine(db.url)
    migrate(engine)
    now = 1_800_000_000_000 + 1234                      # a fixed instant, 1234 ms into an hour
    hour = data.HOUR_MS
    with sessionmaker(engine)() as orm:
        rows = [audit.row(event="release", outcome="ok", reason="r", tenant="acme", resource="acme/key/disk"),
                audit.row(event="deny", outcome="denied", reason="d", tenant="acme", resource="acme/key/disk"),
                audit.row(event="attest", outcome="denied", reason="a", tenant="acme"),
                audit.row(event="release", outcome="ok", reason="r", tenant="globex", resource="globex/key/disk"),
                audit.row(event="deny", outcome="denied", reason="old", tenant="acme")]
        for r, at in zip(rows, (now, now - hour, now - hour - 1, now, now - 30 * hour)):
            r["at"] = at
        audit.write(orm, rows)
        orm.add(Secret(tenant="acme", path="acme/key/disk", nonce=b"n" * 12, ciphertext=b"c" * 48, created_at=0,
                       updated_at=now))
        orm.add(Secret(tenant="globex", path="globex/key/disk", nonce=b"n" * 12, ciphertext=b"c" * 20,
                       created_at=0, updated_at=now))
        orm.commit()
        hours = data.per_hour(orm, "acme", now_ms=now)
        assert len(hours) == 24 and hours[-1].start_ms == now - 1234
        assert (hours[-1].releases, hours[-1].denials) == (1, 0)
        assert (hours[-2].releases, hours[-2].denials) == (0, 2)
        assert sum(h.releases + h.denials for h in hours) == 3        # the 30-hour-old denial is outside
        secrets = data.secrets_of(orm, "acme")
        assert [(s.path, s.size, s.last_release) for s in secrets] == [("acme/key/disk", 32, data.utc(now))]
        assert {r.reason for r in data.activity(orm, "acme", since="all", now_ms=now)} == {"r", "d", "a", "old"}
        assert {r.reason for r in data.activity(orm, "acme", since="24h", outcome="denied", now_ms=now)} == {"d", "a"}
    engine.dispose()


def test_policy_loads_of_the_real_flow_show_in_metrics(world: World) -> None:
    """The broker's policy store measured acme's firmware and loaded both policies: /metrics says so."""
    from test_metrics import value
    scrape = http("GET", world.srv.url + "/metrics", headers={"Authorization": f"Bearer {OP}"}).body.decode()
    assert value(scrape, "firmgate_measurement_table_build_seconds_count") >= 1
    assert value(scrape, "firmgate_policy_reloads_total", tenant="acme", result="loaded") >= 1
    assert value(scrape, "firmgate_releases_total", tenant="acme") >= 1
    assert value(scrape, "firmgate_denials_total", tenant="acme", event="deny", reason_class="PolicyDeny") >= 1


def test_the_console_can_be_turned_off(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'b.db'}", "MASTER_KEY": random_master_key(),
                      "POLICIES_DIR": str(tmp_path / "p"), "OPERATOR_TOKEN": OP, "CONSOLE_ENABLED": False})
    client = app.test_client()
    assert client.get("/console/").status_code == 404
    assert client.post("/console/login", data={"token": OP}).status_code == 404
    assert not any(p.startswith("/console") for p in client.get("/openapi.json").get_json()["paths"])
    app.extensions["firmgate"].engine.dispose()
