"""CPU: vLLM's CPU build, no devices (tests and the local stack)."""

from components.accelerators.profile import Profile

PROFILE = Profile(
    name="cpu",
    gpu_count_fix="the cpu accelerator has no GPUs; set gpus: 0 or accelerator: dcu",
    single_process_reason="the cpu accelerator serves each model in one process (vLLM's Ray executor does not support CPU)",
    # vLLM's own method names; its CPU platform restricts none of them (vllm/platforms/cpu.py).
    quantization_methods=(
        "awq", "awq_marlin", "gptq", "gptq_marlin", "gptq_marlin_24", "fp8", "fbgemm_fp8",
        "compressed-tensors", "moe_wna16", "bitsandbytes", "gguf", "marlin", "experts_int8",
        "quark", "modelopt", "ipex", "deepspeedfp", "tpu_int8", "hqq", "auto-round", "inc",
    ),
)
