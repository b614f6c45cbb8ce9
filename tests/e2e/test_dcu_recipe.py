"""images/dcu/Dockerfile built with no network at all, on stand-ins for the vendor's image: the
runtime comes from the wheelhouse scripts/wheelhouse.sh makes, the vendor's packages stay as they
are, and a runtime dependency newer than the vendor ships fails the build naming the package.

The stand-in (Debian's Python 3.11 with pip, setuptools, importable `ray` and `vllm` modules, and a
huggingface-hub the test picks) stands for the vendor image only in what the recipe touches: its
Python environment. The real vendor images are tens of GB behind a registry this machine cannot reach.
Needs root (a Docker engine) and PyPI (for the stand-in and the wheelhouse, as on a connected machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.node_image import CACHE_DIR, debian_base, site_ca_certs
from tests.support.docker_hosts import engine
from tests.support.pulumi_program import REPO

pytestmark = pytest.mark.slow

VENDOR_RECIPE = """\
FROM {debian}
ARG EXTRA_CA_CERTS=""
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-setuptools \\
      openssh-client ca-certificates && rm -rf /var/lib/apt/lists/* \\
 && if [ -n "$EXTRA_CA_CERTS" ]; then printf '%s\\n' "$EXTRA_CA_CERTS" > /usr/local/share/ca-certificates/site.crt \\
      && update-ca-certificates; fi \\
 && rm -f /usr/lib/python3*/EXTERNALLY-MANAGED \\
 && mkdir -p /usr/local/lib/python3.11/dist-packages/ray /usr/local/lib/python3.11/dist-packages/vllm \\
 && touch /usr/local/lib/python3.11/dist-packages/ray/__init__.py /usr/local/lib/python3.11/dist-packages/vllm/__init__.py
ARG HUB
RUN PIP_CERT=/etc/ssl/certs/ca-certificates.crt pip install --no-cache-dir "huggingface-hub==$HUB" "pydantic==2.9.2"
"""


@pytest.fixture(scope="module")
def builder():
    with engine("air-recipe", state_dir=CACHE_DIR / "air-recipe", keep_data=True) as started:
        yield started


def _vendor_base(builder, tmp_path: Path, hub: str) -> str:
    context = tmp_path / f"vendor-{hub}"
    context.mkdir()
    (context / "Dockerfile").write_text(VENDOR_RECIPE.format(debian=debian_base(builder)))
    tag = f"vendor/vllm:hub-{hub}"
    builder.docker("build", "--network=host", "--build-arg", f"HUB={hub}", "--build-arg",
                   f"EXTRA_CA_CERTS={site_ca_certs()}", "-t", tag, str(context),
                   env={**os.environ, "DOCKER_BUILDKIT": "0"}, timeout=900)
    return tag


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The recipes with a wheelhouse for the stand-in's Python (3.11), made as an operator would."""
    root = tmp_path_factory.mktemp("dcu-recipe")
    shutil.copytree(REPO / "images", root / "images", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.whl"))
    (root / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "wheelhouse.sh", root / "scripts")
    subprocess.run([str(root / "scripts" / "wheelhouse.sh"), "3.11"], check=True, capture_output=True, timeout=600)
    return root


def _build_offline(builder, project: Path, base: str, tag: str):
    return builder.docker("build", "--network=none", "-f", str(project / "images/dcu/Dockerfile"),
                          "--build-arg", f"BASE_IMAGE={base}", "-t", tag, str(project / "images"),
                          env={**os.environ, "DOCKER_BUILDKIT": "0"}, timeout=900, check=False)


def _packages(builder, image: str) -> dict[str, str]:
    """pip's own view of an image's packages, by normalized name."""
    listed = builder.docker("run", "--rm", "--network=none", image, "python3", "-m", "pip", "list", "--format=json",
                            "--disable-pip-version-check").stdout
    return {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(listed)}


def test_the_runtime_installs_offline_from_the_wheelhouse_changing_no_vendor_package(builder, project, tmp_path):
    # The vendor's own: transformers 4.x (vLLM 0.8.5-0.11) holds huggingface-hub below 1.0.
    base = _vendor_base(builder, tmp_path, "0.30.2")
    built = _build_offline(builder, project, base, "node:offline")
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    before, after = _packages(builder, base), _packages(builder, "node:offline")
    assert {name: after.get(name) for name in before} == before
    assert after["pydantic"] == "2.9.2" and after["huggingface-hub"] == "0.30.2"
    assert {"node-runtime", "modelscope", "typer", "blake3"} <= set(after)
    answered = builder.docker("run", "--rm", "--network=none", "node:offline", "node-runtime", "model", "--help")
    assert "download" in answered.stdout


def test_a_vendor_package_older_than_the_runtime_needs_fails_the_build_naming_it(builder, project, tmp_path):
    base = _vendor_base(builder, tmp_path, "0.29.3")  # below the runtime's floor (images/runtime/pyproject.toml)
    built = _build_offline(builder, project, base, "node:conflict")
    assert built.returncode != 0
    output = built.stdout + built.stderr
    assert "huggingface-hub" in output and "the vendor's packages are never changed" in output, output[-3000:]
