"""The program's side of docs/runtime-contract.md, checked with the runtime's own models and CLI."""

import shlex

import pytest
import typer
from typer.exceptions import TyperException

from node_runtime.cli import app
from node_runtime.serving.gateway.config import GatewayConfig
from node_runtime.serving.spec import ServeSpec
from tests.support.pulumi_program import REPO, run_program, stack_config
from tests.unit.conftest import STACK_FILES
from tests.unit.test_program import env_of


@pytest.mark.parametrize("stack_file", STACK_FILES, ids=[p.name for p in STACK_FILES])
def test_declared_specs_validate_against_the_runtime(stack_file):
    run = run_program(stack_config(stack_file), stack=stack_file.stem.split(".")[1])
    assert run.error is None, run.error
    servers = [r for r in run.resources if r.name.endswith("-container") and "-server-" in r.name]
    assert servers
    for server in servers:
        ServeSpec.model_validate_json(env_of(server)["NODE_RUNTIME_SERVE_SPEC"])
    gateway = next(r for r in run.resources if r.name.endswith("gateway-container"))
    GatewayConfig.model_validate_json(env_of(gateway)["NODE_RUNTIME_GATEWAY_CONFIG"])


def _declared_commands() -> list[list[str]]:
    """Every `node-runtime ...` argument list the dev and local stacks declare, in commands' create and
    delete scripts and as container commands."""
    found = []
    for stack in ("dev", "local"):
        run = run_program(stack_config(REPO / f"Pulumi.{stack}.yaml"), stack=stack)
        for resource in run.resources:
            text = "\n".join(resource.inputs.get(key) or "" for key in ("create", "delete"))
            for line in text.replace(";", "\n").splitlines():
                words = shlex.split(line) if "node-runtime" in line else []
                if "node-runtime" in words:
                    found.append(words[words.index("node-runtime") + 1:])
            if resource.inputs.get("command", [""])[0] == "node-runtime":
                found.append(resource.inputs["command"][1:])
    return found


def parse(args: list[str]):
    """The runtime CLI's parse of a whole command line, as it would run it, without running it:
    every option and value checked (an unknown option, a bad value or a missing one raises)."""
    command = typer.main.get_command(app)
    remaining = list(args)
    while remaining and remaining[0] in getattr(command, "commands", {}):
        command = command.commands[remaining.pop(0)]
    return command.make_context(command.name, remaining)


def test_declared_commands_parse_with_the_runtime_cli():
    commands = _declared_commands()
    assert {tuple(c[:2]) for c in commands} >= {("model", "download"), ("model", "sync"), ("model", "verify"),
                                                ("cluster", "wait"), ("gateway", "drain")}
    assert ["serve"] in commands and ["gateway"] in commands
    for args in commands:
        context = parse(args)
        # Every option given is one the command takes, with the value given.
        for flag, value in zip(args, args[1:] + [""]):
            if flag.startswith("--") and not value.startswith("--"):
                (parameter,) = [p for p in context.command.params if flag in p.opts]
                assert context.params[parameter.name] is not None, (args, flag)


def test_the_parse_is_strict():
    """The check above would catch a drifted option: the parse refuses what the CLI would."""
    with pytest.raises(TyperException, match="No such option: --no-such-option"):
        parse(["model", "verify", "/data/models/m", "--hash", "sample", "--no-such-option"])
    with pytest.raises(typer.BadParameter, match="sometimes"):
        parse(["model", "verify", "/data/models/m", "--hash", "sometimes"])
    with pytest.raises(TyperException, match="Missing parameter: nodes"):
        parse(["cluster", "wait", "--address", "10.0.0.1:6379"])


@pytest.mark.parametrize("stack_file", STACK_FILES, ids=[p.name for p in STACK_FILES])
def test_the_serve_spec_carries_the_plan_the_outputs_show(stack_file):
    """One rule, in the plan: every replica runs the TP x PP, address and port the program planned and reports."""
    run = run_program(stack_config(stack_file), stack=stack_file.stem.split(".")[1])
    assert run.error is None, run.error
    for model, replicas in run.outputs["plan"].items():
        for index, replica in enumerate(replicas):
            server = run.named(f"{stack_config(stack_file).get('clusterName', 'vllm')}-server-{model}-{index}-container")
            spec = ServeSpec.model_validate_json(env_of(server)["NODE_RUNTIME_SERVE_SPEC"])
            assert (spec.tensor_parallel_size, spec.pipeline_parallel_size) == (
                replica["tensorParallelSize"], replica["pipelineParallelSize"])
            assert f"http://{spec.host}:{spec.port}" == replica["url"]


def test_the_url_file_is_where_the_programs_health_gate_reads_it():
    from components.model_server import SERVING_URL_FILE as read_by_the_gate
    from node_runtime.serving.launcher import SERVING_URL_FILE

    assert SERVING_URL_FILE == read_by_the_gate == "/tmp/node-runtime-url"
