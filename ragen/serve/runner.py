"""Running the application under uvicorn: in the foreground (``ragen serve``) or on a background thread
(tests, benchmarks, notebooks)."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time

from ..errors import RagenError
from ..errors import install_hint

logger = logging.getLogger(__name__)


def _require_uvicorn():
    try:
        import uvicorn
    except ImportError:
        raise ImportError(f"ragen serve needs the 'serve' extra: {install_hint('serve')}") from None
    return uvicorn


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port`` 0 picks a free one); a one-line error when taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise RagenError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _config(app, log_level: str, graceful_s: float):
    uvicorn = _require_uvicorn()
    return uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                          timeout_graceful_shutdown=graceful_s, timeout_keep_alive=30)


def run_server(app, sock: socket.socket, *, log_level: str = "warning", graceful_s: float = 30.0) -> None:
    """Serve ``app`` on ``sock`` until SIGINT/SIGTERM; then stop accepting, finish the requests in flight
    (at most ``graceful_s`` seconds) and drain the inference queue."""
    uvicorn = _require_uvicorn()
    server = uvicorn.Server(_config(app, log_level, graceful_s))
    # uvicorn re-raises the signal that stopped it once its graceful shutdown is over; with these handlers
    # in place that re-raise is a no-op, so a SIGTERM/SIGINT stop ends in a normal return (exit code 0).
    received: list[int] = []
    handled = (signal.SIGTERM, signal.SIGINT) if threading.current_thread() is threading.main_thread() else ()
    previous = {sig: signal.signal(sig, lambda s, frame: received.append(s)) for sig in handled}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        logger.info("stopped by signal %s", received[0])
    if not server.started:
        raise RagenError("the server failed to start; see the log above")


class BackgroundServer:
    """``app`` served on a free loopback port from a daemon thread.

    >>> with BackgroundServer(create_app(encoder)) as server:
    ...     httpx.post(server.url + "/v1/embeddings", json={"input": "hi"})
    """

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 start_timeout_s: float = 60.0) -> None:
        uvicorn = _require_uvicorn()
        self.sock = bind_socket(host, port)
        self.url = url_of(self.sock)
        self._server = uvicorn.Server(_config(app, log_level, 10.0))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self.sock]},
                                        name="ragen-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.sock.close()
                raise RagenError("the background server did not start")
            time.sleep(0.01)

    def stop(self, timeout: float = 30.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["run_server", "BackgroundServer", "bind_socket", "url_of"]
