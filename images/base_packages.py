"""Our layer never changes the base image's Python packages.

    python3 base_packages.py freeze > base.txt     # name==version of every installed distribution
    pip install -c base.txt ...                     # the runtime, resolved against the base's own versions
    python3 base_packages.py check base.txt         # exit 1 naming every package that changed

Runs with the base image's own interpreter before anything of ours is installed: standard library
only. `pip freeze` is not used for the constraints because it writes `name @ file://...` for
packages a vendor installed from local wheels, which pip refuses as a constraint.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """{normalized name: version} of every distribution this interpreter sees."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(_normalized(name), dist.version)
    return found


def parse(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        name, sep, version = line.strip().partition("==")
        if sep:
            found[_normalized(name)] = version
    return found


def changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """One line per package of `before` whose version differs in `after` or that is gone."""
    return [
        f"{name}: {version} in the base image, {after.get(name, 'removed')} after installing the runtime"
        for name, version in sorted(before.items())
        if after.get(name) != version
    ]


def main(argv: list[str]) -> int:
    if argv[:1] == ["freeze"]:
        sys.stdout.write("".join(f"{name}=={version}\n" for name, version in sorted(installed().items())))
        return 0
    if len(argv) == 2 and argv[0] == "check":
        with open(argv[1]) as base:
            changed = changes(parse(base.read()), installed())
        if changed:
            sys.stderr.write("the runtime layer changed packages of the base image (it must add, never change):\n")
            sys.stderr.write("".join(f"  {line}\n" for line in changed))
            return 1
        return 0
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
