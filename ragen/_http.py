"""A small JSON-over-HTTP client for ``ragen serve`` (standard library only; numpy where vectors are decoded).

Shared by :class:`ragen.encoders.remote.RemoteEncoder` and the ``ragen query --server`` client; importing
it loads neither torch nor the server's web stack.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING

from .errors import RagenError

if TYPE_CHECKING:
    import numpy as np

DEFAULT_TIMEOUT_S = 300.0


class RemoteError(RagenError):
    """A ragen server could not be reached, or answered with an error."""


def is_server_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_DEFAULT = urllib.request.build_opener()


def _opener(url: str):
    """Loopback servers are reached directly, whatever proxy the environment names."""
    host = urllib.parse.urlparse(url).hostname or ""
    return _DIRECT if host in _LOOPBACK or host.startswith("127.") else _DEFAULT


def request_json(base_url: str, path: str, payload: dict | None = None, *, api_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S) -> dict:
    """``GET`` (no payload) or ``POST`` JSON to ``base_url + path``; the decoded JSON answer.

    A server error becomes a :class:`RemoteError` with the server's one-line message; an unreachable server
    one that says so."""
    url = base_url.rstrip("/") + path
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    headers = {"Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    key = api_key if api_key is not None else os.environ.get("RAGEN_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
    try:
        with _opener(url).open(req, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            message = json.loads(raw)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = raw.decode("utf-8", "replace").strip()[:200] or exc.reason
        raise RemoteError(f"{url}: the server answered {exc.code}: {message}") from None
    except urllib.error.URLError as exc:
        raise RemoteError(f"{base_url}: cannot reach a ragen server ({exc.reason}); start one with `ragen serve`") from None
    except TimeoutError:
        raise RemoteError(f"{url}: no answer within {timeout:g} s") from None
    try:
        return json.loads(body)
    except ValueError:
        raise RemoteError(f"{url}: the answer is not JSON; is this a ragen server?") from None


def decode_vectors(items: list[dict], dim: int) -> np.ndarray:
    """Rows of an embeddings answer (float lists or base64 float32) as a ``(n, dim)`` float32 array."""
    import numpy as np  # here, not at the top: `ragen query --server` never needs it
    out = np.zeros((len(items), dim), dtype=np.float32)
    for row, item in enumerate(sorted(items, key=lambda d: d["index"])):
        emb = item["embedding"]
        vec = np.frombuffer(base64.b64decode(emb), dtype="<f4") if isinstance(emb, str) else np.asarray(emb, np.float32)
        if vec.shape != (dim,):
            raise RemoteError(f"the server returned a vector of shape {vec.shape}, expected ({dim},)")
        out[row] = vec
    return out


__all__ = ["RemoteError", "request_json", "decode_vectors", "is_server_url", "DEFAULT_TIMEOUT_S"]
