"""LangChain adapters: an ``Embeddings`` model and a ``BaseRetriever`` over a ragen index.

- :class:`LLM2VecGenEmbeddings` is a ``langchain_core.embeddings.Embeddings``: ``embed_query`` applies the
  query instruction, ``embed_documents`` the document instruction, in batches, with async variants that run
  the encode in a worker thread.
- :class:`RagenLangChainRetriever` searches an index built with ``ragen index`` and returns ``Document``s
  whose metadata holds ``path``, ``chunk_id``, ``start``, ``end``, ``score`` and ``rank``.

Needs the ``langchain`` extra: ``pip install 'ragen[langchain]'``.
"""

from __future__ import annotations

import asyncio
from typing import Any

try:
    from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.embeddings import Embeddings
    from langchain_core.retrievers import BaseRetriever
    from pydantic import PrivateAttr
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(f"ragen's LangChain integration needs the 'langchain' extra (langchain-core): "
                      f"pip install 'ragen[langchain]' ({exc})") from exc

from ..encoders.base import Encoder
from ..errors import RagenError
from ._shared import EmbedSettings, embed, encode_lock, hit_metadata, open_index, shared_encoder


class LLM2VecGenEmbeddings(Embeddings):
    """An LLM2Vec-Gen (or baseline) encoder as a LangChain embedding model.

    Same arguments and semantics as :class:`ragen.integrations.llama_index.LLM2VecGenEmbedding` (which
    names the document side ``text_instruction``); instances naming the same model share one loaded model
    with each other and with the LlamaIndex adapter.
    """

    def __init__(
        self,
        model_name: str | None = None,
        *,
        base_model: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        query_instruction: str | None = None,
        document_instruction: str | None = None,
        batch_size: int = 32,
        max_length: int = 512,
        normalize: bool = True,
        encoder: Encoder | None = None,
    ) -> None:
        if (model_name is None) == (encoder is None):
            raise RagenError("LLM2VecGenEmbeddings needs exactly one of model_name (an encoder spec) or encoder")
        self.settings = EmbedSettings(query_instruction=query_instruction, document_instruction=document_instruction,
                                      batch_size=batch_size, max_length=max_length, normalize=normalize)
        if encoder is None:
            encoder = shared_encoder(model_name, base_model=base_model, device=device, dtype=dtype)  # type: ignore[arg-type]
        self.encoder = encoder
        self.model_name = model_name if model_name is not None else encoder.spec

    def __repr__(self) -> str:
        return f"LLM2VecGenEmbeddings(model_name={self.model_name!r}, settings={self.settings})"

    @property
    def dim(self) -> int:
        return int(self.encoder.dim)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return embed(self.encoder, texts, "document", self.settings).tolist()

    def embed_query(self, text: str) -> list[float]:
        if not isinstance(text, str):
            raise TypeError(f"embed_query takes one string, got {type(text).__name__}")
        return embed(self.encoder, [text], "query", self.settings)[0].tolist()

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        return await asyncio.to_thread(self.embed_query, text)


class RagenLangChainRetriever(BaseRetriever):
    """A LangChain retriever over an index built with ``ragen index`` (no re-embedding).

    ``index`` is an index directory (opened with ``Retriever.open(index, model=model, device=device)``) or an
    open ``ragen.retriever.Retriever``; ``k`` results per query, in ragen's order.
    """

    k: int = 4
    _retriever: Any = PrivateAttr()

    def __init__(self, index: Any, *, k: int = 4, model: str | None = None, device: str | None = None,
                 tags: list[str] | None = None, metadata: dict[str, Any] | None = None) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise RagenError(f"k must be a positive integer, got {k!r}")
        super().__init__(k=k, tags=tags, metadata=metadata)
        self._retriever = open_index(index, model=model, device=device)

    @property
    def retriever(self) -> Any:
        """The underlying ``ragen.retriever.Retriever``."""
        return self._retriever

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        with encode_lock(self._retriever.encoder):
            hits = self._retriever.search(query, k=self.k)
        return [Document(page_content=hit.text, metadata=hit_metadata(hit), id=hit.chunk_id) for hit in hits]

    async def _aget_relevant_documents(self, query: str, *,
                                       run_manager: AsyncCallbackManagerForRetrieverRun) -> list[Document]:
        return await asyncio.to_thread(self._get_relevant_documents, query, run_manager=run_manager.get_sync())


__all__ = ["LLM2VecGenEmbeddings", "RagenLangChainRetriever"]
