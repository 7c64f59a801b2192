"""``ragen serve``: one warm process that embeds, searches and decodes for every client.

- :func:`create_app` (``ragen.serve.app``): the Starlette application, OpenAI-compatible ``/v1/embeddings``
  and ``/v1/chat/completions`` plus ``/v1/search``, ``/v1/decode``, ``/v1/top_tokens``, ``/health``, ``/ready``, ``/metrics``.
- :class:`InferenceWorker` (``ragen.serve.worker``): the one thread that owns the model and batches requests.
- :func:`run_server` / :class:`BackgroundServer` (``ragen.serve.runner``): uvicorn in front or on a thread.
- :func:`search_server` (``ragen.serve.client``): the light client ``ragen query --server`` uses.

Importing this package loads none of the web stack or the model code; the names resolve on first use.
"""

from __future__ import annotations

from .config import ServeConfig, check_bind, is_loopback

_LAZY = {
    "create_app": "app", "ServerState": "app", "ApiError": "app",
    "InferenceWorker": "worker", "Overloaded": "worker", "WorkerStopped": "worker",
    "run_server": "runner", "BackgroundServer": "runner", "bind_socket": "runner",
    "search_server": "client", "decode_server": "client",
    "Metrics": "metrics",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ApiError", "BackgroundServer", "InferenceWorker", "Metrics", "Overloaded", "ServeConfig", "ServerState",
           "WorkerStopped", "bind_socket", "check_bind", "create_app", "decode_server", "is_loopback", "run_server",
           "search_server"]
