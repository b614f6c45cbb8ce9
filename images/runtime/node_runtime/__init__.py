"""The runtime baked into the node image: what the Pulumi components start on each host."""

__version__ = "0.1.0"
