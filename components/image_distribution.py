"""How the node image is built and reaches every host: the recipe and its tag, the base image check,
the image relay on the head and the scripts that push to it and pull from it. Pure: no Pulumi import
(components/node_image.py declares the resources).

Three ways, by stack config:
- `imageRegistry`: pushed there from the head, pulled by digest on every node (the registry's own
  layer reuse applies).
- relay (`imageTransfer: relay`, the default): the head serves the image on its loopback
  (node_runtime.imagerelay, from the node image itself); each worker pulls by digest through an ssh
  tunnel the head opens with its relay key to the worker's own 127.0.0.1 (Docker trusts a loopback
  registry without TLS). Only the layers a worker lacks move: the vendor base once, afterwards our
  runtime layer per change.
  With `nodesPullBase`, every node pulls the vendor base from its registry itself and the relay
  only claims the base's layers (their digests as that registry has them): our layer alone comes
  from the head.
- stream (`imageTransfer: stream`): `docker save | ssh worker docker load`, the whole image per
  change, for sites whose sshd forbids forwarding.
"""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path

from components.accelerators.profile import IMAGES_DIR
from components.plan import NodePlan, Plan
from components.specs import ContainerSpec

PROJECT_DIR = Path(__file__).resolve().parent.parent
# The build context, relative to the project: the same program previewed from another checkout
# declares the same image.
CONTEXT = IMAGES_DIR
# Shared by the recipes: what keeps our layer from changing the base's packages.
SHARED_FILES = ("base_packages.py",)
# Where the DCU recipe finds the runtime's dependencies when no package index is configured.
WHEELHOUSE = "wheelhouse"
# The relay's repository for the node image.
RELAY_REPOSITORY = "node"


def recipe_files(plan: Plan) -> list[Path]:
    """What the image is built from: the profile's Dockerfile, the shared build files, the runtime
    package and the wheelhouse (absolute paths)."""
    images = PROJECT_DIR / CONTEXT
    found = [PROJECT_DIR / plan.profile.recipe, *(images / name for name in SHARED_FILES)]
    for directory in ("runtime", WHEELHOUSE):
        found += sorted(
            p for p in (images / directory).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and ".egg-info" not in str(p)
        )
    return found


def build_args(plan: Plan) -> dict[str, str]:
    """The recipe's build arguments: the base, and the package index when one is configured."""
    config = plan.config
    args = {"BASE_IMAGE": config.base_image}
    if config.pip_index_url:
        args["PIP_INDEX_URL"] = config.pip_index_url
    return args


def image_tag(plan: Plan) -> str:
    """Changes exactly when the recipe, its arguments or the pinned base change, so containers follow the image."""
    digest = hashlib.sha256(repr(sorted(build_args(plan).items())).encode())
    digest.update((plan.config.base_image_id or "").encode())
    images = PROJECT_DIR / CONTEXT
    for path in recipe_files(plan):
        digest.update(str(path.relative_to(images)).encode() + b"\0" + path.read_bytes())
    return f"{plan.profile.name}-{digest.hexdigest()[:16]}"


def image_repository(plan: Plan) -> str:
    return plan.config.image_registry or f"{plan.config.cluster_name}-node"


def uses_relay(plan: Plan) -> bool:
    config = plan.config
    return bool(plan.workers) and config.image_registry is None and config.image_transfer == "relay"


def _bash(script: str) -> str:
    return shlex.join(["bash", "-euo", "pipefail", "-c", script])


def base_check_script(plan: Plan) -> str | None:
    """On the head, before building: the base pinned by image ID is the one the head holds.
    (A base pinned by digest needs no check: Docker verifies the digest when it pulls.)"""
    config = plan.config
    if config.base_image_id is None:
        return None
    ref, wanted = shlex.quote(config.base_image), shlex.quote(config.base_image_id)
    return _bash("\n".join([
        f"found=$(docker image inspect --format '{{{{.Id}}}}' {ref} 2>/dev/null) || {{",
        f"  echo 'baseImage: {config.base_image} is not on the head; docker load its tarball there"
        f" (baseImageId pins it by image ID, so it is never pulled)' >&2; exit 1; }}",
        f'if [ "$found" != {wanted} ]; then',
        f"  echo \"baseImageId: the head's {config.base_image} is $found, not {config.base_image_id}:"
        " load the tarball the stack pins, or set baseImageId to the image you mean\" >&2; exit 1",
        "fi",
        'echo "$found"',
    ]))


def relay_address(plan: Plan) -> str:
    return f"127.0.0.1:{plan.config.image_relay_port}"


def relay_dir(plan: Plan) -> str:
    return f"{plan.config.data_root}/image-relay"


def relay_container_spec(plan: Plan) -> ContainerSpec:
    """The image relay on the head: loopback only, its blobs under dataRoot (kept across runs, so a
    re-push sends only new layers)."""
    config = plan.config
    return ContainerSpec(
        name=plan.container_name("image-relay"),
        command=["python3", "-m", "node_runtime.imagerelay", "serve", "--host", "127.0.0.1",
                 "--port", str(config.image_relay_port), "--root", relay_dir(plan)],
        envs={}, devices=[], group_adds=[], capabilities=[], security_opts=[],
        # dataRoot exists on every host (the preflight makes it); the relay's own directory below it does not yet.
        bind_mounts=[(config.data_root, False)],
        shm_size_mb=64, ipc_mode="private", pid_mode=None,
    )


def base_pull_script(plan: Plan, node: NodePlan) -> str:
    """On a node, with nodesPullBase: the pinned base from its registry (Docker checks the digest)."""
    ref = shlex.quote(plan.config.base_image)
    return _bash(f"docker pull {ref} >/dev/null || {{ echo 'nodesPullBase: {node.where} could not pull baseImage "
                 f"{plan.config.base_image} from its registry (is it reachable from there, and logged in?)' >&2; exit 1; }}")


def claim_base_script(plan: Plan, image: str) -> str:
    """On the head, with nodesPullBase: tell the relay the base's layers as its registry has them, so the
    push names them instead of sending them (node_runtime.imagerelay claim-base)."""
    config = plan.config
    claim = ["docker", "run", "--rm", "-i", "-v", f"{config.data_root}:{config.data_root}", image,
             "python3", "-m", "node_runtime.imagerelay", "claim-base", "--root", relay_dir(plan)]
    return _bash(f"docker manifest inspect --verbose {shlex.quote(config.base_image)} | {shlex.join(claim)}")


def push_script(plan: Plan, image: str, tag: str) -> str:
    """On the head: push `image` to the relay; prints the reference every host then knows it by
    (relay/repository@digest). Docker sends only the layers the relay lacks."""
    address, port = relay_address(plan), plan.config.image_relay_port
    target = f"{address}/{RELAY_REPOSITORY}:{tag}"
    return _bash("\n".join([
        # The relay container was just (re)started: give it a moment to listen.
        "for _ in $(seq 60); do (exec 3<>/dev/tcp/127.0.0.1/" + str(port) + ") 2>/dev/null && break; sleep 0.5; done",
        f"(exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null || {{ echo 'the image relay does not listen on {address}: "
        f"docker logs {plan.container_name('image-relay')} on the head (is imageRelayPort {port} taken?)' >&2; exit 1; }}",
        f"docker tag {shlex.quote(image)} {shlex.quote(target)}",
        f"docker push {shlex.quote(target)} >&2",
        f"docker image inspect --format '{{{{range .RepoDigests}}}}{{{{println .}}}}{{{{end}}}}' {shlex.quote(target)}"
        f" | grep -m1 {shlex.quote('^' + address + '/' + RELAY_REPOSITORY + '@')}",
    ]))


def _relay_ssh(plan: Plan, node: NodePlan, *extra: str) -> list[str]:
    return ["ssh", "-i", plan.relay_key_path, "-p", str(node.ssh.port),
            "-o", "StrictHostKeyChecking=accept-new", "-o", "BatchMode=yes", *extra, f"{node.ssh.user}@{node.ssh.host}"]


def fetch_script(plan: Plan, node: NodePlan, reference: str) -> str:
    """On the head: open a tunnel from the worker's 127.0.0.1:<imageRelayPort> to the relay (with the
    head's relay key) and pull `reference` there by digest, only the layers the worker lacks."""
    port = plan.config.image_relay_port
    forward = f"127.0.0.1:{port}:127.0.0.1:{port}"
    ssh = _relay_ssh(plan, node, "-o", "ExitOnForwardFailure=yes", "-R", forward)
    pull = f"docker pull {shlex.quote(reference)} >/dev/null"
    return _bash(
        f"{shlex.join(ssh)} {shlex.quote(pull)} || {{ echo 'pulling the node image on {node.where} through the "
        f"relay tunnel failed (its sshd must allow TCP forwarding and 127.0.0.1:{port} must be free there: "
        f"imageRelayPort; or set imageTransfer: stream)' >&2; exit 1; }}"
    )


def stream_image_script(plan: Plan, node: NodePlan, reference: str) -> str:
    """On the head: `docker save | ssh worker docker load` with the head's relay key."""
    ssh = shlex.join([*_relay_ssh(plan, node), "docker load"])
    return _bash(f"docker save {shlex.quote(reference)} | {ssh}")


def inspect_id_script(reference: str) -> str:
    return f"docker image inspect --format '{{{{.Id}}}}' {shlex.quote(reference)}"
