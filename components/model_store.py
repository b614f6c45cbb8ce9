"""ModelStore: one model directory — downloaded on the head, synced to every worker at the same
absolute path, verified on every node. Model files are never deleted by this program."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

import pulumi

from components.host import Host
from components.plan import NodePlan, Plan
from components.schema import Model

TOKEN_ENV = {"huggingface": "HF_TOKEN", "modelscope": "MODELSCOPE_API_TOKEN"}


def runtime_run(image: str, args: list[str], *, mounts: list[str], env_names: tuple[str, ...] = ()) -> str:
    """A one-off `docker run` of the node image on a host, for the model store's steps.

    Secrets reach it only by name (`-e NAME` copies the caller's variable), never by value.
    """
    parts = ["docker", "run", "--rm", "-i", "--network", "host"]
    for path in mounts:
        parts += ["-v", f"{path}:{path}"]
    for name in env_names:
        parts += ["-e", name]
    return shlex.join([*parts, image, "node-runtime", *args])


def download_script(plan: Plan, model: Model, image: str, *, with_token: bool) -> str:
    config = plan.config
    args = [
        "model", "download", "--source", model.source, "--repo-id", model.id,
        "--revision", model.revision, "--model-root", config.model_root, "--name", model.directory,
    ]
    for pattern in model.allow_patterns:
        args += ["--allow", pattern]
    for pattern in model.ignore_patterns:
        args += ["--ignore", pattern]
    # A mirror for the model's own hub (each option applies to its own source only).
    endpoint = {"huggingface": ("--hf-endpoint", config.hf_endpoint),
                "modelscope": ("--modelscope-endpoint", config.modelscope_endpoint)}.get(model.source)
    if endpoint and endpoint[1]:
        args += list(endpoint)
    mounts = [config.model_root]
    if model.local_path:
        args += ["--local-dir", model.local_path]
        mounts.append(model.local_path)
    token = TOKEN_ENV.get(model.source) if with_token else None
    run = runtime_run(image, args, mounts=mounts, env_names=(token,) if token else ())
    # The token arrives on stdin, so it never appears on a command line.
    return f'{token}="$(cat)"; export {token}; exec {run}' if token else f"exec {run}"


def sync_script(plan: Plan, model: Model, image: str, workers: list[NodePlan]) -> str:
    config = plan.config
    key = plan.relay_key_path
    args = ["model", "sync", plan.model_path(model), "--identity", key]
    for node in workers:
        args += ["--node", str(node.ssh)]
    # Runs on each worker; the relay's forwarded agent goes into the container, expanded there,
    # so the next hop authenticates without the key ever leaving the head.
    receiver = (
        'docker run --rm -i --network host -v "$SSH_AUTH_SOCK:$SSH_AUTH_SOCK" -e SSH_AUTH_SOCK '
        + shlex.join(["-v", f"{config.model_root}:{config.model_root}", image])
    )
    args += ["--remote-exec", receiver]
    key_dir = key.rsplit("/", 1)[0]
    return "exec " + runtime_run(image, args, mounts=[config.model_root, key_dir])


def verify_script(plan: Plan, model: Model, image: str) -> str:
    args = ["model", "verify", plan.model_path(model), "--hash", "sample"]
    return "exec " + runtime_run(image, args, mounts=[plan.config.model_root])


@dataclass
class ModelStoreArgs:
    plan: Plan
    model: Model
    head: Host
    workers: list[Host]
    image_ids: dict[str, pulumi.Input[str]]
    token: pulumi.Input[str] | None = None


class ModelStore(pulumi.ComponentResource):
    """`verified` lists the per-node checks a server must wait for."""

    verified: list[pulumi.Resource]

    def __init__(self, name: str, args: ModelStoreArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("vllm-dcu:index:ModelStore", name, None, opts)
        plan, model, head = args.plan, args.model, args.head
        config = plan.config
        identity = [model.source, model.id, model.revision, model.local_path or ""]
        head_image = pulumi.Output.from_input(args.image_ids[head.label])
        with_token = args.token is not None and model.source in TOKEN_ENV
        download = head.command(
            f"{name}-download",
            head_image.apply(lambda image: download_script(plan, model, image, with_token=with_token)),
            stdin=args.token if with_token else None,
            triggers=identity,
            timeout=config.timeouts.model_download,
            parent=self,
            depends_on=head.ready,
        )
        placed: pulumi.Resource = download
        if args.workers:
            # The receivers run the node image on each worker: wait until every worker holds it.
            images = pulumi.Output.all(head_image, *(args.image_ids[w.label] for w in args.workers))
            placed = head.command(
                f"{name}-sync",
                images.apply(lambda ids: sync_script(plan, model, ids[0], [w.node for w in args.workers])),
                triggers=[download.id],
                timeout=config.timeouts.model_download,
                parent=self,
                depends_on=[download, *(r for w in args.workers for r in w.ready)],
            )
        self.verified = [
            host.command(
                f"{name}-{host.label}-verify",
                pulumi.Output.from_input(args.image_ids[host.label]).apply(
                    lambda image: verify_script(plan, model, image)
                ),
                triggers=[placed.id],
                parent=self,
                depends_on=[placed],
            )
            for host in [head, *args.workers]
        ]
        self.path = plan.model_path(model)
        self.register_outputs({"path": self.path})
