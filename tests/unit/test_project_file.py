"""Pulumi.yaml declares every scalar key with the type and default the program itself uses."""

import subprocess
from typing import Annotated, Literal, Union, get_args, get_origin

import yaml

from components.config import parse_stack_config
from components.plan import make_plan
from components.preflight import preflight_script
from components.schema import StackConfig
from tests.support.pulumi_program import REPO, stack_config

PULUMI_TYPES = {str: "string", int: "integer", bool: "boolean"}


def _base_type(annotation):
    """str for `str`, `IPAddress | None`, `Literal["dcu", "cpu"]`; None for objects and lists."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _base_type(get_args(annotation)[0])
    if origin is Literal:
        return str
    if origin in (Union, type(int | None)):
        (inner,) = [a for a in get_args(annotation) if a is not type(None)]
        return _base_type(inner)
    return annotation if annotation in PULUMI_TYPES else None


def _scalar_fields():
    for field in StackConfig.model_fields.values():
        base = _base_type(field.annotation)
        if base is not None:
            yield field.alias, PULUMI_TYPES[base], field


def test_every_scalar_key_is_declared_with_its_type_and_default():
    declared = yaml.safe_load((REPO / "Pulumi.yaml").read_text())["config"]
    expected = {alias: (kind, field) for alias, kind, field in _scalar_fields()}
    assert set(declared) == set(expected)
    for key, (kind, field) in expected.items():
        assert declared[key]["type"] == kind, key
        if field.is_required():
            assert "default" not in declared[key], key
        else:
            default = "" if field.default is None else field.default
            assert declared[key]["default"] == default, key


def test_preflight_names_the_host_and_the_fix_when_docker_is_unreachable(tmp_path):
    plan = make_plan(parse_stack_config(stack_config(REPO / "Pulumi.dev.yaml")))
    script = preflight_script(plan, plan.workers[0])
    result = subprocess.run(
        ["sh", "-c", script], capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", "DOCKER_HOST": f"unix://{tmp_path}/no-such.sock", "HOME": str(tmp_path)},
    )
    assert result.returncode == 1
    assert "preflight failed on dcu-worker-1 (10.0.0.12)" in result.stderr
    assert "Docker is unreachable" in result.stderr and "docker group" in result.stderr
