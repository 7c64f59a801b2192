"""Client side of ``ragen serve`` for the CLI: search a served index (standard library and numpy only, so
``ragen query --server`` starts in a fraction of a second)."""

from __future__ import annotations

from collections.abc import Callable

from .._http import RemoteError, request_json
from ..types import Hit


def search_server(url: str, query: str, *, k: int = 10, index: str | None = None, api_key: str | None = None,
                  timeout: float = 300.0, guard: bool = False,
                  blocked: Callable[[str], None] = lambda reason: None) -> list[Hit]:
    """The hits of ``query`` in the server's ``index`` (None: its only index), as ``Retriever.search`` gives.
    ``guard``: ask the server to run the index's refusal guard (a server started with ``--guard`` always
    does); a blocked query gets no hits and ``blocked`` hears the guard's reason."""
    payload: dict = {"query": query, "k": int(k)}
    if index is not None:
        payload["index"] = index
    if guard:
        payload["guard"] = True
    answer = request_json(_base(url), "/v1/search", payload, api_key=api_key, timeout=timeout)
    if answer.get("blocked"):
        blocked(str(answer.get("reason") or "the refusal guard blocked the query"))
    try:
        return [Hit(rank=int(h["rank"]), score=float(h["score"]), chunk_id=str(h["chunk_id"]), path=str(h["path"]),
                    text=str(h["text"]), start=int(h["start"]), end=int(h["end"])) for h in answer["data"]]
    except (KeyError, TypeError, ValueError):
        raise RemoteError(f"{url}: /v1/search answered an unexpected shape; is this a ragen server?") from None


def decode_server(url: str, texts: list[str], *, input_type: str | None = None, max_new_tokens: int = 64,
                  api_key: str | None = None, timeout: float = 300.0) -> list[str]:
    """What each text's embedding decodes to on the server (``input_type`` picks the model's instruction)."""
    payload: dict = {"input": list(texts), "max_new_tokens": int(max_new_tokens)}
    if input_type is not None:
        payload["input_type"] = input_type
    answer = request_json(_base(url), "/v1/decode", payload, api_key=api_key, timeout=timeout)
    return [d["text"] for d in sorted(answer["data"], key=lambda d: d["index"])]


def query_server(url: str, query: str, *, k: int = 10, index: str | None = None, explain: bool = False,
                 notice: Callable[[str], None] = lambda message: None, api_key: str | None = None,
                 timeout: float = 300.0, guard: bool = False,
                 blocked: Callable[[str], None] = lambda reason: None) -> tuple[list[Hit], str | None]:
    """``ragen query --server``: the hits and, with ``explain``, what the query embedding decodes to
    (``notice`` hears why there is no explanation when the served model cannot decode)."""
    hits = search_server(url, query, k=k, index=index, api_key=api_key, timeout=timeout, guard=guard, blocked=blocked)
    explanation = None
    if explain:
        card = (request_json(_base(url), "/v1/models", api_key=api_key, timeout=timeout).get("data") or [{}])[0]
        if card.get("decodes"):
            explanation = decode_server(url, [query], input_type="query", api_key=api_key, timeout=timeout)[0]
        else:
            notice(f"--explain needs an LLM2Vec-Gen model; {card.get('spec')} embeds the input text and has "
                   "nothing to decode")
    return hits, explanation


def _base(url: str) -> str:
    return url.rstrip("/").removesuffix("/v1")


__all__ = ["search_server", "decode_server", "query_server", "RemoteError"]
