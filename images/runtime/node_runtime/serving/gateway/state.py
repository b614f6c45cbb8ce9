"""What every handler works with: one typed object made by create_app (app.py)."""

from dataclasses import dataclass, field

import aiohttp

from node_runtime.serving.gateway.config import GatewayConfig
from node_runtime.serving.gateway.health import ClusterMonitor
from node_runtime.serving.gateway.keys import Keys
from node_runtime.serving.gateway.replicas import Pools
from node_runtime.serving.gateway.route_files import RouteFiles
from node_runtime.serving.gateway.shared import Shared


@dataclass
class GatewayState:
    config: GatewayConfig
    keys: Keys  # the clients' keys
    pools: Pools
    route_files: RouteFiles
    cluster: ClusterMonitor
    endpoints: tuple[str, ...]  # every path the gateway answers, for the index page
    client: aiohttp.ClientSession = field(init=False)  # made in the app's lifespan
    health: Shared = field(init=False)  # (status, report) of /health (status.py)
    replica_metrics: Shared = field(init=False)  # the replicas' vllm:* metrics, labelled (status.py)
    api_document: dict = field(init=False)  # /openapi.json (api_docs.py)
    api_page: str = field(init=False)  # /docs
