"""Deployment: the whole stack — hosts, node image, Ray, model stores, servers, gateway — built from
the validated stack config, in data-flow order."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

import pulumi

from components.config import Secrets, StackConfig, resolve_layout
from components.containers import cluster_readiness, container_name
from components.gateway import Gateway, GatewayArgs
from components.host import Host, HostArgs
from components.model_server import ModelServer, ModelServerArgs
from components.model_store import ModelStore, ModelStoreArgs
from components.node_image import NodeImage, NodeImageArgs
from components.ray_head import RayHead, RayHeadArgs
from components.ray_worker import RayWorker, RayWorkerArgs


def cluster_wait_script(config: StackConfig) -> str:
    """Run on the head: returns once Ray reports every node and GPU, else fails naming what is missing."""
    ready = cluster_readiness(config)
    return shlex.join([
        "docker", "exec", container_name(config, "ray-head"), "node-runtime", "cluster", "wait",
        "--address", ready["ray_address"], "--nodes", str(ready["expected_nodes"]),
        "--gpus", str(ready["expected_gpus"]), "--timeout", str(ready["timeout_s"]),
    ])


def head_ports(config: StackConfig) -> list[tuple[int, str]]:
    ports = [(port, f"rayPorts.{key}") for key, port in config.ray_ports.named().items()]
    ports.append((config.api_port, "apiPort"))
    ports += [(config.server_port(i), f"models[{i}].port") for i in range(len(config.models))]
    return ports


def worker_ports(config: StackConfig) -> list[tuple[int, str]]:
    ray = config.ray_ports
    return [
        (ray.object_manager, "rayPorts.objectManager"),
        (ray.node_manager, "rayPorts.nodeManager"),
        (ray.metrics_export, "rayPorts.metricsExport"),
    ]


def models_served(config: StackConfig) -> list[dict[str, object]]:
    served = []
    for i, model in enumerate(config.models):
        tp, pp = resolve_layout(config, model)
        served.append({
            "name": model.name, "id": model.id, "revision": model.revision,
            "tensorParallelSize": tp, "pipelineParallelSize": pp, "port": config.server_port(i),
        })
    return served


@dataclass
class DeploymentArgs:
    config: StackConfig
    secrets: Secrets


class Deployment(pulumi.ComponentResource):
    def __init__(self, name: str, args: DeploymentArgs, opts: pulumi.ResourceOptions | None = None):
        super().__init__("vllm-dcu:index:Deployment", name, None, opts)
        config, secrets = args.config, args.secrets
        child = pulumi.ResourceOptions(parent=self)

        head = Host(f"{name}-{config.head.label}", HostArgs(
            config, config.head, "head", secrets.ssh_private_key, ports=head_ports(config)
        ), child)
        workers = [
            Host(f"{name}-{node.label}", HostArgs(
                config, node, "worker", secrets.ssh_private_key,
                relay_public_key=head.relay_public_key, ports=worker_ports(config),
            ), child)
            for node in config.workers
        ]
        image = NodeImage(f"{name}-image", NodeImageArgs(config, head, workers), child)
        ray_head = RayHead(f"{name}-ray-head", RayHeadArgs(config, head, image.image_ids[head.label]), child)
        ray_workers = [
            RayWorker(f"{name}-ray-{host.label}", RayWorkerArgs(config, host, image.image_ids[host.label], ray_head), child)
            for host in workers
        ]
        cluster_ready = head.run(
            f"{name}-cluster-ready",
            cluster_wait_script(config),
            triggers=[ray_head.container.id, *(w.container.id for w in ray_workers)],
            timeout=config.timeouts.cluster_ready + 60,
            parent=self,
            depends_on=[ray_head.container, *(w.container for w in ray_workers)],
        )
        stores: dict[str, ModelStore] = {}
        for model in config.models:
            if model.directory not in stores:
                token = secrets.modelscope_token if model.source == "modelscope" else secrets.hf_token
                stores[model.directory] = ModelStore(f"{name}-model-{model.directory}", ModelStoreArgs(
                    config, model, head, workers, image.image_ids, token
                ), child)
        servers = [
            ModelServer(f"{name}-server-{model.name}", ModelServerArgs(
                config, i, head, image.image_ids[head.label], cluster_ready, stores[model.directory].verified
            ), child)
            for i, model in enumerate(config.models)
        ]
        gateway = Gateway(f"{name}-gateway", GatewayArgs(
            config, head, image.image_ids[head.label], [s.healthy for s in servers], secrets.api_key
        ), child)

        self.outputs = {
            "gatewayUrl": gateway.url,
            "rayDashboardUrl": ray_head.dashboard_url,
            "imageIds": image.image_ids,
            "nodes": [
                {"name": host.label, "address": host.node.address, "gpus": host.node.gpus,
                 "role": "head" if host is head else "worker"}
                for host in [head, *workers]
            ],
            "models": models_served(config),
        }
        self.register_outputs(self.outputs)
