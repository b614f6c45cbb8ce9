"""What every handler works with: one typed object made by create_app (app.py)."""

from dataclasses import dataclass, field

import aiohttp

from node_runtime.serving.gateway.config import GatewayConfig
from node_runtime.serving.gateway.health import ClusterMonitor
from node_runtime.serving.gateway.replicas import Pools
from node_runtime.serving.gateway.route_files import RouteFiles


@dataclass
class GatewayState:
    config: GatewayConfig
    api_key: str | None  # the clients' key
    pools: Pools
    route_files: RouteFiles
    cluster: ClusterMonitor
    endpoints: tuple[str, ...]  # every path the gateway answers, for the index page
    client: aiohttp.ClientSession = field(init=False)  # made in the app's lifespan
