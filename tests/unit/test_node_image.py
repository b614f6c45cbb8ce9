"""The node image under Pulumi's mocks: built on the head from a relative context, the base checked
when pinned by image ID, and placed on the workers by the relay (the default), a stream, or a registry."""

import copy
import shlex

import pytest

from components.config import ConfigError, parse_stack_config
from components.image_distribution import base_check_script, build_args, image_tag, relay_container_spec
from components.plan import make_plan
from tests.support.pulumi_program import REPO, ProgramRun, run_program, stack_config

CONTAINER = "docker:index/container:Container"
IMAGE = "docker:index/image:Image"
REMOTE_IMAGE = "docker:index/remoteImage:RemoteImage"
WORKERS = ("dcu-worker-1", "dcu-worker-2")
LOADED_ID = "sha256:" + "5e" * 32


def _run(**changes) -> ProgramRun:
    config = copy.deepcopy(stack_config(REPO / "Pulumi.dev.yaml"))
    config.update(changes)
    run = run_program(config, stack="dev", secrets={"sshPrivateKey": "key"})
    assert run.error is None, run.error
    return run


@pytest.fixture(scope="module")
def relayed() -> ProgramRun:
    return _run()


def _script(resource) -> list[str]:
    """The words of a `bash -c` script's body."""
    return shlex.split(shlex.split(resource.inputs["create"])[-1])


def test_the_build_context_is_relative_to_the_project(relayed):
    build = relayed.named("vllm-image-build").inputs["build"]
    assert build["context"] == "images" and build["dockerfile"] == "images/dcu/Dockerfile"
    assert build["args"] == {"BASE_IMAGE": stack_config(REPO / "Pulumi.dev.yaml")["baseImage"]}


def test_the_relay_runs_on_the_head_from_the_node_image_on_its_loopback(relayed):
    relay = relayed.named("vllm-image-relay")
    assert relay.provider.startswith(relayed.named("vllm-dcu-head-docker").urn)
    assert relay.inputs["image"] == relayed.named("vllm-image-build").inputs["imageName"]
    command = relay.inputs["command"]
    assert command[:4] == ["python3", "-m", "node_runtime.imagerelay", "serve"]
    assert command[command.index("--host") + 1] == "127.0.0.1" and command[command.index("--port") + 1] == "5550"
    assert command[command.index("--root") + 1] == "/data/vllm-dcu/image-relay"
    assert relay.inputs["networkMode"] == "host" and relay.inputs["restart"] == "unless-stopped"
    assert [(m["source"], m["target"]) for m in relay.inputs["mounts"]] == [("/data/vllm-dcu", "/data/vllm-dcu")]


def test_the_head_pushes_to_the_relay_once_it_runs(relayed):
    push = relayed.named("vllm-image-push")
    assert push.inputs["connection"]["host"] == "10.0.0.11"
    assert relayed.depends_on(push, relayed.named("vllm-image-relay"))
    words = _script(push)
    image = relayed.named("vllm-image-build").inputs["imageName"]
    assert "docker" in words and "push" in words and image in words
    assert any(w.startswith("127.0.0.1:5550/node:dcu-") for w in words)
    assert push.inputs["triggers"] == [image]


@pytest.mark.parametrize("worker", WORKERS)
def test_each_worker_pulls_by_digest_through_a_tunnel_made_with_the_relay_key(relayed, worker):
    fetch = relayed.named(f"vllm-image-{worker}-fetch")
    reference = relayed.named("vllm-image-push")  # its stdout (the mocks') is the reference
    assert fetch.inputs["connection"]["host"] == "10.0.0.11", "the head opens the tunnel"
    words = _script(fetch)
    ssh = words[:words.index("||")]
    assert ssh[ssh.index("-i") + 1] == "/data/vllm-dcu/ssh/relay_ed25519"
    assert ssh[ssh.index("-R") + 1] == "127.0.0.1:5550:127.0.0.1:5550"
    assert "ExitOnForwardFailure=yes" in ssh and f"root@{'10.0.0.12' if worker.endswith('1') else '10.0.0.13'}" in ssh
    pull = shlex.split(ssh[-1])
    assert pull[:2] == ["docker", "pull"] and pull[2].startswith("127.0.0.1:5550/node@sha256:")
    assert fetch.inputs["triggers"] == [pull[2]]
    assert relayed.depends_on(fetch, reference)
    assert relayed.depends_on(fetch, relayed.named(f"vllm-{worker}-relay-authorized"))
    inspect = relayed.named(f"vllm-image-{worker}-id")
    assert inspect.provider is None and inspect.inputs["connection"]["host"] != "10.0.0.11"
    assert pull[2] in inspect.inputs["create"] and relayed.depends_on(inspect, fetch)


def test_every_host_knows_the_image_by_the_relay_reference(relayed):
    for host in ("dcu-head", *WORKERS):
        assert "127.0.0.1:5550/node@sha256:" in relayed.named(f"vllm-image-{host}-id").inputs["create"]
    ids = relayed.outputs["imageIds"]
    assert len(set(ids.values())) == 1


def test_stream_keeps_docker_save_and_load_with_the_relay_key():
    run = _run(imageTransfer="stream")
    names = {r.name for r in run.resources}
    assert "vllm-image-relay" not in names and "vllm-image-push" not in names
    for worker in WORKERS:
        stream = run.named(f"vllm-image-{worker}-stream")
        assert "docker save" in stream.inputs["create"] and "docker load" in stream.inputs["create"]
        assert "/data/vllm-dcu/ssh/relay_ed25519" in stream.inputs["create"]
        assert run.depends_on(stream, run.named(f"vllm-{worker}-relay-authorized"))


def test_nodes_pull_the_base_themselves_and_the_relay_claims_its_layers():
    run = _run(nodesPullBase=True)
    base = stack_config(REPO / "Pulumi.dev.yaml")["baseImage"]
    for host, address in (("dcu-head", "10.0.0.11"), ("dcu-worker-1", "10.0.0.12"), ("dcu-worker-2", "10.0.0.13")):
        pull = run.named(f"vllm-image-{host}-base-pull")
        assert pull.inputs["connection"]["host"] == address, "each node pulls from its registry itself"
        assert ["docker", "pull", base] == _script(pull)[:3]
    assert run.depends_on(run.named("vllm-image-build"), run.named("vllm-image-dcu-head-base-pull"))
    claim = run.named("vllm-image-claim-base")
    words = _script(claim)
    assert words[:5] == ["docker", "manifest", "inspect", "--verbose", base]
    assert words[words.index("node_runtime.imagerelay") + 1:] == ["claim-base", "--root", "/data/vllm-dcu/image-relay"]
    assert run.depends_on(run.named("vllm-image-push"), claim)
    for worker in WORKERS:
        assert run.depends_on(run.named(f"vllm-image-{worker}-fetch"), run.named(f"vllm-image-{worker}-base-pull"))
    assert not any(r.name.endswith("-base-pull") for r in _run().resources)


def test_a_registry_replaces_the_relay():
    run = _run(imageRegistry="registry.local:5000/vllm-dcu")
    names = {r.name for r in run.resources}
    assert not {"vllm-image-relay", "vllm-image-push"} & names
    assert not any(n.endswith(("-fetch", "-stream")) for n in names)
    assert {r.name for r in run.of_type(REMOTE_IMAGE)} == {f"vllm-image-{h}-pull" for h in ("dcu-head", *WORKERS)}
    assert run.named("vllm-image-build").inputs["skipPush"] is False


def test_a_single_node_stack_needs_no_relay():
    run = run_program(stack_config(REPO / "Pulumi.local.yaml"), stack="local")
    assert run.error is None, run.error
    names = {r.name for r in run.resources}
    assert not {"vllm-image-relay", "vllm-image-push"} & names
    image = run.named("vllm-image-build").inputs["imageName"]
    assert image in run.named("vllm-image-local-id").inputs["create"]


def test_a_base_pinned_by_image_id_is_checked_on_the_head_before_building():
    run = _run(baseImage="harbor.sourcefind.cn:5443/dcu/admin/base/vllm:0.9.2-dtk25.04", baseImageId=LOADED_ID)
    check = run.named("vllm-image-base")
    assert check.inputs["connection"]["host"] == "10.0.0.11"
    assert LOADED_ID in check.inputs["create"] and "docker image inspect" in check.inputs["create"]
    assert run.depends_on(run.named("vllm-image-build"), check)
    assert "vllm-image-base" not in {r.name for r in _run().resources}, "a digest needs no check: Docker verifies it"


def _plan(**changes):
    config = copy.deepcopy(stack_config(REPO / "Pulumi.dev.yaml"))
    config.update(changes)
    return make_plan(parse_stack_config(config))


def test_the_base_check_refuses_another_image_naming_the_key(tmp_path):
    script = base_check_script(_plan(baseImage="vendor/vllm:0.9.2", baseImageId=LOADED_ID))
    fake_docker = tmp_path / "docker"
    fake_docker.write_text("#!/bin/sh\necho sha256:" + "77" * 32 + "\n")
    fake_docker.chmod(0o755)
    import subprocess
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    found = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env)
    assert found.returncode == 1 and "baseImageId:" in found.stderr and "77" * 32 in found.stderr
    fake_docker.write_text(f"#!/bin/sh\necho {LOADED_ID}\n")
    assert subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env).stdout.strip() == LOADED_ID
    fake_docker.write_text("#!/bin/sh\nexit 1\n")
    missing = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=env)
    assert missing.returncode == 1 and "baseImage: vendor/vllm:0.9.2 is not on the head" in missing.stderr


def test_the_tag_follows_the_pins_and_the_index():
    tags = {image_tag(_plan()), image_tag(_plan(baseImage="vendor/vllm:1", baseImageId=LOADED_ID)),
            image_tag(_plan(baseImage="vendor/vllm:1", baseImageId="sha256:" + "6e" * 32)),
            image_tag(_plan(pipIndexUrl="http://pypi.site/simple"))}
    assert len(tags) == 4 and all(t.startswith("dcu-") for t in tags)


def test_the_package_index_reaches_the_build_only_when_configured():
    assert "PIP_INDEX_URL" not in build_args(_plan())
    assert build_args(_plan(pipIndexUrl="http://pypi.site/root/simple/"))["PIP_INDEX_URL"] == "http://pypi.site/root/simple"


def test_the_relay_binds_loopback_only_and_keeps_the_rest_of_the_node_apart():
    spec = relay_container_spec(_plan(imageRelayPort=6000))
    assert spec.network_mode == "host" and spec.devices == [] and not spec.privileged and spec.pid_mode is None
    assert spec.command[spec.command.index("--port") + 1] == "6000"


# --- model mirrors ----------------------------------------------------------------------------

def _download(run: ProgramRun, directory: str) -> list[str]:
    return shlex.split(run.named(f"vllm-model-{directory}-download").inputs["create"])


def test_hf_endpoint_reaches_the_download_of_hugging_face_models_only():
    run = _run(hfEndpoint="https://hf-mirror.com", modelscopeEndpoint="https://ms.mirror.site",
               models=[{"id": "meta-llama/Llama-3.1-8B-Instruct", "tensorParallelSize": 8},
                       {"id": "qwen/Qwen2.5-7B-Instruct", "source": "modelscope", "revision": "v1.0",
                        "tensorParallelSize": 8}])
    hf, ms = _download(run, "Llama-3.1-8B-Instruct"), _download(run, "Qwen2.5-7B-Instruct")
    assert hf[hf.index("--hf-endpoint") + 1] == "https://hf-mirror.com" and "--modelscope-endpoint" not in hf
    assert ms[ms.index("--modelscope-endpoint") + 1] == "https://ms.mirror.site" and "--hf-endpoint" not in ms


def test_no_endpoint_option_without_a_mirror(relayed):
    words = _download(relayed, "Llama-3.1-70B-Instruct")
    assert "--hf-endpoint" not in words and "--modelscope-endpoint" not in words


# --- the new keys' refusals -------------------------------------------------------------------

BAD = [
    ("baseImageId", {"baseImage": "vendor/vllm:1", "baseImageId": "5e" * 32}, "sha256:<64 hex>"),
    ("baseImageId", {"baseImage": "vendor/vllm:1", "baseImageId": "sha256:" + "0" * 64}, "all zeros"),
    ("baseImage", {"baseImage": "vendor/vllm:1@sha256:" + "ab" * 32, "baseImageId": LOADED_ID}, "name it by its tag"),
    ("baseImage", {"baseImage": "vendor/vllm:1"}, "baseImageId"),
    ("imageTransfer", {"imageTransfer": "rsync"}, "relay"),
    ("nodesPullBase", {"nodesPullBase": True, "baseImage": "vendor/vllm:1", "baseImageId": LOADED_ID}, "pin it by digest"),
    ("nodesPullBase", {"nodesPullBase": True, "imageRegistry": "registry.local:5000/vllm"}, "remove nodesPullBase"),
    ("nodesPullBase", {"nodesPullBase": True, "imageTransfer": "stream"}, "imageTransfer: relay"),
    ("imageRelayPort", {"imageRelayPort": 0}, "greater than or equal"),
    ("pipIndexUrl", {"pipIndexUrl": "pypi.site/simple"}, "http(s) URL"),
    ("hfEndpoint", {"hfEndpoint": "hf-mirror.com"}, "http(s) URL"),
    ("modelscopeEndpoint", {"modelscopeEndpoint": "ftp://ms.site"}, "http(s) URL"),
]


@pytest.mark.parametrize(("key", "changes", "fix"), BAD, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD)])
def test_each_new_key_refuses_a_bad_value_naming_itself(key, changes, fix):
    config = copy.deepcopy(stack_config(REPO / "Pulumi.dev.yaml"))
    config.update(changes)
    with pytest.raises(ConfigError) as refused:
        parse_stack_config(config)
    assert len(refused.value.problems) == 1, refused.value.problems
    assert refused.value.problems[0].startswith(f"vllm-dcu:{key}: ") and fix in refused.value.problems[0]


def test_a_tarball_base_pinned_by_image_id_is_accepted():
    config = parse_stack_config({**copy.deepcopy(stack_config(REPO / "Pulumi.dev.yaml")),
                                 "baseImage": "vendor/vllm:0.9.2", "baseImageId": LOADED_ID})
    assert (config.base_image, config.base_image_id) == ("vendor/vllm:0.9.2", LOADED_ID)
