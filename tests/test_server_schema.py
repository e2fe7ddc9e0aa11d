"""schemathesis against the server's own OpenAPI schema (valid and invalid requests, a bounded
number of examples per operation): no 5xx anywhere, and the engine idle afterwards."""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from server_helpers import parse_metrics, poll, tiny_world

AUTH = {"Authorization": "Bearer sesame"}


@pytest.fixture(scope="module")
def world(request, tmp_path_factory):
    return tiny_world(request.config, tmp_path_factory)


@pytest.fixture(scope="module")
def api_schema(world):
    schema = schemathesis.openapi.from_url(world.guarded.url + "/openapi.json")
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case):
    case.call_and_validate(headers=AUTH, checks=[not_a_server_error], timeout=60)


def test_the_engine_is_idle_after_the_fuzzing(world):
    def idle():
        m = parse_metrics(httpx.get(world.guarded.url + "/metrics").text)
        return m["uora_rt:num_requests_running"] == 0 and m["uora_rt:kv_blocks_used"] == 0
    assert poll(idle, timeout=60)
    assert httpx.get(world.guarded.url + "/health").status_code == 200
