"""Settings of ``ragen serve`` (a frozen dataclass; the CLI fills it from its options)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..errors import RagenError


@dataclass(frozen=True)
class ServeConfig:
    """Limits, batching and security settings of the server.

    ``model_name``: the id clients send as ``model`` (default: the encoder's spec). ``normalize``: whether
    ``/v1/embeddings`` returns L2-normalised vectors when the request does not say (``normalize`` is a
    ragen extension of the OpenAI schema; OpenAI's own vectors are unit length). ``max_input_tokens``
    counts a text's own tokens; texts within it but beyond the model's input length are truncated exactly
    as ``ragen encode`` truncates them. ``max_new_tokens`` caps decoding and chat answers;
    ``chat_step_tokens``: tokens a chat completion decodes per worker job (embedding batches run between jobs).
    """

    api_key: str | None = None
    model_name: str | None = None
    normalize: bool = True
    max_batch_tokens: int = 16384
    max_batch_size: int = 64
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_body_bytes: int = 4 * 1024 * 1024
    max_inputs: int = 2048
    max_input_tokens: int = 8192
    max_k: int = 1000
    max_new_tokens: int = 512
    chat_step_tokens: int = 8
    request_timeout_s: float = 300.0
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_batch_size", "max_queue", "max_body_bytes", "max_inputs",
                     "max_input_tokens", "max_k", "max_new_tokens", "chat_step_tokens", "retry_after_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise RagenError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.max_wait_ms < 0:
            raise RagenError(f"max-wait-ms must be >= 0, got {self.max_wait_ms}")
        if self.request_timeout_s <= 0:
            raise RagenError(f"request-timeout must be > 0, got {self.request_timeout_s}")
        if self.api_key is not None and not self.api_key.strip():
            raise RagenError("the API key is empty; pass a non-empty --api-key or none")


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond loopback without an API key."""
    if not is_loopback(host) and not api_key:
        raise RagenError(f"--host {host} accepts connections from other machines; refusing to serve it without "
                         "an API key (pass --api-key KEY or set RAGEN_API_KEY), or bind 127.0.0.1")


__all__ = ["ServeConfig", "is_loopback", "check_bind"]
