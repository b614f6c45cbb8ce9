"""NodeImage: the same node image on every host — built on the head, then pushed to a registry,
relayed to the workers layer by layer, or streamed whole — with the image ID each host holds.
What each step runs is components/image_distribution.py."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_docker as docker

from components.host import Host
from components.image_distribution import (
    CONTEXT, base_check_script, base_pull_script, build_args, claim_base_script, fetch_script, image_repository,
    image_tag, inspect_id_script, push_script, relay_container_spec, stream_image_script, uses_relay,
)
from components.plan import Plan


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
        plan, head = args.plan, args.head
        config = plan.config
        tag = image_tag(plan)
        pushed = config.image_registry is not None
        before_build: list[pulumi.Resource] = [head.preflight]
        if check := base_check_script(plan):
            before_build.append(head.command(f"{name}-base", check, triggers=[config.base_image_id],
                                             parent=self, depends_on=[head.preflight]))
        # nodesPullBase: every node pulls the base from its registry (the head too: the push then knows
        # the registry's digests of its layers).
        base_pulls = {
            host.label: host.command(f"{name}-{host.label}-base-pull", base_pull_script(plan, host.node),
                                     triggers=[config.base_image], parent=self, depends_on=host.ready)
            for host in [head, *args.workers]
        } if config.nodes_pull_base and uses_relay(plan) else {}
        if head.label in base_pulls:
            before_build.append(base_pulls[head.label])
        built = docker.Image(
            f"{name}-build",
            image_name=f"{image_repository(plan)}:{tag}",
            build=docker.DockerBuildArgs(
                context=CONTEXT,
                dockerfile=plan.profile.recipe,
                args=build_args(plan),
                platform="linux/amd64",
            ),
            skip_push=not pushed,
            opts=pulumi.ResourceOptions(parent=self, provider=head.provider, depends_on=before_build),
        )
        self.reference: pulumi.Output[str] = built.repo_digest if pushed else built.image_name
        on_head: list[pulumi.Resource] = [built]
        if uses_relay(plan):
            relay = head.container(f"{name}-relay", relay_container_spec(plan), image=built.image_name,
                                   parent=self, depends_on=[built, *head.ready], delete_before_replace=True)
            before_push: list[pulumi.Resource] = [relay]
            if base_pulls:
                before_push.append(head.command(
                    f"{name}-claim-base", built.image_name.apply(lambda image: claim_base_script(plan, image)),
                    triggers=[config.base_image, built.image_name], parent=self, depends_on=[relay]))
            push = head.command(f"{name}-push", built.image_name.apply(lambda image: push_script(plan, image, tag)),
                                triggers=[built.image_name], parent=self, depends_on=before_push)
            self.reference = push.stdout.apply(str.strip)
            on_head.append(push)
        self.image_ids = {}
        for host in [head, *args.workers]:
            placed: list[pulumi.Resource] = [*on_head, *host.ready, *([base_pulls[host.label]] if base_pulls else [])]
            if pushed:
                placed.append(docker.RemoteImage(
                    f"{name}-{host.label}-pull",
                    name=built.repo_digest,
                    keep_locally=True,
                    opts=pulumi.ResourceOptions(parent=self, provider=host.provider),
                ))
            elif host is not head:
                # The head hands it over: a pull through the relay's tunnel, or the whole image streamed.
                step, script, source = ("fetch", fetch_script, self.reference) if uses_relay(plan) \
                    else ("stream", stream_image_script, built.image_name)
                placed.append(head.command(
                    f"{name}-{host.label}-{step}",
                    source.apply(lambda ref, node=host.node, script=script: script(plan, node, ref)),
                    triggers=[source],
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
