"""The documented API: /openapi.json and /docs describe every route of the table, and the guide's
endpoints are fuzzed from that document (schemathesis) against the real gateway and the session's
real vLLM: no 5xx, every 4xx in OpenAI's error shape naming the field, answers as documented.

The fuzzing is bounded for CI: a fixed seed (the same cases every run), a few dozen cases per
endpoint, and small limits on the gateway (n, prompts, tokens per batch) so no case asks vLLM for much.
"""

import re

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings, strategies
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from .conftest import INTERNAL_KEY, MODEL_NAME
from tests.support.processes import free_ports, gateway_config, start_gateway

pytestmark = pytest.mark.slow

KEY = "fuzzing-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
GUIDE = ("/", "/generate", "/batch_generate", "/health", "/metrics")
OPENAI = ("/v1/models", "/v1/completions", "/v1/chat/completions")


@pytest.fixture(scope="module")
def fuzzed_gateway(routes_dir, ray_head, work_dir):
    port = free_ports(1)[0]
    config = gateway_config(port, [MODEL_NAME], routes_dir, ray_head, max_n=2, max_batch_size=3, max_batch_tokens=96,
                            request_timeout_s=60)
    process = start_gateway(config, work_dir, api_key=KEY, internal_key=INTERNAL_KEY)
    yield f"http://127.0.0.1:{port}"
    process.stop()


def test_the_document_describes_every_route_as_configured(fuzzed_gateway):
    doc = httpx.get(fuzzed_gateway + "/openapi.json").json()
    assert doc["openapi"].startswith("3.1") and set(GUIDE + OPENAI) <= set(doc["paths"])
    generate = doc["paths"]["/generate"]["post"]
    assert generate["security"] == [{"bearer": []}] and "422" in generate["responses"] and "429" in generate["responses"]
    schemas = doc["components"]["schemas"]
    assert schemas["GenerateRequest"]["properties"]["n"]["maximum"] == 2  # this gateway's max_n
    assert schemas["BatchGenerateRequest"]["properties"]["prompts"]["maxItems"] == 3
    assert schemas["GenerateRequest"]["additionalProperties"] is False
    assert set(schemas["ErrorDetail"]["properties"]) == {"message", "type", "param", "code"}
    assert "security" not in doc["paths"]["/health"]["get"]
    page = httpx.get(fuzzed_gateway + "/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script" not in page.text and 'src="http' not in page.text  # readable without internet access
    for path in GUIDE + OPENAI:
        assert f"<code>{path}</code>" in page.text, path
    assert re.search(r"<code>max_tokens</code>.*?&gt;= 1; default 16", page.text)


def openai_error_shape(ctx, response, case):
    """Every 4xx in OpenAI's shape; a refused field named in `param`."""
    if not 400 <= response.status_code < 500:
        return None
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"]
    if response.status_code == 422 and error["code"] != "invalid_json":
        assert error["param"], f"no field named: {error}"
    return True


def test_the_guides_endpoints_fuzzed_from_the_document(fuzzed_gateway):
    """Cases valid by the document and cases it says are invalid, mixed; schemathesis's checks (no 5xx, status
    codes, content types and answers as documented, invalid data refused, auth not ignored) and ours.

    Schema-valid requests may still be refused for what the document cannot carry (a prompt longer
    than the model's context, several sequences with greedy sampling): positive_data_acceptance is off."""
    schema = schemathesis.openapi.from_url(fuzzed_gateway + "/openapi.json").include(path=list(GUIDE))
    cases = strategies.one_of(schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE))

    @given(cases)
    @settings(max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    def fuzz(case):
        case.call_and_validate(headers=AUTH, timeout=120, additional_checks=[openai_error_shape],
                               excluded_checks=[positive_data_acceptance])

    fuzz()
