import json

import pytest
from pydantic import ValidationError

from node_runtime.serving.spec import ClusterSpec, ServeSpec, describe_validation_error

# The examples of docs/runtime-contract.md, verbatim.
CONTRACT_SERVE = """{
  "served_model_name": "Llama-3-8B-Instruct",
  "model_path": "/data/models/Llama-3-8B-Instruct",
  "host": "127.0.0.1", "port": 8100,
  "accelerator": "dcu",
  "tensor_parallel_size": 8, "pipeline_parallel_size": 3, "distributed_executor_backend": "ray",
  "quantization": "none", "dtype": "auto",
  "max_num_seqs": 256, "max_num_batched_tokens": null, "max_model_len": null,
  "gpu_memory_utilization": 0.9,
  "extra_args": [],
  "cluster": {"ray_address": "10.0.0.1:6379", "expected_nodes": 3, "expected_gpus": 24, "timeout_s": 900}
}"""


def test_contract_examples_parse():
    serve = ServeSpec.model_validate_json(CONTRACT_SERVE)
    assert serve.cluster.expected_gpus == 24 and serve.accelerator == "dcu" and serve.max_num_batched_tokens is None


def _error_for(model, data) -> str:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(data)
    return describe_validation_error(caught.value, "SPEC")


def test_unknown_key_is_named():
    data = json.loads(CONTRACT_SERVE)
    data["cluster"]["expected_node"] = 3
    message = _error_for(ServeSpec, data)
    assert "SPEC: cluster.expected_node: unknown field" in message


def test_bad_values_are_named_by_path():
    data = json.loads(CONTRACT_SERVE)
    data["accelerator"] = "cuda"
    data["model_path"] = "relative/path"
    message = _error_for(ServeSpec, data)
    assert "SPEC: accelerator:" in message and "SPEC: model_path:" in message


def test_the_layout_is_concrete():
    """The program sends the planned TP and PP; "0 = auto" is the stack file's business, not the launcher's."""
    data = json.loads(CONTRACT_SERVE)
    data.update(tensor_parallel_size=0, distributed_executor_backend="threads")
    message = _error_for(ServeSpec, data)
    assert "SPEC: tensor_parallel_size:" in message and "SPEC: distributed_executor_backend:" in message


def test_ray_address_needs_a_port():
    assert "ray_address" in _error_for(ClusterSpec, {"ray_address": "10.0.0.1", "expected_nodes": 1, "expected_gpus": 0,
                                                     "timeout_s": 10})
