#!/usr/bin/env bash
# Fill images/wheelhouse with the runtime's dependencies (and the modelscope extra) as wheels for the
# vendor image's Python, so the DCU node image builds without any package index.
#   scripts/wheelhouse.sh PYTHON_VERSION [pip download options, e.g. --index-url URL]
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: scripts/wheelhouse.sh PYTHON_VERSION (e.g. 3.10) [pip options]}
shift
requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
# The runtime's own requirements, from its pyproject (one home for them).
python3 - images/runtime/pyproject.toml > "$requirements" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["modelscope"]))
PY
python3 -m pip download --dest images/wheelhouse --only-binary=:all: --implementation cp \
  --python-version "$version" --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  --disable-pip-version-check -r "$requirements" "$@"
ls images/wheelhouse/*.whl | wc -l | xargs echo "wheels in images/wheelhouse:"
