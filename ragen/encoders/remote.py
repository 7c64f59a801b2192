"""An encoder that lives in a running ``ragen serve`` process, reached over HTTP.

``load_encoder("http://127.0.0.1:8000")`` returns a :class:`RemoteEncoder`: it implements the
:class:`~ragen.encoders.base.Encoder` protocol by calling the server's ``/v1/embeddings``, so anything that
takes a model spec (``Retriever.open(..., model=URL)``, the LlamaIndex and LangChain adapters) can use a
warm server instead of loading the model in its own process. Its ``fingerprint`` and ``dim`` are the served
model's, so an index built with that model accepts it.

Only the standard library is used (``urllib``), so a client process never imports torch for this.
The API key comes from ``api_key=`` or ``$RAGEN_API_KEY``.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence

import numpy as np

from .._http import DEFAULT_TIMEOUT_S, RemoteError, decode_vectors, is_server_url, request_json

class RemoteEncoder:
    """The model of a running ``ragen serve``, behind the :class:`~ragen.encoders.base.Encoder` protocol.

    ``instruction`` follows the in-process LLM2Vec-Gen meaning: ``None`` is the served model's own query or
    document instruction, ``""`` none, anything else replaces it (baselines get it prepended to the text).
    """

    def __init__(self, url: str, *, api_key: str | None = None, model: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S) -> None:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise RemoteError(f"{url!r}: expected a server URL such as http://127.0.0.1:8000")
        self.url = url.rstrip("/").removesuffix("/v1")  # the OpenAI-style base URL works too
        self.api_key = api_key
        self.timeout = timeout
        models = request_json(self.url, "/v1/models", api_key=api_key, timeout=timeout).get("data") or []
        chosen = next((m for m in models if model is None or m.get("id") == model), None)
        if chosen is None:
            served = ", ".join(str(m.get("id")) for m in models) or "none"
            raise RemoteError(f"{self.url}: serves no model {model!r} (serves: {served})")
        try:
            self.model = str(chosen["id"])
            self._dim = int(chosen["dim"])
            self._fingerprint = str(chosen["fingerprint"])
        except (KeyError, TypeError, ValueError):
            raise RemoteError(f"{self.url}: /v1/models lacks dim/fingerprint; is this a ragen server?") from None
        self.query_instruction = chosen.get("query_instruction")
        self.document_instruction = chosen.get("document_instruction")
        self.served_spec = chosen.get("spec")

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def spec(self) -> str:
        return self.url

    def _embed(self, texts: Sequence[str], input_type: str, instruction: str | None, batch_size: int,
               normalize: bool) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not a single string; wrap it in a list")
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        step = max(1, int(batch_size)) * 8  # fewer round trips; the server batches by tokens itself
        for start in range(0, len(texts), step):
            part = texts[start:start + step]
            payload: dict = {"input": part, "model": self.model, "input_type": input_type,
                             "encoding_format": "base64", "normalize": bool(normalize)}
            if instruction is not None:
                payload["instruction"] = instruction
            answer = request_json(self.url, "/v1/embeddings", payload, api_key=self.api_key, timeout=self.timeout)
            out[start:start + len(part)] = decode_vectors(answer["data"], self.dim)
        return out

    def encode_queries(self, texts: Sequence[str], *, instruction: str | None = None, batch_size: int = 32,
                       normalize: bool = False) -> np.ndarray:
        return self._embed(texts, "query", instruction, batch_size, normalize)

    def encode_documents(self, texts: Sequence[str], *, instruction: str | None = None, batch_size: int = 32,
                         normalize: bool = False) -> np.ndarray:
        return self._embed(texts, "document", instruction, batch_size, normalize)

    def decode(self, texts: Sequence[str], *, instruction: str | None = None, max_new_tokens: int = 64) -> list[str]:
        """What each text's embedding decodes to (the served model must be an LLM2Vec-Gen model)."""
        payload: dict = {"input": list(texts), "model": self.model, "max_new_tokens": int(max_new_tokens)}
        if instruction is not None:
            payload["instruction"] = instruction
        answer = request_json(self.url, "/v1/decode", payload, api_key=self.api_key, timeout=self.timeout)
        return [d["text"] for d in sorted(answer["data"], key=lambda d: d["index"])]

    def __repr__(self) -> str:
        return f"RemoteEncoder({self.url!r}, model={self.model!r}, dim={self.dim})"


__all__ = ["RemoteEncoder", "RemoteError", "request_json", "decode_vectors", "is_server_url"]
