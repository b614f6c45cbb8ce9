"""The HTTP gateway in front of the model servers (`node-runtime gateway`)."""

from node_runtime.serving.gateway.app import create_app

__all__ = ["create_app"]
