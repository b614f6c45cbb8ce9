"""The guide's quantization aliases (none/int8/int4) and vLLM method names, checked against the checkpoint."""

from typing import Any

ALIASES = ("none", "int8", "int4")
# Methods vLLM can apply to an unquantized checkpoint while loading it; all others need a
# checkpoint that was quantized with that method.
ONLINE_METHODS = frozenset({"fp8", "bitsandbytes", "experts_int8"})
# Two spellings of one checkpoint method.
SAME_METHOD = {"compressed_tensors": "compressed-tensors"}
# Kernels that serve checkpoints of another method; vLLM (and Hygon's HYGON-AI/vllm-plugin-das, whose
# SlimQuant kernels serve W8A8 compressed-tensors and W4A8 checkpoints) picks them only when asked by name.
SERVES = {
    "gptq_marlin": {"gptq"}, "awq_marlin": {"awq"}, "gptq_bitblas": {"gptq"},
    "slimquant_marlin": {"compressed-tensors"}, "slimquant_compressed_tensors_marlin": {"compressed-tensors"},
    "slimquant_w4a8_marlin": {"slimquant_w4a8"},
}


class QuantizationError(ValueError):
    """The requested quantization cannot apply to this checkpoint; the message says what would."""


def checkpoint_quantization(model_config: dict[str, Any]) -> tuple[str, int | None] | None:
    """(method, weight bits) from a checkpoint's config.json, or None for an unquantized checkpoint."""
    qc = model_config.get("quantization_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "unknown")).lower()
    method = SAME_METHOD.get(method, method)
    bits = qc.get("bits") or qc.get("w_bit") or qc.get("weight_bits")
    if bits is None and method == "bitsandbytes":
        bits = 4 if qc.get("load_in_4bit") else 8 if qc.get("load_in_8bit") else None
    if bits is None and method == "fp8":
        bits = 8
    if bits is None:
        weight_bits = {g.get("weights", {}).get("num_bits") for g in qc.get("config_groups", {}).values()}
        weight_bits.discard(None)
        bits = weight_bits.pop() if len(weight_bits) == 1 else None
    return method, int(bits) if bits is not None else None


def _describe(found: tuple[str, int | None]) -> str:
    method, bits = found
    return f"{method}, {bits}-bit" if bits else method


def serves(requested: str, method: str) -> bool:
    """Whether vLLM's --quantization `requested` loads a checkpoint quantized with `method`."""
    requested = SAME_METHOD.get(requested, requested)
    return method in SERVES.get(requested, {requested})


def resolve_quantization(requested: str, model_config: dict[str, Any]) -> str | None:
    """The value for vLLM's --quantization (None: leave the flag out), or a QuantizationError.

    An alias that fits the checkpoint leaves the flag out: vLLM reads the method from the checkpoint
    and lets a faster kernel claim it (gptq_marlin, Hygon's slimquant_w4a8), which naming the method
    would prevent — as the vendor's recipes serve such checkpoints (HYGON-AI/inference-cookbook-das:
    no -q for its quantized.w8a8 and W4A8 checkpoints on K100_AI)."""
    requested = requested.strip().lower()
    found = checkpoint_quantization(model_config)
    if requested == "none":
        if found:
            raise QuantizationError(
                f"quantization 'none', but the checkpoint is quantized ({_describe(found)}): "
                f"set quantization to '{found[0]}'" + (f" or 'int{found[1]}'" if found[1] in (4, 8) else "")
            )
        return None
    if requested in ("int8", "int4"):
        bits = int(requested[3:])
        if not found:
            raise QuantizationError(
                f"quantization '{requested}' needs a checkpoint quantized to {bits} bits (e.g. AWQ or GPTQ), "
                "but this checkpoint has no quantization_config: serve a pre-quantized checkpoint or use 'none'"
            )
        if found[1] != bits:
            raise QuantizationError(
                f"quantization '{requested}', but the checkpoint is {_describe(found)}: "
                f"set quantization to '{found[0]}'" + (f" or 'int{found[1]}'" if found[1] in (4, 8) else "")
            )
        return None
    if found and not serves(requested, found[0]):
        raise QuantizationError(
            f"quantization '{requested}', but the checkpoint is quantized with {_describe(found)}: "
            f"set quantization to '{found[0]}'"
        )
    if not found and requested not in ONLINE_METHODS:
        raise QuantizationError(
            f"quantization '{requested}' needs a checkpoint quantized with "
            f"{' or '.join(sorted(SERVES.get(requested, {requested})))}, but this checkpoint "
            f"has no quantization_config: use one of {', '.join(sorted(ONLINE_METHODS))} to quantize "
            "while loading, 'none', or a pre-quantized checkpoint"
        )
    return requested
