"""One JSON line per request on stderr, for operators: off unless the config's access_log_percent
(stack key accessLogPercent) asks for all requests or a random share of them.

Off, it costs nothing: RequestMetricsMiddleware holds None and never calls it. A line says when the
request ended (UTC), its id, which key (by name, never the secret), endpoint, model, replica, status,
latency and tokens; never what was asked or answered.
"""

import json
import logging
import random
import sys
from datetime import datetime, timezone

from node_runtime.serving.gateway.scope import request_id

LOGGER = "node_runtime.gateway.access"


class AccessLog:
    def __init__(self, percent: int):
        self.share = percent / 100
        self.log = logging.getLogger(LOGGER)
        if not self.log.handlers:  # one handler per process, however many apps it makes (tests)
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            self.log.addHandler(handler)
        self.log.setLevel(logging.INFO)
        self.log.propagate = False

    def note(self, scope: dict, endpoint: str, model: str, status: int, seconds: float) -> None:
        if self.share < 1 and random.random() >= self.share:
            return
        state = scope.get("state", {})
        key, usage = state.get("key"), state.get("usage")
        self.log.info(json.dumps({
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "request_id": request_id(scope), "key": key.name if key else None, "method": scope["method"],
            "endpoint": endpoint, "model": model, "replica": state.get("replica"), "status": status,
            "latency_ms": round(seconds * 1000, 3),
            "prompt_tokens": usage[0] if usage else None, "completion_tokens": usage[1] if usage else None,
        }))
