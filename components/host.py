"""Host: one machine — its Docker engine, the command connection to it, a preflight check, the facts
its containers adapt to — and the one place where a container or a command is declared on a machine."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any, Sequence

import pulumi
import pulumi_command as command
import pulumi_docker as docker

from components.plan import NodePlan, Plan
from components.preflight import HostFacts, facts_script, parse_facts, preflight_script
from components.specs import ContainerSpec

LOCAL_DOCKER_HOST = "unix:///var/run/docker.sock"


def relay_key_script(key_path: str, comment: str) -> str:
    """Make the head's relay key once (kept across runs), print its public half."""
    key = shlex.quote(key_path)
    return "\n".join([
        "set -eu",
        f"mkdir -p {shlex.quote(key_path.rsplit('/', 1)[0])}",
        f"[ -f {key} ] || ssh-keygen -q -t ed25519 -N '' -C {shlex.quote(comment)} -f {key}",
        f"cat {key}.pub",
    ])


def internal_key_script(key_path: str) -> str:
    """Make the replicas' internal key once (kept across runs), print it (a secret output, never logged)."""
    key = shlex.quote(key_path)
    return "\n".join([
        "set -eu",
        "umask 077",
        f"mkdir -p {shlex.quote(key_path.rsplit('/', 1)[0])}",
        f"[ -s {key} ] || od -An -N32 -tx1 /dev/urandom | tr -d ' \\n' > {key}",
        f"cat {key}",
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
    plan: Plan
    node: NodePlan
    ssh_private_key: pulumi.Input[str] | None = None
    # Workers: the head's relay public key to authorize (model and image distribution).
    relay_public_key: pulumi.Input[str] | None = None


class Host(pulumi.ComponentResource):
    """A node reachable by Docker and by commands; other components place their children through it."""

    provider: docker.Provider
    preflight: pulumi.Resource
    # What its containers adapt to: the optional devices present, the interface holding its cluster address.
    facts: pulumi.Output[HostFacts]
    # What must have run before anything is placed here: preflight, and on workers the relay key.
    ready: list[pulumi.Resource]
    relay_public_key: pulumi.Output[str] | None
    # The head only: the key the replicas require and the gateway sends.
    internal_key: pulumi.Output[str] | None

    def __init__(self, name: str, args: HostArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("vllm-dcu:index:Host", name, None, opts)
        plan, node = args.plan, args.node
        self.node = node
        self.label = node.label
        self._local = plan.config.local_docker
        self._connection = None if self._local else command.remote.ConnectionArgs(
            host=node.ssh.host, port=node.ssh.port, user=node.ssh.user, private_key=args.ssh_private_key
        )
        self.provider = docker.Provider(
            f"{name}-docker",
            host=LOCAL_DOCKER_HOST if self._local else node.ssh.url,
            ssh_opts=None if self._local else ["-o", "StrictHostKeyChecking=accept-new"],
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.preflight = self.command(f"{name}-preflight", preflight_script(plan, node), parent=self)
        # A container declared from the facts waits for them through its inputs.
        self.facts = self.command(f"{name}-facts", facts_script(plan, node), parent=self).stdout.apply(parse_facts)
        self.ready = [self.preflight]
        self.relay_public_key = self.internal_key = None
        if node.role == "head":
            self.internal_key = self.command(
                f"{name}-internal-key",
                internal_key_script(plan.internal_key_path),
                parent=self,
                depends_on=[self.preflight],
                secret_output=True,
            ).stdout
        if node.role == "head" and plan.workers:
            key = self.command(
                f"{name}-relay-key",
                relay_key_script(plan.relay_key_path, f"{plan.config.cluster_name} relay ({pulumi.get_stack()})"),
                parent=self,
                depends_on=[self.preflight],
            )
            self.relay_public_key = key.stdout
        if args.relay_public_key is not None:
            public_key = pulumi.Output.from_input(args.relay_public_key)
            self.ready.append(self.command(
                f"{name}-relay-authorized",
                public_key.apply(authorize_key_script),
                delete=public_key.apply(revoke_key_script),
                parent=self,
                depends_on=[self.preflight],
            ))
        self.summary = {"name": node.label, "address": node.address, "clusterAddress": node.cluster_address,
                        "gpus": node.gpus, "role": node.role,
                        # As the facts step read them: the interface holding clusterAddress, the DCU driver's version.
                        "interface": self.facts.apply(lambda facts: facts.interface),
                        "driver": self.facts.apply(lambda facts: facts.driver)}
        self.register_outputs({"address": node.address, "preflight": self.preflight.id})

    def command(
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
        aliases: Sequence[pulumi.Alias] = (),
        secret_output: bool = False,
    ) -> command.remote.Command | command.local.Command:
        """Declare a command on this machine: run over ssh, or locally for the local stack.

        `secret_output`: its stdout is a secret — kept encrypted in the state and never logged."""
        limit = f"{timeout}s" if timeout else None
        opts = pulumi.ResourceOptions(
            parent=parent,
            depends_on=list(depends_on),
            custom_timeouts=pulumi.CustomTimeouts(create=limit, update=limit) if limit else None,
            aliases=list(aliases),
            additional_secret_outputs=["stdout"] if secret_output else None,
        )
        common: dict[str, Any] = dict(create=create, delete=delete, stdin=stdin, triggers=triggers,
                                      logging="none" if secret_output else None)
        if self._local:
            return command.local.Command(name, interpreter=["/bin/sh", "-c"], **common, opts=opts)
        return command.remote.Command(name, connection=self._connection, **common, opts=opts)

    def container(
        self,
        name: str,
        spec: ContainerSpec,
        *,
        image: pulumi.Input[str],
        parent: pulumi.Resource,
        depends_on: Sequence[pulumi.Resource],
        secret_envs: pulumi.Input[list[str]] | None = None,
        delete_before_replace: bool = False,
        aliases: Sequence[pulumi.Alias] = (),
    ) -> docker.Container:
        """Declare a container on this machine's Docker engine from a spec (components/specs.py), made
        concrete for this host's facts where the spec depends on them (devices, derived interface).

        The provider replaces a container delete-before-replace (its name is fixed); saying so here
        makes the order part of the program, which the rolling update relies on."""
        here = self.facts.apply(spec.on_host) if spec.depends_on_host else pulumi.Output.from_input(spec)
        envs: pulumi.Input[list[str]] = here.apply(lambda s: [f"{k}={v}" for k, v in sorted(s.envs.items())])
        if secret_envs is not None:
            envs = pulumi.Output.all(envs, secret_envs).apply(lambda parts: parts[0] + parts[1])
        return docker.Container(
            name,
            name=spec.name,
            image=image,
            command=spec.command,
            envs=envs,
            network_mode=spec.network_mode,
            ipc_mode=spec.ipc_mode,
            pid_mode=spec.pid_mode,
            init=spec.init or None,
            shm_size=spec.shm_size_mb,
            restart=spec.restart,
            devices=here.apply(lambda s: [docker.ContainerDeviceArgs(host_path=d, container_path=d, permissions="rwm")
                                          for d in s.devices]),
            group_adds=spec.group_adds or None,
            capabilities=docker.ContainerCapabilitiesArgs(adds=spec.capabilities) if spec.capabilities else None,
            security_opts=spec.security_opts or None,
            ulimits=[docker.ContainerUlimitArgs(name=n, soft=soft, hard=hard) for n, soft, hard in spec.ulimits] or None,
            privileged=spec.privileged or None,
            mounts=[
                docker.ContainerMountArgs(type="bind", source=path, target=path, read_only=read_only)
                for path, read_only in spec.bind_mounts
            ],
            # Model files and Ray's state are bind mounts: removing a container never touches them.
            remove_volumes=False,
            opts=pulumi.ResourceOptions(parent=parent, provider=self.provider, depends_on=list(depends_on),
                                        delete_before_replace=delete_before_replace or None, aliases=list(aliases)),
        )
