"""ModelStore: one model directory — downloaded on the head, synced to every worker at the same
absolute path, verified on every node. Model files are never deleted by this program."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

import pulumi

from components.config import Model, StackConfig
from components.containers import relay_key_path, runtime_run
from components.host import Host

TOKEN_ENV = {"huggingface": "HF_TOKEN", "modelscope": "MODELSCOPE_API_TOKEN"}


def model_path(config: StackConfig, model: Model) -> str:
    return f"{config.model_root}/{model.directory}"


def download_script(config: StackConfig, model: Model, image: str, *, with_token: bool) -> str:
    args = [
        "model", "download", "--source", model.source, "--repo-id", model.id,
        "--revision", model.revision, "--model-root", config.model_root, "--name", model.directory,
    ]
    for pattern in model.allow_patterns:
        args += ["--allow", pattern]
    for pattern in model.ignore_patterns:
        args += ["--ignore", pattern]
    mounts = [config.model_root]
    if model.local_path:
        args += ["--local-dir", model.local_path]
        mounts.append(model.local_path)
    token = TOKEN_ENV.get(model.source) if with_token else None
    run = runtime_run(config, image, args, mounts=mounts, env_names=(token,) if token else ())
    # The token arrives on stdin, so it never appears on a command line.
    return f'{token}="$(cat)"; export {token}; exec {run}' if token else f"exec {run}"


def sync_script(config: StackConfig, model: Model, image: str, workers: list[Host]) -> str:
    key = relay_key_path(config)
    args = ["model", "sync", model_path(config, model), "--identity", key]
    for host in workers:
        node = host.node
        args += ["--node", f"{node.ssh_user or config.ssh_user}@{node.address}:{node.ssh_port or config.ssh_port}"]
    # Runs on each worker; the relay's forwarded agent goes into the container, expanded there,
    # so the next hop authenticates without the key ever leaving the head.
    receiver = (
        'docker run --rm -i --network host -v "$SSH_AUTH_SOCK:$SSH_AUTH_SOCK" -e SSH_AUTH_SOCK '
        + shlex.join(["-v", f"{config.model_root}:{config.model_root}", image])
    )
    args += ["--remote-exec", receiver]
    key_dir = key.rsplit("/", 1)[0]
    return "exec " + runtime_run(config, image, args, mounts=[config.model_root, key_dir])


def verify_script(config: StackConfig, model: Model, image: str) -> str:
    args = ["model", "verify", model_path(config, model), "--hash", "sample"]
    return "exec " + runtime_run(config, image, args, mounts=[config.model_root])


@dataclass
class ModelStoreArgs:
    config: StackConfig
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
        config, model, head = args.config, args.model, args.head
        identity = [model.source, model.id, model.revision, model.local_path or ""]
        head_image = pulumi.Output.from_input(args.image_ids[head.label])
        with_token = args.token is not None and model.source in TOKEN_ENV
        download = head.run(
            f"{name}-download",
            head_image.apply(lambda image: download_script(config, model, image, with_token=with_token)),
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
            placed = head.run(
                f"{name}-sync",
                images.apply(lambda ids: sync_script(config, model, ids[0], args.workers)),
                triggers=[download.id],
                timeout=config.timeouts.model_download,
                parent=self,
                depends_on=[download, *(r for w in args.workers for r in w.ready)],
            )
        self.verified = [
            host.run(
                f"{name}-{host.label}-verify",
                pulumi.Output.from_input(args.image_ids[host.label]).apply(
                    lambda image: verify_script(config, model, image)
                ),
                triggers=[placed.id],
                parent=self,
                depends_on=[placed],
            )
            for host in [head, *args.workers]
        ]
        self.path = model_path(config, model)
        self.register_outputs({"path": self.path})
