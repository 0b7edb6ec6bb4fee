"""Schemathesis drives every operation of /openapi.json against the app: no 5xx, documented
status codes and content types, responses that match the declared schemas."""
from __future__ import annotations

from typing import Any, Iterator

import pytest
import schemathesis
from hypothesis import settings
from test_broker_support import random_master_key

from broker import create_app


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    d = tmp_path_factory.mktemp("openapi")
    app = create_app({"DATABASE_URL": f"sqlite:///{d}/s.db", "MASTER_KEY": random_master_key(),
                      "POLICIES_DIR": str(d), "OPERATOR_TOKEN": "op"})
    yield schemathesis.openapi.from_wsgi("/openapi.json", app)
    app.extensions["firmgate"].engine.dispose()


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=20, deadline=None)
def test_openapi_conformance(case: Any) -> None:
    case.call_and_validate()
