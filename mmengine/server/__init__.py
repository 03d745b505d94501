"""The OpenAI-compatible HTTP server (``mmengine serve``)."""

from mmengine.server.api_server import build_app, run_server

__all__ = ["build_app", "run_server"]
