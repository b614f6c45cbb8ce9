"""The resource graph a program run registers, as the Pulumi engine would name it: URNs with the
full chain of parent types, alias URNs resolved (declared and inherited from parents), inputs,
parents, dependencies and providers. Two graphs compare equal when an existing stack would see no
change going from one to the other.

    python -m tests.support.graph DIR     # write DIR/graph-<stack>.json for the stack files
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any
from unittest import mock

from tests.support.pulumi_program import REPO, ProgramRun, RecordedResource, run_program, stack_config

STACK = "pulumi:pulumi:Stack"
# What the snapshots run the stack files with: every secret set, so secret plumbing is recorded too.
SECRETS = {"sshPrivateKey": "-----BEGIN OPENSSH PRIVATE KEY-----\nkey\n", "apiKey": "sk-test-key",
           "hfToken": "hf_secret_token"}
STACKS = ("dev", "local")
# The node image's tag is a hash of its recipe, which changes with every edit of the runtime package
# (tested on its own); graphs are compared for the same recipe.
FIXED_IMAGE_TAG = "recipe"


def _split(urn: str) -> tuple[str, str, str]:
    """(prefix 'urn:pulumi:stack::project', qualified type, name) of a URN."""
    stack, project, qualified, name = urn.removeprefix("urn:pulumi:").split("::", 3)
    return f"urn:pulumi:{stack}::{project}", qualified, name


class EngineGraph:
    """Engine URNs and alias URNs for a recorded run (Pulumi's mocks only prefix the parent's own type)."""

    def __init__(self, run: ProgramRun):
        self.run = run
        self._by_mock = {r.urn: r for r in run.resources}
        self._urns: dict[str, str] = {}

    def _qualified(self, resource: RecordedResource) -> str:
        parent = self._by_mock.get(resource.parent) if resource.parent else None
        if parent is None or parent.type == STACK:
            return resource.type
        return _split(self.urn(parent))[1] + "$" + resource.type

    def urn(self, resource: RecordedResource) -> str:
        if resource.urn not in self._urns:
            prefix = _split(resource.urn)[0]
            self._urns[resource.urn] = f"{prefix}::{self._qualified(resource)}::{resource.name}"
        return self._urns[resource.urn]

    def urn_of(self, reference: str | None) -> str | None:
        """The engine URN of a recorded URN or provider reference ("urn::id": the mocks' ids do not count)."""
        if not reference:
            return None
        mock_urn = "::".join(reference.split("::")[:4])
        resource = self._by_mock.get(mock_urn)
        return self.urn(resource) if resource else mock_urn

    def alias_urns(self, resource: RecordedResource) -> set[str]:
        """The URNs this resource may have had: its declared aliases and those inherited from its parents."""
        prefix, qualified, name = _split(self.urn(resource))
        own_type = resource.type
        found: set[str] = set()
        for alias in resource.aliases:
            alias_name = alias["name"] or name
            alias_type = alias["type"] or own_type
            if alias["noParent"]:
                parent_qualified = ""
            elif alias["parentUrn"]:
                parent = self._by_mock.get(alias["parentUrn"])
                parent_qualified = _split(self.urn(parent))[1] if parent and parent.type != STACK else ""
            else:
                parent_qualified = qualified.rsplit("$", 1)[0] if "$" in qualified else ""
            full = f"{parent_qualified}${alias_type}" if parent_qualified else alias_type
            found.add(f"{prefix}::{full}::{alias_name}")
        parent = self._by_mock.get(resource.parent) if resource.parent else None
        if parent is not None and parent.type != STACK:
            for parent_alias in self.alias_urns(parent):
                _, parent_alias_type, parent_alias_name = _split(parent_alias)
                # The engine renames a child named after its parent along with the parent.
                child_name = (parent_alias_name + name.removeprefix(parent.name)) if name.startswith(parent.name) else name
                found.add(f"{prefix}::{parent_alias_type}${own_type}::{child_name}")
        return found


def graph(run: ProgramRun, repo: Path = REPO) -> dict[str, dict[str, Any]]:
    """{engine URN: {type, aliases, inputs, parent, dependencies, provider, secret_paths, retain_on_delete}},
    with the checkout's own path written as <repo> (the same program in another checkout is the same graph)."""
    engine = EngineGraph(run)
    nodes = {
        engine.urn(r): {
            "type": r.type,
            "aliases": sorted(engine.alias_urns(r)),
            "inputs": r.inputs,
            "parent": engine.urn_of(r.parent),
            "dependencies": sorted(engine.urn_of(d) for d in r.dependencies),
            "provider": engine.urn_of(r.provider),
            "secret_paths": sorted(r.secret_paths),
            "retain_on_delete": r.retain_on_delete,
        }
        for r in run.resources
    }
    return json.loads(json.dumps(nodes).replace(str(repo), "<repo>"))


def differences(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> list[str]:
    """What an existing stack at `before` would see change going to `after`: one line per difference.

    A resource is the same one when its URN or one of its aliases is a URN of `before`; its parent may
    then differ (that is what the alias is for), its inputs, dependencies and provider may not.
    Components registered anew (no URN of `before`) are listed: they hold no state, but say so.
    """
    found: list[str] = []
    renamed: dict[str, str] = {}
    for urn, node in after.items():
        matches = [u for u in [urn, *node["aliases"]] if u in before]
        if len(matches) != 1:
            found.append(f"{'new' if not matches else 'ambiguous'} {node['type']}: {urn}")
            continue
        renamed[urn] = matches[0]
    found += [f"gone {before[urn]['type']}: {urn}" for urn in sorted(set(before) - set(renamed.values()))]
    old = lambda urn: renamed.get(urn, urn)  # noqa: E731
    for urn, old_urn in renamed.items():
        now, then = after[urn], before[old_urn]
        name = urn.rsplit("::", 1)[-1]
        for key in sorted(set(now["inputs"]) | set(then["inputs"])):
            if now["inputs"].get(key) != then["inputs"].get(key):
                found.append(f"input {name}.{key}")
        for key in ("type", "secret_paths", "retain_on_delete"):
            if now[key] != then[key]:
                found.append(f"{key} {name}")
        if sorted(old(d) for d in now["dependencies"]) != then["dependencies"]:
            found.append(f"dependencies {name}")
        if old(now["provider"]) != then["provider"]:
            found.append(f"provider {name}")
    return found


def stack_graph(stack: str) -> dict[str, dict[str, Any]]:
    with mock.patch("components.node_image.image_tag", lambda *args: FIXED_IMAGE_TAG):
        run = run_program(stack_config(REPO / f"Pulumi.{stack}.yaml"), stack=stack, secrets=SECRETS)
    if run.error is not None:
        raise run.error
    return graph(run)


def main(directory: str) -> None:
    for stack in STACKS:
        path = Path(directory) / f"graph-{stack}.json"
        path.write_text(json.dumps(stack_graph(stack), indent=1, sort_keys=True) + "\n")
        print(path)


if __name__ == "__main__":
    main(sys.argv[1])
