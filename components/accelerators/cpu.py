"""CPU: vLLM's CPU build, no devices (tests and the local stack)."""

from components.accelerators.profile import Profile

PROFILE = Profile(
    name="cpu",
    gpu_count_fix="the cpu accelerator has no GPUs; set gpus: 0 or accelerator: dcu",
    single_process_reason="the cpu accelerator serves each model in one process (vLLM's Ray executor does not support CPU)",
)
