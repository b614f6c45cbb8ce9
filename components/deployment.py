"""Deployment: the whole stack wired from its plan — hosts, node image, Ray, model stores, servers,
gateway — in data-flow order. Wiring only: what each part builds is that component's business."""

from __future__ import annotations

from dataclasses import dataclass

import pulumi

from components.config import Secrets
from components.gateway import Gateway, GatewayArgs
from components.host import Host, HostArgs
from components.model_server import ModelServer, ModelServerArgs
from components.model_store import ModelStore, ModelStoreArgs
from components.monitoring import prometheus_scrape_config
from components.node_image import NodeImage, NodeImageArgs, image_tag
from components.plan import Plan
from components.ray_cluster import RayCluster, RayClusterArgs


@dataclass
class DeploymentArgs:
    plan: Plan
    secrets: Secrets


class Deployment(pulumi.ComponentResource):
    def __init__(self, name: str, args: DeploymentArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("vllm-dcu:index:Deployment", name, None, opts)
        plan, secrets = args.plan, args.secrets
        child = pulumi.ResourceOptions(parent=self)

        head = Host(f"{name}-{plan.head.label}", HostArgs(plan, plan.head, secrets.ssh_private_key), child)
        workers = [
            Host(f"{name}-{node.label}", HostArgs(plan, node, secrets.ssh_private_key, head.relay_public_key), child)
            for node in plan.workers
        ]
        image = NodeImage(f"{name}-image", NodeImageArgs(plan, head, workers), child)
        ray = RayCluster(f"{name}-ray", RayClusterArgs(plan, head, workers, image.image_ids, self, name), child)
        stores = {
            directory: ModelStore(f"{name}-model-{directory}", ModelStoreArgs(
                plan, model.model, head, workers, image.image_ids,
                secrets.modelscope_token if model.model.source == "modelscope" else secrets.hf_token,
            ), child)
            for directory, model in plan.model_stores.items()
        }
        hosts = {host.label: host for host in [head, *workers]}
        servers = [
            ModelServer(f"{name}-server-{model.name}", ModelServerArgs(
                plan, model, hosts, image.image_ids, ray.checked, stores[model.directory].verified, head.internal_key,
                image_tag(plan),
            ), child)
            for model in plan.models
        ]
        gateway = Gateway(f"{name}-gateway", GatewayArgs(
            plan, head, image.image_ids[head.label], [route for server in servers for route in server.routed],
            head.internal_key, secrets.api_key, secrets.api_keys,
        ), child)

        self.outputs = {
            "gatewayUrl": gateway.url,
            "rayDashboardUrl": ray.dashboard_url,
            "imageIds": image.image_ids,
            # What each node's image runs, as the fabric check found it: the same everywhere, or no server started.
            "versions": ray.versions,
            "nodes": [host.summary for host in [head, *workers]],
            "models": [server.summary for server in servers],
            "plan": plan.as_output(),
            "prometheusScrapeConfig": prometheus_scrape_config(plan),
        }
        self.register_outputs(self.outputs)
