"""ragen: retrieval-augmented generation with LLM2Vec-Gen generative embeddings.

Heavy and optional pieces load lazily: ``import ragen`` imports neither torch-heavy model code nor any
integration (llama-index, langchain) until they are used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "LLM2VecGen": ("ragen.encoders.llm2vec_gen", "LLM2VecGen"),
    "load_encoder": ("ragen.encoders", "load_encoder"),
    "Encoder": ("ragen.encoders.base", "Encoder"),
    "build_index": ("ragen.retriever", "build_index"),
    "Retriever": ("ragen.retriever", "Retriever"),
    "IndexStats": ("ragen.retriever", "IndexStats"),
    "RagPipeline": ("ragen.rag", "RagPipeline"),
    "GuardConfig": ("ragen.guard", "GuardConfig"),
    "LLM2VecGenLLM": ("ragen.integrations.llama_index_llm", "LLM2VecGenLLM"),
    "ChatLLM2VecGen": ("ragen.integrations.langchain_chat", "ChatLLM2VecGen"),
    "LLM2VecGenEmbedding": ("ragen.integrations.llama_index", "LLM2VecGenEmbedding"),
    "LLM2VecGenEmbeddings": ("ragen.integrations.langchain", "LLM2VecGenEmbeddings"),
    "RagenLlamaIndexRetriever": ("ragen.integrations.llama_index", "RagenLlamaIndexRetriever"),
    "RagenLangChainRetriever": ("ragen.integrations.langchain", "RagenLangChainRetriever"),
    "LLM2VecGenSentenceTransformer": ("ragen.integrations.sentence_transformers", "LLM2VecGenSentenceTransformer"),
}

from .errors import RagenError  # noqa: E402  (stdlib only)
from .types import Chunk, Hit  # noqa: E402  (stdlib only)

if TYPE_CHECKING:  # pragma: no cover  (names re-exported lazily through __getattr__)
    from .encoders import load_encoder
    from .encoders.base import Encoder
    from .encoders.llm2vec_gen import LLM2VecGen
    from .retriever import IndexStats, Retriever, build_index


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'ragen' has no attribute {name!r}")


__all__ = ["Chunk", "Hit", "RagenError", *_LAZY]
