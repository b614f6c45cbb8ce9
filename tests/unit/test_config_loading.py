"""Reading the stack the way the engine hands it over: the language host puts the stack's config in the
program's environment (PULUMI_CONFIG, a JSON object of strings; PULUMI_CONFIG_SECRET_KEYS, the secret
ones), which components/config.py reads through the SDK's runtime config — as under `pulumi up`."""

from __future__ import annotations

import json

import pulumi
import pytest

from tests.support.pulumi_program import REPO, run_program, stack_config

DEV = stack_config(REPO / "Pulumi.dev.yaml")
MS_TOKEN = "ms-token-not-a-secret-0123"


def _engine_env(monkeypatch, config: dict, secrets: dict[str, str] | None = None) -> None:
    values = {f"vllm-dcu:{k}": v if isinstance(v, str) else json.dumps(v) for k, v in config.items()}
    values.update({f"vllm-dcu:{k}": v for k, v in (secrets or {}).items()})
    monkeypatch.setenv("PULUMI_CONFIG", json.dumps(values))
    monkeypatch.setenv("PULUMI_CONFIG_SECRET_KEYS", json.dumps([f"vllm-dcu:{k}" for k in secrets or {}]))


def _inputs(run) -> dict[str, str]:
    assert run.error is None, run.error
    return {r.name: json.dumps(r.inputs, sort_keys=True) for r in run.resources}


def test_the_engines_environment_gives_the_same_resources(monkeypatch):
    direct = _inputs(run_program(DEV, stack="dev"))
    _engine_env(monkeypatch, DEV)
    assert _inputs(run_program({}, stack="dev")) == direct


def test_an_empty_value_is_unset(monkeypatch):
    direct = _inputs(run_program(DEV, stack="dev"))
    _engine_env(monkeypatch, {**DEV, "imageRegistry": "", "minDriverVersion": ""})
    assert _inputs(run_program({}, stack="dev")) == direct


def test_a_misspelled_key_from_the_engine_is_named(monkeypatch):
    _engine_env(monkeypatch, {**DEV, "imageRegistery": "registry.local/vllm"})
    run = run_program({}, stack="dev")
    assert run.error is not None and "vllm-dcu:imageRegistery: unknown key" in str(run.error)


def test_the_modelscope_token_is_a_secret_for_modelscope_models_only():
    models = [{"id": "Qwen/Qwen2.5-7B-Instruct", "source": "modelscope", "tensorParallelSize": 8},
              {"id": "meta-llama/Llama-3.1-8B-Instruct", "tensorParallelSize": 8}]
    run = run_program({**DEV, "models": models}, stack="dev", secrets={"modelscopeToken": MS_TOKEN, "hfToken": "hf-x"})
    assert run.error is None, run.error
    holding = {r.name for r in run.resources if MS_TOKEN in json.dumps(r.inputs)}
    assert holding and all("Qwen2.5-7B-Instruct" in name for name in holding), holding
    assert all(r.secret_paths for r in run.resources if r.name in holding)


def test_warnings_are_logged_with_the_project_prefix(monkeypatch):
    warned: list[str] = []
    monkeypatch.setattr(pulumi.log, "warn", lambda message, *args, **kwargs: warned.append(message))
    assert run_program({**DEV, "mountDtk": True}, stack="dev").error is None
    assert warned == ["vllm-dcu:mountDtk: the vendor's vLLM images ship their own DTK at /opt/dtk; the host's mounted "
                      "over it must be the version the image was built with, or kernels fail to load — set mountDtk "
                      "only for images without one"]


def test_api_keys_in_plain_text_are_refused_in_full():
    run = run_program({**DEV, "apiKeys": [{"name": "a", "key": "k" * 24}]}, stack="dev")
    assert str(run.error).endswith(
        "vllm-dcu:apiKeys: holds API key values in plain text; set it as a secret: "
        "pulumi config set --secret vllm-dcu:apiKeys '[{\"name\": ..., \"key\": ...}]'")


def test_secrets_are_values():
    from dataclasses import FrozenInstanceError

    from components.config import Secrets

    with pytest.raises(FrozenInstanceError):
        Secrets().api_key = "x"  # type: ignore[misc]
