import pytest
from prometheus_client.parser import text_string_to_metric_families

from node_runtime.serving.gateway.errors import GatewayError
from node_runtime.serving.gateway.generate import BatchGenerateRequest, GenerateRequest, parse
from node_runtime.serving.gateway.metrics import relabel_vllm_metrics
from node_runtime.serving.gateway.upstream import pick_server
from node_runtime.serving.spec import UpstreamServer

SERVERS = {name: UpstreamServer(name=name, url=f"http://127.0.0.1:{port}") for name, port in (("a", 8101), ("b", 8102))}

VLLM_METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="%s"} %d.0
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="%s"} 42.0
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 7.0
"""


def test_pick_server():
    assert pick_server(SERVERS, "b").name == "b"
    assert pick_server({"a": SERVERS["a"]}, None).name == "a"
    with pytest.raises(GatewayError) as unknown:
        pick_server(SERVERS, "c")
    assert unknown.value.status == 404 and "served models: a, b" in unknown.value.message
    with pytest.raises(GatewayError) as ambiguous:
        pick_server(SERVERS, None)
    assert ambiguous.value.status == 422 and ambiguous.value.param == "model"


def test_vllm_metrics_merged_with_a_model_label():
    text = relabel_vllm_metrics({"a": VLLM_METRICS % ("a", 1, "a"), "b": VLLM_METRICS % ("b", 3, "b")}).decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert set(families) == {"vllm:num_requests_running", "vllm:prompt_tokens"}  # only vllm:*
    running = {sample.labels["model"]: sample.value for sample in families["vllm:num_requests_running"].samples}
    assert running == {"a": 1.0, "b": 3.0}
    assert text.count("# TYPE vllm:num_requests_running gauge") == 1


@pytest.mark.parametrize("body, param, message", [
    (b'{"max_tokens": 5}', "prompt", "prompt: Field required"),
    (b'{"prompt": "x", "max_token": 5}', "max_token", "max_token: unknown field"),
    (b'{"prompt": "x", "max_tokens": 0}', "max_tokens", "max_tokens: Input should be greater than or equal to 1"),
    (b'{"prompts": ["a", 7]}', "prompts[1]", "prompts[1]: Input should be a valid string"),
    (b'{"prompt": "x"', None, "request body is not valid JSON: EOF while parsing"),
    (b'[1, 2]', "body", "body: Input should be an object"),
])
def test_parse_names_the_field_as_the_client_wrote_it(body, param, message):
    model = BatchGenerateRequest if b"prompts" in body else GenerateRequest
    with pytest.raises(GatewayError) as invalid:
        parse(model, body)
    assert invalid.value.status == 422 and invalid.value.param == param
    assert invalid.value.message.startswith(message), invalid.value.message
