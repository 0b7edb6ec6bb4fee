"""Hostile input to every KBS and admin route: always a JSON error or success, never a 500 or HTML."""
from __future__ import annotations

import json
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_broker_support import new_tee_key, random_master_key

from broker import create_app

KBS = "https://github.com/confidential-containers/kbs/errors/"
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=40)
attest_like = st.fixed_dictionaries({}, optional={
    "init-data": json_values | st.fixed_dictionaries({"format": st.sampled_from(["toml", "json"]),
                                                      "body": st.text(max_size=60)}),
    "runtime-data": json_values | st.fixed_dictionaries({"nonce": st.text(max_size=50), "tee-pubkey": json_values}),
    "tee-evidence": json_values | st.fixed_dictionaries({"primary_evidence": json_values,
                                                         "additional_evidence": json_values}),
})


JWK = new_tee_key("P-256")[1]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    d = tmp_path_factory.mktemp("fuzz")
    app = create_app({"DATABASE_URL": f"sqlite:///{d}/f.db", "MASTER_KEY": random_master_key(),
                      "OPERATOR_TOKEN": "op", "APPRAISER": None, "POLICIES_DIR": str(d)})
    yield app.test_client()
    app.extensions["firmgate"].engine.dispose()


def _ok(resp: Any) -> None:
    assert resp.status_code != 500, resp.data[:300]
    assert resp.mimetype in ("application/json", "application/problem+json"), resp.data[:200]
    body = json.loads(resp.data)
    if resp.status_code != 200 and resp.request.path.startswith("/kbs/"):
        assert isinstance(body["type"], str) and body["type"].startswith(KBS) and isinstance(body["detail"], str)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=json_values | attest_like, raw=st.binary(max_size=200))
def test_kbs_routes_never_500(client: Any, body: Any, raw: bytes) -> None:
    _ok(client.post("/kbs/v0/auth", data=json.dumps(body), content_type="application/json"))
    _ok(client.post("/kbs/v0/auth", data=raw, content_type="application/json"))
    r = client.post("/kbs/v0/auth", json={"version": "0.4.0", "tee": "snp", "extra-params": {}})
    assert r.status_code == 200
    _ok(client.post("/kbs/v0/attest", data=json.dumps(body), content_type="application/json"))
    # The right nonce and a good key: the random value reaches the evidence parser.
    r = client.post("/kbs/v0/auth", json={"version": "0.4.0", "tee": "snp", "extra-params": {}})
    att = {"init-data": None, "runtime-data": {"nonce": r.json["nonce"], "tee-pubkey": JWK},
           "tee-evidence": {"primary_evidence": body, "additional_evidence": ""}}
    resp = client.post("/kbs/v0/attest", json=att)
    _ok(resp)
    assert resp.status_code == 401
    client.post("/kbs/v0/auth", json={"version": "0.4.0", "tee": "snp"})
    _ok(client.post("/kbs/v0/attest", data=raw, content_type="application/json"))
    _ok(client.get("/kbs/v0/resource/acme/key/disk", headers={"Authorization": "Bearer " + raw.hex()}))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.text(alphabet="abc./%-_~ ", max_size=30),
       token=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=40),
       raw=st.binary(max_size=100))
def test_admin_routes_never_500(client: Any, path: str, token: str, raw: bytes) -> None:
    h = {"Authorization": "Bearer " + token.replace("\n", "")}
    for method, url in (("GET", "/admin/v0/secrets"), ("PUT", f"/admin/v0/secrets/{path}"),
                        ("DELETE", f"/admin/v0/secrets/{path}"), ("POST", "/admin/v0/firmware"),
                        ("GET", f"/admin/v0/audit?after={path}"), ("POST", "/admin/v0/tenants"),
                        ("GET", f"/kbs/v0/resource/{path}")):
        _ok(client.open(url, method=method, data=raw, headers=h))
