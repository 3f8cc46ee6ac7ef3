"""The Tinker API front door of the control plane (the official `tinker` SDK talks to firetitan through it)."""

from firetitan.server.tinker_gateway.routes import add_tinker_routes

__all__ = ["add_tinker_routes"]
