"""NodeImage: the same node image on every host — pushed to a registry, or built on the head and
streamed to each worker — with the image ID each host actually holds."""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import dataclass
from pathlib import Path

import pulumi
import pulumi_docker as docker

from components.host import Host
from components.plan import NodePlan, Plan

PROJECT_DIR = Path(__file__).resolve().parent.parent
IMAGES_DIR = PROJECT_DIR / "images"


def recipe_files(plan: Plan) -> list[Path]:
    """What the image is built from: the profile's Dockerfile and the runtime package."""
    runtime = sorted(
        p for p in (IMAGES_DIR / "runtime").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and ".egg-info" not in str(p)
    )
    return [PROJECT_DIR / plan.profile.recipe, *runtime]


def image_tag(plan: Plan) -> str:
    """Changes exactly when the recipe or the base image changes, so containers follow the image."""
    digest = hashlib.sha256(plan.config.base_image.encode())
    for path in recipe_files(plan):
        digest.update(str(path.relative_to(IMAGES_DIR)).encode() + b"\0" + path.read_bytes())
    return f"{plan.profile.name}-{digest.hexdigest()[:16]}"


def image_repository(plan: Plan) -> str:
    return plan.config.image_registry or f"{plan.config.cluster_name}-node"


def stream_image_script(plan: Plan, reference: str, node: NodePlan) -> str:
    """On the head: `docker save | ssh worker docker load` with the head's relay key."""
    ssh = shlex.join([
        "ssh", "-i", plan.relay_key_path, "-p", str(node.ssh.port),
        "-o", "StrictHostKeyChecking=accept-new", "-o", "BatchMode=yes", f"{node.ssh.user}@{node.ssh.host}",
        "docker load",
    ])
    return shlex.join(["bash", "-euo", "pipefail", "-c", f"docker save {shlex.quote(reference)} | {ssh}"])


def inspect_id_script(reference: str) -> str:
    return f"docker image inspect --format '{{{{.Id}}}}' {shlex.quote(reference)}"


@dataclass
class NodeImageArgs:
    plan: Plan
    head: Host
    workers: list[Host]


class NodeImage(pulumi.ComponentResource):
    """Builds the node image once and places it on every host; `image_ids` maps host label → image ID."""

    image_ids: dict[str, pulumi.Output[str]]

    def __init__(self, name: str, args: NodeImageArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("vllm-dcu:index:NodeImage", name, None, opts)
        plan = args.plan
        config = plan.config
        reference = f"{image_repository(plan)}:{image_tag(plan)}"
        pushed = config.image_registry is not None
        built = docker.Image(
            f"{name}-build",
            image_name=reference,
            build=docker.DockerBuildArgs(
                context=str(IMAGES_DIR),
                dockerfile=str(PROJECT_DIR / plan.profile.recipe),
                args={"BASE_IMAGE": config.base_image},
                platform="linux/amd64",
            ),
            skip_push=not pushed,
            opts=pulumi.ResourceOptions(
                parent=self, provider=args.head.provider, depends_on=[args.head.preflight]
            ),
        )
        self.reference = built.repo_digest if pushed else built.image_name
        self.image_ids = {}
        for host in [args.head, *args.workers]:
            placed: list[pulumi.Resource] = [built, *host.ready]
            if pushed:
                placed.append(docker.RemoteImage(
                    f"{name}-{host.label}-pull",
                    name=built.repo_digest,
                    keep_locally=True,
                    opts=pulumi.ResourceOptions(parent=self, provider=host.provider),
                ))
            elif host is not args.head:
                placed.append(args.head.command(
                    f"{name}-{host.label}-stream",
                    built.image_name.apply(lambda ref, node=host.node: stream_image_script(plan, ref, node)),
                    triggers=[built.image_name],
                    parent=self,
                    depends_on=placed,
                ))
            inspected = host.command(
                f"{name}-{host.label}-id",
                self.reference.apply(inspect_id_script),
                triggers=[self.reference],
                parent=self,
                depends_on=placed,
            )
            self.image_ids[host.label] = inspected.stdout.apply(str.strip)
        self.register_outputs({"reference": self.reference, "imageIds": self.image_ids})
