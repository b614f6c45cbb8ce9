"""Accelerator profiles: what a container needs to see its node's devices (DESIGN.md, DCU facts)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    devices: tuple[str, ...] = ()
    group_adds: tuple[str, ...] = ()
    capabilities: tuple[str, ...] = ()
    security_opts: tuple[str, ...] = ()
    read_only_mounts: tuple[str, ...] = ()
    preflight_devices: tuple[str, ...] = ()

    def env(self, gpus: int, *, mount_dtk: bool) -> dict[str, str]:
        """Device selection for Ray and vLLM, set before `ray start` on every container."""
        if not self.devices:
            return {}
        env = {
            # Only HIP_VISIBLE_DEVICES: also setting ROCR_VISIBLE_DEVICES yields "No HIP GPUs are available".
            "HIP_VISIBLE_DEVICES": ",".join(str(i) for i in range(gpus)),
            # Ray must not rewrite the visibility vLLM's workers rely on.
            "RAY_EXPERIMENTAL_NOSET_HIP_VISIBLE_DEVICES": "1",
            "RAY_EXPERIMENTAL_NOSET_ROCR_VISIBLE_DEVICES": "1",
        }
        if mount_dtk:
            env["ROCM_PATH"] = "/opt/dtk"
        return env

    def mounts(self, *, mount_dtk: bool) -> tuple[str, ...]:
        return self.read_only_mounts + (("/opt/dtk",) if mount_dtk and self.devices else ())


PROFILES: dict[str, Profile] = {
    "dcu": Profile(
        devices=("/dev/kfd", "/dev/dri", "/dev/mkfd"),
        group_adds=("video",),
        capabilities=("SYS_PTRACE",),
        security_opts=("seccomp=unconfined",),
        read_only_mounts=("/opt/hyhal",),
        preflight_devices=("/dev/kfd", "/dev/mkfd", "/dev/dri/renderD*"),
    ),
    "cpu": Profile(),
}
