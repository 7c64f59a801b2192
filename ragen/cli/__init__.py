"""The ``ragen`` command line (typer + rich). The only part of ragen that prints or uses rich.

Each command group lives in its own module and registers itself on :data:`app`; every command runs
inside :func:`ragen.cli._common.run_command`, which turns a :class:`~ragen.errors.RagenError` (bad input)
into one red line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

from ._common import app
from . import encode as _encode  # noqa: F401  (registers commands)
from . import index as _index  # noqa: F401  (registers index, query, info)
from . import train as _train  # noqa: F401  (registers commands)
from . import bench as _bench  # noqa: F401  (registers the bench sub-app)
from . import ask as _ask  # noqa: F401  (registers ask)
from . import serve as _serve  # noqa: F401  (registers serve)


def main() -> None:
    app()


__all__ = ["app", "main"]
