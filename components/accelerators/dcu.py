"""Hygon DCU: the vendor's device nodes, groups and driver mounts (DESIGN.md, "Hygon DCU facts")."""

from components.accelerators.profile import DeviceCheck, Profile

_DRIVER_FIX = "install and load the DCU driver (hy-smi must list the DCUs), or set accelerator: cpu"

PROFILE = Profile(
    name="dcu",
    devices=("/dev/kfd", "/dev/dri", "/dev/mkfd"),
    group_adds=("video",),
    capabilities=("SYS_PTRACE",),
    security_opts=("seccomp=unconfined",),
    read_only_mounts=("/opt/hyhal",),
    preflight_devices=(
        DeviceCheck("/dev/kfd", _DRIVER_FIX),
        DeviceCheck("/dev/mkfd", _DRIVER_FIX),
        DeviceCheck("/dev/dri/renderD*", _DRIVER_FIX),
    ),
    toolkit_mount="/opt/dtk",
    toolkit_env_var="ROCM_PATH",
    # Only HIP_VISIBLE_DEVICES: also setting ROCR_VISIBLE_DEVICES yields "No HIP GPUs are available".
    visible_devices_var="HIP_VISIBLE_DEVICES",
    # Ray must not rewrite the visibility vLLM's workers rely on.
    extra_env={
        "RAY_EXPERIMENTAL_NOSET_HIP_VISIBLE_DEVICES": "1",
        "RAY_EXPERIMENTAL_NOSET_ROCR_VISIBLE_DEVICES": "1",
    },
    has_gpus=True,
    gpu_count_fix="a DCU node needs at least 1 GPU (count them with `hy-smi` or `ls /dev/dri/renderD*`)",
    executor="ray",
)
