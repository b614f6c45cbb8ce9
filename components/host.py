"""Host: one machine — its Docker engine, the command connection to it, and a preflight check."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any, Sequence

import pulumi
import pulumi_command as command
import pulumi_docker as docker

from components.accelerators import PROFILES
from components.config import Node, StackConfig
from components.containers import container_name, ray_temp_dir, relay_key_path

LOCAL_DOCKER_HOST = "unix:///var/run/docker.sock"


def docker_host_url(user: str, node: Node, port: int) -> str:
    return f"ssh://{user}@{node.address}:{port}"


def preflight_script(
    config: StackConfig, node: Node, label: str, ports: Sequence[tuple[int, str]], ray_container: str
) -> str:
    """The guide's troubleshooting, run before anything is placed on the host; fails naming the fix."""
    where = shlex.quote(f"{label} ({node.address})")
    lines = [
        "set -u",
        f'fail() {{ echo "preflight failed on "{where}": $*" >&2; exit 1; }}',
        'docker info >/dev/null 2>&1 || fail "Docker is unreachable for user $(id -un):'
        ' start it (systemctl start docker) and add the user to the docker group"',
    ]
    for device in PROFILES[config.accelerator].preflight_devices:
        lines.append(
            f'ls {device} >/dev/null 2>&1 || fail "{device} is missing: install and load the DCU driver'
            ' (hy-smi must list the DCUs), or set accelerator: cpu"'
        )
    root = shlex.quote(config.model_root)
    lines += [
        # Docker refuses a bind mount whose source is missing: make every mounted directory here.
        f"mkdir -p {root} {shlex.quote(ray_temp_dir(config))} || fail \"cannot create modelRoot/dataRoot as $(id -un)\"",
        f"free_gb=$(df -Pk {root} | awk 'NR==2 {{print int($4/1048576)}}')",
        f'[ "$free_gb" -ge {config.min_free_disk_gb} ] || fail "only ${{free_gb}} GB free under'
        f' {config.model_root}, need {config.min_free_disk_gb}: free space or lower minFreeDiskGb"',
    ]
    if ports:
        # Ports held by this stack's own running containers are ours, not a conflict.
        checks = [
            f'[ -z "$(ss -Htln "sport = :{port}")" ] || fail "port {port} ({key}) is in use: '
            f'stop what listens there (ss -ltnp) or change {key}"'
            for port, key in ports
        ]
        lines += [
            'command -v ss >/dev/null || fail "ss (iproute2) is missing: install iproute2"',
            f"if ! docker inspect {shlex.quote(ray_container)} >/dev/null 2>&1; then",
            *[f"  {check}" for check in checks],
            "fi",
        ]
    lines.append(f"echo preflight ok on {where}")
    return "\n".join(lines)


def relay_key_script(key_path: str, comment: str) -> str:
    """Make the head's relay key once (kept across runs), print its public half."""
    key = shlex.quote(key_path)
    return "\n".join([
        "set -eu",
        f"mkdir -p {shlex.quote(key_path.rsplit('/', 1)[0])}",
        f"[ -f {key} ] || ssh-keygen -q -t ed25519 -N '' -C {shlex.quote(comment)} -f {key}",
        f"cat {key}.pub",
    ])


def authorize_key_script(public_key: str) -> str:
    line = shlex.quote(public_key.strip())
    return "\n".join([
        "set -eu",
        "mkdir -p ~/.ssh && chmod 700 ~/.ssh && touch ~/.ssh/authorized_keys",
        f"grep -qxF {line} ~/.ssh/authorized_keys || echo {line} >> ~/.ssh/authorized_keys",
    ])


def revoke_key_script(public_key: str) -> str:
    line = shlex.quote(public_key.strip())
    return (
        f"grep -vxF {line} ~/.ssh/authorized_keys > ~/.ssh/authorized_keys.tmp || true; "
        "mv ~/.ssh/authorized_keys.tmp ~/.ssh/authorized_keys"
    )


@dataclass
class HostArgs:
    config: StackConfig
    node: Node
    role: str  # "head" or "worker": which ports this host must have free
    ssh_private_key: pulumi.Input[str] | None = None
    # Workers: the head's relay public key to authorize (model and image distribution).
    relay_public_key: pulumi.Input[str] | None = None
    ports: list[tuple[int, str]] = field(default_factory=list)


class Host(pulumi.ComponentResource):
    """A node reachable by Docker and by commands; children of other components run through it."""

    provider: docker.Provider
    preflight: pulumi.Resource
    # What must have run before anything is placed here: preflight, and on workers the relay key.
    ready: list[pulumi.Resource]
    relay_public_key: pulumi.Output[str] | None

    def __init__(self, name: str, args: HostArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("vllm-dcu:index:Host", name, None, opts)
        config, node = args.config, args.node
        self.label = node.label
        self.node = node
        self._local = config.local_docker
        user = node.ssh_user or config.ssh_user
        port = node.ssh_port or config.ssh_port
        self._connection = None if self._local else command.remote.ConnectionArgs(
            host=node.address, port=port, user=user, private_key=args.ssh_private_key
        )
        self.provider = docker.Provider(
            f"{name}-docker",
            host=LOCAL_DOCKER_HOST if self._local else docker_host_url(user, node, port),
            ssh_opts=None if self._local else ["-o", "StrictHostKeyChecking=accept-new"],
            opts=pulumi.ResourceOptions(parent=self),
        )
        ray_container = container_name(config, "ray-head" if args.role == "head" else "ray-worker")
        self.preflight = self.run(
            f"{name}-preflight",
            preflight_script(config, node, self.label, args.ports, ray_container),
            parent=self,
        )
        self.ready = [self.preflight]
        self.relay_public_key = None
        if args.role == "head" and config.workers:
            key = self.run(
                f"{name}-relay-key",
                relay_key_script(relay_key_path(config), f"{config.cluster_name} relay ({pulumi.get_stack()})"),
                parent=self,
                depends_on=[self.preflight],
            )
            self.relay_public_key = key.stdout
        if args.relay_public_key is not None:
            public_key = pulumi.Output.from_input(args.relay_public_key)
            self.ready.append(self.run(
                f"{name}-relay-authorized",
                public_key.apply(authorize_key_script),
                delete=public_key.apply(revoke_key_script),
                parent=self,
                depends_on=[self.preflight],
            ))
        self.register_outputs({"address": node.address, "preflight": self.preflight.id})

    def run(
        self,
        name: str,
        create: pulumi.Input[str],
        *,
        parent: pulumi.Resource,
        delete: pulumi.Input[str] | None = None,
        stdin: pulumi.Input[str] | None = None,
        triggers: Sequence[Any] | None = None,
        depends_on: Sequence[pulumi.Resource] = (),
        timeout: int | None = None,
    ) -> command.remote.Command | command.local.Command:
        """A command on this machine: over ssh, or locally for the local stack."""
        limit = f"{timeout}s" if timeout else None
        opts = pulumi.ResourceOptions(
            parent=parent,
            depends_on=list(depends_on),
            custom_timeouts=pulumi.CustomTimeouts(create=limit, update=limit) if limit else None,
        )
        common: dict[str, Any] = dict(create=create, delete=delete, stdin=stdin, triggers=triggers)
        if self._local:
            return command.local.Command(name, interpreter=["/bin/sh", "-c"], **common, opts=opts)
        return command.remote.Command(name, connection=self._connection, **common, opts=opts)
