import pytest

from node_runtime.serving.quantization import QuantizationError, checkpoint_quantization, resolve_quantization

PLAIN = {"architectures": ["LlamaForCausalLM"]}
AWQ4 = {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}}
GPTQ8 = {"quantization_config": {"quant_method": "gptq", "bits": 8}}
COMPRESSED_W4 = {"quantization_config": {"quant_method": "compressed-tensors",
                                         "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "int"}}}}}
FP8 = {"quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic"}}
# Hygon's checkpoints (hygon/*-Channel-INT8-w8a8, *-W4A8 on ModelScope): compressed-tensors W8A8, SlimQuant W4A8.
W8A8 = {"quantization_config": {"quant_method": "compressed-tensors",
                                "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "int"}}}}}
SLIM_W4A8 = {"quantization_config": {"quant_method": "slimquant_w4a8", "bits": 4}}


@pytest.mark.parametrize(("config", "found"), [
    (PLAIN, None), (AWQ4, ("awq", 4)), (GPTQ8, ("gptq", 8)), (COMPRESSED_W4, ("compressed-tensors", 4)), (FP8, ("fp8", 8)),
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}, ("bitsandbytes", 4)),
])
def test_checkpoint_quantization(config, found):
    assert checkpoint_quantization(config) == found


@pytest.mark.parametrize(("requested", "config", "flag"), [
    ("none", PLAIN, None),
    # An alias that fits: no flag, vLLM reads the checkpoint's own method (and picks its fastest kernel).
    ("int4", AWQ4, None),
    ("int4", COMPRESSED_W4, None),
    ("int8", GPTQ8, None),
    ("INT8", FP8, None),
    ("int8", W8A8, None),
    ("int4", SLIM_W4A8, None),
    ("fp8", PLAIN, "fp8"),            # vLLM quantizes while loading
    ("awq_marlin", AWQ4, "awq_marlin"),  # same format, faster kernel
    ("gptq", GPTQ8, "gptq"),
    ("slimquant_marlin", W8A8, "slimquant_marlin"),  # Hygon's INT8 kernel for compressed-tensors W8A8
    ("slimquant_compressed_tensors_marlin", W8A8, "slimquant_compressed_tensors_marlin"),
    ("slimquant_w4a8_marlin", SLIM_W4A8, "slimquant_w4a8_marlin"),
    ("slimquant_w4a8", SLIM_W4A8, "slimquant_w4a8"),
])
def test_resolve_quantization(requested, config, flag):
    assert resolve_quantization(requested, config) == flag


@pytest.mark.parametrize(("requested", "config", "message"), [
    ("int4", PLAIN, r"'int4' needs a checkpoint quantized to 4 bits .* no quantization_config"),
    ("int8", AWQ4, r"'int8', but the checkpoint is awq, 4-bit: set quantization to 'awq' or 'int4'"),
    ("none", GPTQ8, r"'none', but the checkpoint is quantized \(gptq, 8-bit\): set quantization to 'gptq' or 'int8'"),
    ("awq", GPTQ8, r"quantized with gptq, 8-bit: set quantization to 'gptq'"),
    ("gptq", PLAIN, r"'gptq' needs a checkpoint quantized with gptq"),
    ("slimquant_marlin", AWQ4, r"quantized with awq, 4-bit: set quantization to 'awq'"),
    ("slimquant_w4a8_marlin", W8A8, r"quantized with compressed-tensors, 8-bit: set quantization to 'compressed-tensors'"),
    ("slimquant_marlin", PLAIN, r"'slimquant_marlin' needs a checkpoint quantized with compressed-tensors, but"),
])
def test_quantization_that_cannot_apply(requested, config, message):
    with pytest.raises(QuantizationError, match=message):
        resolve_quantization(requested, config)


def test_the_runtime_resolves_the_aliases_the_program_accepts():
    from components.schema import QUANTIZATION_ALIASES
    from node_runtime.serving.quantization import ALIASES

    assert ALIASES == QUANTIZATION_ALIASES == ("none", "int8", "int4")


GPTQ4 = {"quantization_config": {"quant_method": "gptq", "bits": 4}}


@pytest.mark.parametrize(("config", "found"), [
    # The other spelling of compressed-tensors, and the bits under each checkpoint format's own key.
    ({"quantization_config": {"quant_method": "compressed_tensors", "config_groups": {
        "g0": {"weights": {"num_bits": 8}}, "g1": {"weights": {"num_bits": 8}}}}}, ("compressed-tensors", 8)),
    ({"quantization_config": {"quant_method": "AWQ", "w_bit": 4}}, ("awq", 4)),
    ({"quantization_config": {"quant_method": "quark", "weight_bits": 8}}, ("quark", 8)),
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}}, ("bitsandbytes", 8)),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, ("bitsandbytes", None)),
    ({"quantization_config": {"quant_method": "fp8", "bits": 4}}, ("fp8", 4)),  # a stated width wins
    # Groups of different widths: no one width.
    ({"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {
        "g0": {"weights": {"num_bits": 4}}, "g1": {"weights": {"num_bits": 8}}, "g2": {}}}}, ("compressed-tensors", None)),
    ({"quantization_config": {"bits": "4"}}, ("unknown", 4)),
    # A group without a width does not hide the others'; bitsandbytes' flags count for bitsandbytes only.
    ({"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {
        "g0": {"weights": {"num_bits": 8}}, "g1": {"weights": {}}}}}, ("compressed-tensors", 8)),
    ({"quantization_config": {"quant_method": "gptq", "load_in_4bit": True}}, ("gptq", None)),
    ({"quantization_config": {"quant_method": "bitsandbytes", "bits": 4, "load_in_8bit": True}}, ("bitsandbytes", 4)),
    ({"quantization_config": {}}, None),
    ({"quantization_config": None}, None),
])
def test_checkpoint_quantization_formats(config, found):
    assert checkpoint_quantization(config) == found


@pytest.mark.parametrize(("requested", "config", "flag"), [
    (" Bitsandbytes ", PLAIN, "bitsandbytes"),   # quantized while loading
    ("experts_int8", PLAIN, "experts_int8"),
    ("gptq_marlin", GPTQ4, "gptq_marlin"),       # kernels serving gptq checkpoints
    ("gptq_bitblas", GPTQ4, "gptq_bitblas"),
    ("compressed_tensors", W8A8, "compressed_tensors"),
    ("compressed-tensors", {"quantization_config": {"quant_method": "compressed_tensors"}}, "compressed-tensors"),
    ("int4", {"quantization_config": {"quant_method": "gptq", "bits": 4}}, None),
])
def test_resolve_quantization_kernels_and_spellings(requested, config, flag):
    assert resolve_quantization(requested, config) == flag


@pytest.mark.parametrize(("requested", "config", "message"), [
    # The whole message: what was asked, what the checkpoint is, and every way out.
    ("none", AWQ4, "quantization 'none', but the checkpoint is quantized (awq, 4-bit): set quantization to 'awq' or 'int4'"),
    ("none", {"quantization_config": {"quant_method": "gptq", "bits": 3}},
     "quantization 'none', but the checkpoint is quantized (gptq, 3-bit): set quantization to 'gptq'"),
    ("none", {"quantization_config": {"quant_method": "marlin"}},
     "quantization 'none', but the checkpoint is quantized (marlin): set quantization to 'marlin'"),
    ("int8", PLAIN, "quantization 'int8' needs a checkpoint quantized to 8 bits (e.g. AWQ or GPTQ), but this checkpoint "
                    "has no quantization_config: serve a pre-quantized checkpoint or use 'none'"),
    ("int4", GPTQ8, "quantization 'int4', but the checkpoint is gptq, 8-bit: set quantization to 'gptq' or 'int8'"),
    ("int4", {"quantization_config": {"quant_method": "gptq", "bits": 3}},
     "quantization 'int4', but the checkpoint is gptq, 3-bit: set quantization to 'gptq'"),
    ("gptq_marlin", AWQ4, "quantization 'gptq_marlin', but the checkpoint is quantized with awq, 4-bit: "
                          "set quantization to 'awq'"),
    ("awq_marlin", PLAIN, "quantization 'awq_marlin' needs a checkpoint quantized with awq, but this checkpoint has no "
                          "quantization_config: use one of bitsandbytes, experts_int8, fp8 to quantize while loading, "
                          "'none', or a pre-quantized checkpoint"),
    ("slimquant_w4a8_marlin", PLAIN, "quantization 'slimquant_w4a8_marlin' needs a checkpoint quantized with "
                                     "slimquant_w4a8, but this checkpoint has no quantization_config: use one of "
                                     "bitsandbytes, experts_int8, fp8 to quantize while loading, 'none', or a "
                                     "pre-quantized checkpoint"),
    ("slimquant_compressed_tensors_marlin", AWQ4, "quantization 'slimquant_compressed_tensors_marlin', but the "
                                                  "checkpoint is quantized with awq, 4-bit: set quantization to 'awq'"),
])
def test_refusals_in_full(requested, config, message):
    with pytest.raises(QuantizationError) as raised:
        resolve_quantization(requested, config)
    assert str(raised.value) == message
