"""The accelerator profiles as a stack sees them: the quantization methods each accepts (the README's
list for DCU), and what the profile's own methods return for both kinds."""

from __future__ import annotations

import copy
import re

import pytest

from components.accelerators import PROFILES, HostPath
from components.config import ConfigError, parse_stack_config
from tests.support.pulumi_program import REPO, stack_config

DCU, CPU = PROFILES["dcu"], PROFILES["cpu"]
LOCAL = stack_config(REPO / "Pulumi.local.yaml")
DEV = stack_config(REPO / "Pulumi.dev.yaml")

# vLLM's own method names the cpu profile accepts (components/accelerators/cpu.py): dropping one refuses
# stacks that use it, so each is a decision, made here as well.
CPU_METHODS = ("awq", "awq_marlin", "gptq", "gptq_marlin", "gptq_marlin_24", "fp8", "fbgemm_fp8", "compressed-tensors",
               "moe_wna16", "bitsandbytes", "gguf", "marlin", "experts_int8", "quark", "modelopt", "ipex",
               "deepspeedfp", "tpu_int8", "hqq", "auto-round", "inc")


def _readme_dcu_methods() -> list[str]:
    """The methods the README's configuration table promises on DCU, in its order."""
    row = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `quantization` |"))
    dcu = row.split("`dcu`:", 1)[1].split("(no", 1)[0]
    return re.findall(r"`([a-z0-9_-]+)`", dcu)


def _with_quantization(config: dict, method: str) -> dict:
    config = copy.deepcopy(config)
    config["models"][0]["quantization"] = method
    return config


def test_the_dcu_methods_are_the_readmes():
    assert list(DCU.quantization_methods) == _readme_dcu_methods()


@pytest.mark.parametrize("method", _readme_dcu_methods())
def test_every_dcu_method_the_readme_names_is_accepted(method):
    parse_stack_config(_with_quantization(DEV, method))


def test_the_cpu_methods_are_vllms_names():
    assert CPU.quantization_methods == CPU_METHODS


@pytest.mark.parametrize("method", CPU_METHODS)
def test_every_cpu_method_is_accepted_on_the_local_stack(method):
    parse_stack_config(_with_quantization(LOCAL, method))


def test_a_dcu_only_method_is_refused_on_cpu_with_the_whole_list():
    with pytest.raises(ConfigError) as raised:
        parse_stack_config(_with_quantization(LOCAL, "ptpc_fp8"))
    assert ("vllm-dcu:models[0].quantization: 'ptpc_fp8' is not served on the cpu profile; use one of none, int8, "
            f"int4, {', '.join(CPU_METHODS)}") in str(raised.value)


def test_node_env_dcu():
    extra = {f"RAY_EXPERIMENTAL_NOSET_{kind}_VISIBLE_DEVICES": "1" for kind in ("HIP", "ROCR", "CUDA")}
    assert DCU.node_env((0, 3), mount_dtk=False) == {"HIP_VISIBLE_DEVICES": "0,3", **extra}
    assert DCU.node_env((), mount_dtk=True) == {"HIP_VISIBLE_DEVICES": "", **extra, "ROCM_PATH": "/opt/dtk"}
    assert CPU.node_env((0,), mount_dtk=True) == {}


def test_mounts_and_recipes():
    hyhal = DCU.read_only_mounts
    assert [m.path for m in hyhal] == ["/opt/hyhal"]
    assert DCU.mounts(mount_dtk=False) == hyhal
    assert DCU.mounts(mount_dtk=True) == hyhal + (DCU.toolkit_mount,)
    assert DCU.toolkit_mount == HostPath("/opt/dtk", "install the DTK at /opt/dtk (or link it there), or set mountDtk: false")
    assert CPU.mounts(mount_dtk=True) == ()
    assert (DCU.recipe, CPU.recipe) == ("images/dcu/Dockerfile", "images/cpu/Dockerfile")
    assert [(d.path, d.fix) for d in DCU.devices] == [
        (path, "install and load the DCU driver (hy-smi must list the DCUs), or set accelerator: cpu")
        for path in ("/dev/kfd", "/dev/dri")]


@pytest.mark.parametrize(("profile", "gpus", "problem"), [
    (DCU, 0, "a DCU node needs at least 1 GPU (count them with `hy-smi` or `ls /dev/dri/renderD*`)"),
    (DCU, 1, None), (DCU, 8, None),
    (CPU, 0, None),
    (CPU, 1, "the cpu accelerator has no GPUs; set gpus: 0 or accelerator: dcu"),
])
def test_gpu_count_problem(profile, gpus, problem):
    assert profile.gpu_count_problem(gpus) == problem


def test_executor_by_world_size():
    assert [DCU.executor_for(n) for n in (1, 2, 8)] == [None, "ray", "ray"]
    assert [CPU.executor_for(n) for n in (1, 2)] == [None, None]


def test_profiles_and_their_paths_are_immutable():
    """One profile object serves every stack of the process: nothing may change it, and its paths are values."""
    from dataclasses import FrozenInstanceError

    with pytest.raises(FrozenInstanceError):
        DCU.devices[0].path = "/dev/other"  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        CPU.executor = "ray"  # type: ignore[misc]
    assert len({*DCU.devices, *DCU.read_only_mounts, DCU.toolkit_mount}) == 4
