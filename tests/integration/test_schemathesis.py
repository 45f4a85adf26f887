"""Property-based API tests from the OpenAPI document (schemathesis): no 5xx, every response as documented.

The operations are read from the app's own document, so every route the app has (and every route added later)
is covered with no change here. In-process against the ASGI app on both tiny models (an encoder and a decoder:
each task's routes meet a model that can serve them and one that cannot), with API keys on, so schemathesis'
``ignored_auth`` check also proves that each protected operation refuses a request without the key. Both
generation modes run: schema-valid data (positive) and data that breaks the schema (negative, must be a 4xx).

Driven through schemathesis' Python API (``operation.as_strategy()`` + Hypothesis) rather than its pytest
loader ``schemathesis.pytest.from_fixture``: that one sets ``request.node._nodeid``, which pytest 9 removed.
"""

from __future__ import annotations

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from pydantic import BaseModel, Field
from schemathesis import GenerationMode
from schemathesis.core.failures import FailureGroup, ServerError
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.api.health import EngineDep
from service.app import create_app
from service.config import Settings
from service.engine.loading import LoadedModel

KEY = "k-schemathesis"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES_PER_OPERATION_AND_MODE = 30
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]


# The key goes in through the bearer scheme the document declares, so schemathesis knows the header is auth: in
# negative mode it may drop it (then a 401 is the right answer). Unknown query parameters are not generated:
# FastAPI ignores them, as most HTTP APIs do, and the schema cannot say otherwise.
CONFIG = schemathesis.Config.from_dict(
    {"auth": {"openapi": {"bearerAuth": {"bearer": KEY}}}, "generation": {"allow-extra-parameters": False}}
)


def run_schemathesis(
    app: FastAPI, mode: GenerationMode, examples: int = EXAMPLES_PER_OPERATION_AND_MODE
) -> dict[str, set[int]]:
    """Check every operation of ``app`` with ``examples`` generated cases; return the statuses each one got."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH, config=CONFIG)
    statuses: dict[str, set[int]] = {}
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # an Err holds the operation's InvalidSchema
        operation = result.ok()
        inputs = [operation.path_parameters, operation.query, operation.headers, operation.cookies, operation.body]
        if mode.is_negative and not any(len(part) for part in inputs):
            continue  # nothing a client sends here can break the schema (GET /health)

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case) -> None:
            # Schema-valid is not always servable: a generate request with neither prompt nor messages, or a
            # task the loaded model cannot do, is a documented 400 that names the problem. So schema-valid data
            # is not required to succeed; every other check (no 5xx, documented statuses, conforming bodies,
            # auth) runs.
            response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
            statuses.setdefault(case.operation.label, set()).add(response.status_code)

        check()
    return statuses


def _app(settings_: Settings, loaded: LoadedModel) -> FastAPI:
    return create_app(settings_.model_copy(update={"api_keys": [KEY]}), loaded=loaded)


@pytest.mark.parametrize("model", ["bert", "llama"])
@pytest.mark.parametrize("mode", MODES)
def test_api_conforms_to_its_schema(request: pytest.FixtureRequest, model: str, mode: GenerationMode) -> None:
    app = _app(request.getfixturevalue(f"{model}_settings"), request.getfixturevalue(f"tiny_{model}"))
    statuses = run_schemathesis(app, mode)
    if mode.is_positive:  # the key went in: schema-valid requests to the existing routes succeed
        for label in ("GET /health", "GET /ready", "GET /metrics", "GET /v1/models"):
            assert statuses[label] == {200}, label
    else:  # only the protected operations have an input to break: their Authorization header
        assert statuses["GET /v1/models"] <= {200, 401}
        assert 401 in statuses["GET /v1/models"]


class _Order(BaseModel):
    text: str = Field(max_length=50)
    count: int = Field(1, ge=1, le=10)


@pytest.mark.parametrize("mode", MODES)
def test_a_route_with_a_body_conforms(bert_settings: Settings, tiny_bert: LoadedModel, mode: GenerationMode) -> None:
    # The shape of the routes to come (a JSON body, the engine, a query parameter): negative data must get a
    # documented 4xx in the error shape, which is what the OpenAPI rewrite makes true.
    app = _app(bert_settings, tiny_bert)

    @app.post("/v1/probe")
    async def probe(order: _Order, engine: EngineDep, verbose: bool = False) -> dict[str, int]:
        engine.require()
        return {"chars": len(order.text) * order.count}

    statuses = run_schemathesis(app, mode, examples=40)
    if mode.is_positive:
        assert statuses["POST /v1/probe"] == {200}
    else:
        assert 422 in statuses["POST /v1/probe"]
        assert statuses["POST /v1/probe"] <= {400, 401, 422}


def test_the_harness_catches_a_server_error(bert_settings: Settings, tiny_bert: LoadedModel) -> None:
    app = _app(bert_settings, tiny_bert)

    @app.post("/v1/buggy")
    async def buggy(order: _Order) -> dict[str, float]:
        return {"ratio": 1 / (len(order.text) - 1)}  # ZeroDivisionError, a 500, for one-character texts

    with pytest.raises(FailureGroup) as caught:
        run_schemathesis(app, GenerationMode.POSITIVE, examples=100)
    assert caught.group_contains(ServerError)
