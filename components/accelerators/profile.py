"""What a profile is; the profiles themselves are the sibling modules."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath

IMAGES_DIR = "images"  # recipes, relative to the project root


@dataclass(frozen=True)
class HostPath:
    """A path the preflight requires on the host (a glob is allowed); missing means `fix`."""

    path: str
    fix: str


@dataclass(frozen=True)
class Profile:
    name: str
    devices: tuple[HostPath, ...] = ()
    # Devices a container gets only on hosts where the driver created them (Docker refuses a missing one).
    optional_devices: tuple[str, ...] = ()
    group_adds: tuple[str, ...] = ()
    capabilities: tuple[str, ...] = ()
    security_opts: tuple[str, ...] = ()
    read_only_mounts: tuple[HostPath, ...] = ()
    # The device nodes the preflight counts against a node's `gpus`.
    render_devices: str | None = None
    # Where the kernel module reports the driver's version (the first that exists), for the preflight.
    driver_version_files: tuple[str, ...] = ()
    # Mounted read-only with `mountDtk` (hosts whose image needs the host's toolkit), and named in env.
    toolkit_mount: HostPath | None = None
    toolkit_env_var: str = ""
    # Why mounting the host's toolkit is risky with this profile's images, if it is.
    toolkit_mount_warning: str | None = None
    # The one variable that selects a container's devices, and what else Ray and vLLM need beside it.
    visible_devices_var: str | None = None
    # Whether nodes carry GPUs (at least one each) or none at all, and how to count them.
    has_gpus: bool = False
    gpu_count_fix: str = ""
    # Why one model may not span several processes (TP/PP > 1), if it may not.
    single_process_reason: str | None = None
    # vLLM's --distributed-executor-backend for a layout spanning several devices.
    executor: str | None = None
    # env the node's containers need beside device visibility (set before `ray start`).
    extra_env: dict[str, str] = field(default_factory=dict)
    # The vLLM --quantization methods its images serve (beside the guide's none/int8/int4).
    quantization_methods: tuple[str, ...] = ()

    @property
    def recipe(self) -> str:
        """The Dockerfile that builds this profile's node image, relative to the project."""
        return str(PurePosixPath(IMAGES_DIR) / self.name / "Dockerfile")

    def node_env(self, devices: tuple[int, ...], *, mount_dtk: bool) -> dict[str, str]:
        """Device selection for Ray and vLLM, set before `ray start` on every container."""
        if self.visible_devices_var is None:
            return {}
        env = {self.visible_devices_var: ",".join(str(i) for i in devices), **self.extra_env}
        if mount_dtk and self.toolkit_mount:
            env[self.toolkit_env_var] = self.toolkit_mount.path
        return env

    def mounts(self, *, mount_dtk: bool) -> tuple[HostPath, ...]:
        """Bind-mounted read-only at the same path, so each must exist on the host."""
        toolkit = (self.toolkit_mount,) if mount_dtk and self.toolkit_mount else ()
        return self.read_only_mounts + toolkit

    def gpu_count_problem(self, gpus: int) -> str | None:
        """What is wrong with a node declaring `gpus`, or None."""
        return self.gpu_count_fix if (gpus > 0) != self.has_gpus else None

    def executor_for(self, world_size: int) -> str | None:
        return self.executor if world_size > 1 else None
