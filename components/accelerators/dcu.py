"""Hygon DCU: the vendor's device nodes, groups, driver mounts and vLLM methods (DESIGN.md, "Hygon DCU facts")."""

from components.accelerators.profile import HostPath, Profile

_DRIVER_FIX = "install and load the DCU driver (hy-smi must list the DCUs), or set accelerator: cpu"

PROFILE = Profile(
    name="dcu",
    devices=(HostPath("/dev/kfd", _DRIVER_FIX), HostPath("/dev/dri", _DRIVER_FIX)),
    # Only some driver versions create it; the vendor's container toolkit adds it only where present
    # (HYGON-AI/hcu-container-toolkit, internal/discover/graphics.go).
    optional_devices=("/dev/mkfd",),
    group_adds=("video",),
    capabilities=("SYS_PTRACE",),
    security_opts=("seccomp=unconfined",),
    read_only_mounts=(HostPath(
        "/opt/hyhal",
        "the DCU runtime (hyhal) is often installed at /usr/local/hyhal: link it with "
        "`ln -s /usr/local/hyhal /opt/hyhal` (GPUStack's DCU install docs), or install the DCU driver",
    ),),
    render_devices="/dev/dri/renderD*",
    # hydcu is the DCU driver's module; newer HCU drivers call it hycu (GPUStack and HYGON-AI read both).
    driver_version_files=("/sys/module/hydcu/version", "/sys/module/hycu/version"),
    toolkit_mount=HostPath("/opt/dtk", "install the DTK at /opt/dtk (or link it there), or set mountDtk: false"),
    toolkit_env_var="ROCM_PATH",
    toolkit_mount_warning=(
        "the vendor's vLLM images ship their own DTK at /opt/dtk; the host's mounted over it must be the "
        "version the image was built with, or kernels fail to load — set mountDtk only for images without one"
    ),
    # Only HIP_VISIBLE_DEVICES: also setting ROCR_VISIBLE_DEVICES yields "No HIP GPUs are available".
    visible_devices_var="HIP_VISIBLE_DEVICES",
    # Ray must not rewrite the visibility vLLM's workers rely on: vLLM's ROCm platform asserts that
    # HIP_ and CUDA_VISIBLE_DEVICES agree, and Ray's GPU manager would set CUDA_VISIBLE_DEVICES alone
    # (the three names vllm/platforms/rocm.py and HYGON-AI/vllm-plugin-das list as ray_noset_device_env_vars).
    extra_env={
        "RAY_EXPERIMENTAL_NOSET_HIP_VISIBLE_DEVICES": "1",
        "RAY_EXPERIMENTAL_NOSET_ROCR_VISIBLE_DEVICES": "1",
        "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1",
    },
    has_gpus=True,
    gpu_count_fix="a DCU node needs at least 1 GPU (count them with `hy-smi` or `ls /dev/dri/renderD*`)",
    executor="ray",
    # vLLM's ROCm platform in the vendor images (supported_quantization of vllm/platforms/rocm.py,
    # 0.8.5 and 0.9.2; no bitsandbytes, moe_wna16 or experts_int8), and Hygon's SlimQuant kernels that
    # HYGON-AI/vllm-plugin-das registers: slimquant_marlin (INT8 W8A8 compressed-tensors checkpoints),
    # slimquant_w4a8 and slimquant_w4a8_marlin (W4A8 checkpoints) as HYGON-AI/inference-cookbook-das serves them.
    quantization_methods=(
        "awq", "gptq", "fp8", "compressed-tensors", "fbgemm_fp8", "gguf", "quark", "ptpc_fp8",
        "slimquant_marlin", "slimquant_compressed_tensors_marlin", "slimquant_w4a8", "slimquant_w4a8_marlin",
    ),
)
