import pytest

from node_runtime.serving.quantization import QuantizationError, checkpoint_quantization, resolve_quantization

PLAIN = {"architectures": ["LlamaForCausalLM"]}
AWQ4 = {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}}
GPTQ8 = {"quantization_config": {"quant_method": "gptq", "bits": 8}}
COMPRESSED_W4 = {"quantization_config": {"quant_method": "compressed-tensors",
                                         "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "int"}}}}}
FP8 = {"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}}


@pytest.mark.parametrize(("config", "found"), [
    (PLAIN, None), (AWQ4, ("awq", 4)), (GPTQ8, ("gptq", 8)), (COMPRESSED_W4, ("compressed-tensors", 4)), (FP8, ("fp8", 8)),
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}, ("bitsandbytes", 4)),
])
def test_checkpoint_quantization(config, found):
    assert checkpoint_quantization(config) == found


@pytest.mark.parametrize(("requested", "config", "flag"), [
    ("none", PLAIN, None),
    ("int4", AWQ4, "awq"),
    ("int4", COMPRESSED_W4, "compressed-tensors"),
    ("int8", GPTQ8, "gptq"),
    ("INT8", FP8, "fp8"),
    ("fp8", PLAIN, "fp8"),            # vLLM quantizes while loading
    ("awq_marlin", AWQ4, "awq_marlin"),  # same format, faster kernel
    ("gptq", GPTQ8, "gptq"),
])
def test_resolve_quantization(requested, config, flag):
    assert resolve_quantization(requested, config) == flag


@pytest.mark.parametrize(("requested", "config", "message"), [
    ("int4", PLAIN, r"'int4' needs a checkpoint quantized to 4 bits .* no quantization_config"),
    ("int8", AWQ4, r"'int8', but the checkpoint is awq, 4-bit: set quantization to 'awq' or 'int4'"),
    ("none", GPTQ8, r"'none', but the checkpoint is quantized \(gptq, 8-bit\): set quantization to 'gptq' or 'int8'"),
    ("awq", GPTQ8, r"quantized with gptq, 8-bit: set quantization to 'gptq'"),
    ("gptq", PLAIN, r"'gptq' needs a checkpoint quantized with gptq"),
])
def test_quantization_that_cannot_apply(requested, config, message):
    with pytest.raises(QuantizationError, match=message):
        resolve_quantization(requested, config)
