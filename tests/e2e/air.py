"""Simulated sites for the air-gapped distribution tests and bench/e2e: hosts with Docker engines on
their own subnet and prefix (so they run beside tests/e2e/cluster.py's cluster), a builder engine of
their own, the applier, and what the measurements read (bytes each host received, the relay's blobs).

Shared by tests/e2e/test_e2e_local_stack.py and bench/e2e/bench_e2e.py.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from tests.e2e.apply import Applier, Site
from tests.e2e.node_image import CACHE_DIR, ImageRecipe, build_image_tarball, pinned_base
from tests.support.docker_hosts import DockerCluster, docker_hosts, engine, engine_socket, remove_in_background
from tests.support.netns import SimulatedHost
from tests.support.pulumi_program import REPO

# The air-gapped tests' share of the machine: hosts named air*, addresses in 10.81.0.0/24, split so that
# the bench and the local stack's test can run at once.
PREFIX = "air"
SUBNET = "10.81.0.0/25"
BUILDER = "air-builder"


@dataclass
class AirSite:
    cluster: DockerCluster
    applier: Applier
    workdir: Path
    base_image: str
    base_tag: str
    project: Path
    image_build_seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def hosts(self) -> list[SimulatedHost]:
        return self.cluster.hosts

    def received(self, host: SimulatedHost) -> int:
        """Bytes `host` has received on its link (the root-side end of its veth sends them)."""
        return int(Path(f"/sys/class/net/{host.netns}b/statistics/tx_bytes").read_text())

    def on_host(self, host: SimulatedHost, root: str, path: str) -> Path:
        """Where `path` (under the private dir `root`) of `host` lies, seen from here."""
        return host.private_dirs[root] / Path(path).relative_to(root)

    def relay_layers(self, host: SimulatedHost, root: str, relay_dir: str) -> dict[str, dict[str, int]]:
        """{tag: {layer digest: size}} of every manifest the head's image relay holds."""
        store = self.on_host(host, root, relay_dir)
        found = {}
        for tag in (store / "tags").rglob("*"):
            if tag.is_file() and not tag.name.endswith(".partial"):
                digest = tag.read_text().strip().removeprefix("sha256:")
                manifest = json.loads((store / "blobs" / "sha256" / digest).read_text())
                found[tag.name] = {layer["digest"]: layer["size"] for layer in manifest["layers"]}
        return found


def project_copy(workdir: Path) -> Path:
    """The project's image recipes in a directory of their own, which a measurement may change
    (the shared working tree is never touched); the program's recipe paths are relative to it."""
    project = workdir / "project"
    shutil.copytree(REPO / "images", project / "images",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    return project


@contextlib.contextmanager
def simulated_site(count: int, *, private_dirs: Sequence[str], local: bool = False, log_name: str = "apply.log",
                   builder_name: str = BUILDER, prefix: str = PREFIX, subnet: str = SUBNET,
                   copy_recipes: bool = False) -> Iterator[AirSite]:
    """`count` hosts on SUBNET (their own sshd and Docker engine), the pinned Debian base on the
    builder, an applier that builds the recipes (`copy_recipes`: a copy of them, which the caller
    may change; it then points the program's recipe at it, components.image_distribution.PROJECT_DIR). `local`: one host that the
    applier treats as "this machine" of a localDocker stack (its engine is the local socket, local
    commands run inside it). Concurrent sites need their own builder, prefix and subnet (the node
    image tarballs they build are shared through the cache)."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir="/var/tmp"))
    try:
        project = project_copy(workdir) if copy_recipes else REPO
        with engine(builder_name, state_dir=CACHE_DIR / builder_name, keep_data=True) as builder:
            base_image, base_tag = pinned_base(builder, workdir)
            with docker_hosts(count, workdir=workdir, subnet=subnet, prefix=prefix,
                              private_dirs=[*private_dirs, "/root/.ssh"]) as cluster:
                site: AirSite | None = None

                def build_image(context: Path, dockerfile: Path, args: Mapping[str, str]) -> tuple[Path, str]:
                    recipe = ImageRecipe(context, dockerfile, dict(args), aliases={base_image: base_tag})
                    started = time.monotonic()
                    built = build_image_tarball(builder, recipe, log=workdir / "image-build.log")
                    site.image_build_seconds += time.monotonic() - started
                    return built

                head = cluster.hosts[0]
                apply_site = Site(
                    ssh_config=cluster.sim.ssh_config, workdir=workdir / "apply", build_image=build_image,
                    log=workdir / log_name, project=project,
                    local_engine=f"unix://{engine_socket(head.name)}" if local else None,
                    local_prefix=head.exec_prefix() if local else (),
                )
                site = AirSite(cluster, Applier(apply_site), workdir, base_image, base_tag, project)
                yield site
    finally:
        remove_in_background(workdir)
