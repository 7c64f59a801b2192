"""LlamaIndex adapters: an embedding model, a GPU-aware FAISS vector store, and a retriever over a ragen index.

- :class:`LLM2VecGenEmbedding` is a ``llama_index.core.embeddings.BaseEmbedding``: use it as
  ``Settings.embed_model`` (or ``embed_model=``) for any index. Queries get the query instruction, nodes the
  document instruction, exactly as ``Encoder.encode_queries`` / ``encode_documents`` would embed them.
- :class:`RagenFaissVectorStore` is LlamaIndex's ``FaissVectorStore`` on an inner-product index (cosine
  similarity with normalised vectors), on the GPU when FAISS sees one, persisted atomically from a CPU copy.
- :class:`RagenLlamaIndexRetriever` is a ``BaseRetriever`` over an index built with ``ragen index``: no
  re-embedding, results identical to ``Retriever.search``.

Needs the ``llama-index`` extra: ``pip install 'ragen[llama-index]'``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

try:
    from llama_index.core.base.base_retriever import BaseRetriever
    from llama_index.core.bridge.pydantic import Field, PrivateAttr
    from llama_index.core.callbacks import CallbackManager
    from llama_index.core.embeddings import BaseEmbedding
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.vector_stores.faiss import FaissVectorStore
    from fsspec.implementations.local import LocalFileSystem  # a llama-index-core dependency
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(f"ragen's LlamaIndex integration needs the 'llama-index' extra "
                      f"(llama-index-core and llama-index-vector-stores-faiss): pip install 'ragen[llama-index]' "
                      f"({exc})") from exc

import numpy as np

from .._io import atomic_path
from ..encoders.base import Encoder
from ..errors import RagenError, StoreError
from ._shared import EmbedSettings, embed, encode_lock, hit_metadata, open_index, shared_encoder

logger = logging.getLogger(__name__)

DEFAULT_PERSIST_FNAME = "default__vector_store.json"  # the file name StorageContext.persist gives the store


class LLM2VecGenEmbedding(BaseEmbedding):
    """An LLM2Vec-Gen (or baseline) encoder as a LlamaIndex embedding model.

    ``model_name`` is an encoder spec (a checkpoint directory or hub id, ``minilm``, ``st:NAME``,
    ``mean:BACKBONE``); instances naming the same spec, base model, device and dtype share one loaded
    model. Alternatively pass an already loaded ``encoder=``. ``query_instruction`` / ``text_instruction``:
    ``None`` uses the encoder's own (LLM2Vec-Gen: "Generate a passage that best answers this question: " /
    "Summarize the following passage: "), ``""`` none; for baselines a non-empty instruction is prepended
    to the text. ``normalize=True`` gives unit vectors, so inner product equals cosine similarity.
    """

    base_model: str | None = Field(default=None, description="Backbone override for LLM2Vec-Gen checkpoints.")
    device: str | None = Field(default=None, description="cpu, cuda, cuda:N; None picks a GPU when present.")
    dtype: str | None = Field(default=None, description="float32, bfloat16, float16; None: bf16 on GPU, fp32 on CPU.")
    query_instruction: str | None = Field(default=None, description="None: the encoder's query instruction.")
    text_instruction: str | None = Field(default=None, description="None: the encoder's document instruction.")
    max_length: int = Field(default=512, gt=0, description="Token limit of LLM2Vec-Gen inputs.")
    normalize: bool = Field(default=True, description="L2-normalise vectors (cosine = inner product).")

    _encoder: Any = PrivateAttr()

    def __init__(
        self,
        model_name: str | None = None,
        *,
        base_model: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        query_instruction: str | None = None,
        text_instruction: str | None = None,
        embed_batch_size: int = 32,
        max_length: int = 512,
        normalize: bool = True,
        encoder: Encoder | None = None,
        callback_manager: CallbackManager | None = None,
    ) -> None:
        if (model_name is None) == (encoder is None):
            raise RagenError("LLM2VecGenEmbedding needs exactly one of model_name (an encoder spec) or encoder")
        if encoder is None:
            encoder = shared_encoder(model_name, base_model=base_model, device=device, dtype=dtype)  # type: ignore[arg-type]
        super().__init__(model_name=model_name if model_name is not None else encoder.spec, base_model=base_model,
                         device=device, dtype=dtype, query_instruction=query_instruction,
                         text_instruction=text_instruction, embed_batch_size=embed_batch_size,
                         max_length=max_length, normalize=normalize, callback_manager=callback_manager)
        self._settings()  # validate now, not at the first embed
        self._encoder = encoder

    @classmethod
    def class_name(cls) -> str:
        return "LLM2VecGenEmbedding"

    @property
    def encoder(self) -> Encoder:
        return self._encoder

    @property
    def dim(self) -> int:
        return int(self._encoder.dim)

    def _settings(self) -> EmbedSettings:
        return EmbedSettings(query_instruction=self.query_instruction, document_instruction=self.text_instruction,
                             batch_size=self.embed_batch_size, max_length=self.max_length, normalize=self.normalize)

    def _embed(self, texts: list[str], kind: str) -> list[list[float]]:
        return embed(self._encoder, texts, kind, self._settings()).tolist()  # type: ignore[arg-type]

    # LlamaIndex calls these; get_text_embedding_batch already splits into embed_batch_size chunks.
    def _get_query_embedding(self, query: str) -> list[float]:
        return self._embed([query], "query")[0]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._embed([text], "document")[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._embed(list(texts), "document")

    # Async: the encode runs in a worker thread, so the event loop keeps serving other coroutines.
    async def _aget_query_embedding(self, query: str) -> list[float]:
        return (await asyncio.to_thread(self._embed, [query], "query"))[0]

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return (await asyncio.to_thread(self._embed, [text], "document"))[0]

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return await asyncio.to_thread(self._embed, list(texts), "document")


# ----------------------------------------------------------------------------------------------------------
# vector store
# ----------------------------------------------------------------------------------------------------------
def _gpu_available(use_gpu: bool | None) -> bool:
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu and gpus == 0:
        raise RagenError("use_gpu=True but this FAISS build sees no GPU; install ragen[gpu] or pass use_gpu=None")
    return gpus > 0 if use_gpu is None else bool(use_gpu)


def _to_gpu(index: Any) -> tuple[Any, Any]:
    """(gpu index, its resources); the resources object must outlive the index."""
    import faiss

    resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(resources, 0, index), resources


class RagenFaissVectorStore(FaissVectorStore):
    """``FaissVectorStore`` with inner-product search, GPU placement when available, and atomic persistence.

    Build one with :meth:`create` (new, empty) or :meth:`from_persist_dir` (reload). With
    ``LLM2VecGenEmbedding(normalize=True)`` the scores are cosine similarities.
    """

    _gpu_resources: Any = PrivateAttr(default=None)

    @classmethod
    def create(cls, dim: int, *, use_gpu: bool | None = None) -> RagenFaissVectorStore:
        import faiss

        if not isinstance(dim, int) or dim < 1:
            raise RagenError(f"vector dimension must be a positive integer, got {dim!r}")
        return cls._wrap(faiss.IndexFlatIP(dim), use_gpu)

    @classmethod
    def _wrap(cls, cpu_index: Any, use_gpu: bool | None) -> RagenFaissVectorStore:
        if _gpu_available(use_gpu):
            gpu_index, resources = _to_gpu(cpu_index)
            store = cls(faiss_index=gpu_index)
            store._gpu_resources = resources
            logger.info("FAISS vector store on GPU (%d vectors)", gpu_index.ntotal)
            return store
        return cls(faiss_index=cpu_index)

    @classmethod
    def from_persist_dir(cls, persist_dir: str = "./storage", fs: Any = None, *,
                         use_gpu: bool | None = None) -> RagenFaissVectorStore:
        return cls.from_persist_path(os.path.join(persist_dir, DEFAULT_PERSIST_FNAME), fs, use_gpu=use_gpu)

    @classmethod
    def from_persist_path(cls, persist_path: str, fs: Any = None, *,
                          use_gpu: bool | None = None) -> RagenFaissVectorStore:
        import faiss

        if fs is not None and not isinstance(fs, LocalFileSystem):
            raise RagenError("the FAISS vector store persists to the local file system only")
        if not os.path.isfile(persist_path):
            raise StoreError(f"{persist_path}: no persisted FAISS vector store here; build and persist an index first")
        try:
            index = faiss.read_index(str(persist_path))
        except RuntimeError as exc:
            raise StoreError(f"{persist_path}: not a readable FAISS index ({str(exc).splitlines()[0][:120]})") from None
        return cls._wrap(index, use_gpu)

    @property
    def on_gpu(self) -> bool:
        return self._gpu_resources is not None

    def persist(self, persist_path: str = os.path.join("./storage", DEFAULT_PERSIST_FNAME), fs: Any = None) -> None:
        """Write a CPU copy of the index (GPU indexes cannot be serialised) via temp file + fsync + rename."""
        import faiss

        if fs is not None and not isinstance(fs, LocalFileSystem):
            raise RagenError("the FAISS vector store persists to the local file system only")
        index = faiss.index_gpu_to_cpu(self._faiss_index) if self.on_gpu else self._faiss_index
        with atomic_path(persist_path) as tmp:
            faiss.write_index(index, str(tmp))


# ----------------------------------------------------------------------------------------------------------
# retriever over a ragen index
# ----------------------------------------------------------------------------------------------------------
class RagenLlamaIndexRetriever(BaseRetriever):
    """A LlamaIndex retriever over an index built with ``ragen index`` (or ``ragen.retriever.build_index``).

    ``index`` is an index directory (opened with ``Retriever.open(index, model=model, device=device)``) or an
    open ``ragen.retriever.Retriever``. Nodes are ``TextNode``s with ``id_`` = the chunk id and metadata
    ``path``, ``chunk_id``, ``start``, ``end`` (the LLM sees only ``path``); scores are ragen's. A
    ``QueryBundle`` that carries an embedding is searched with that vector, which must come from the index's
    encoder (e.g. ``LLM2VecGenEmbedding`` on the same checkpoint).
    """

    def __init__(self, index: Any, *, similarity_top_k: int = 10, model: str | None = None,
                 device: str | None = None, callback_manager: CallbackManager | None = None) -> None:
        if not isinstance(similarity_top_k, int) or similarity_top_k < 1:
            raise RagenError(f"similarity_top_k must be a positive integer, got {similarity_top_k!r}")
        self.retriever = open_index(index, model=model, device=device)
        self.similarity_top_k = similarity_top_k
        super().__init__(callback_manager=callback_manager)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        with encode_lock(self.retriever.encoder):
            if query_bundle.embedding is not None:
                vector = np.asarray(query_bundle.embedding, dtype=np.float32)
                hits = self.retriever.search_vector(vector, k=self.similarity_top_k)
            else:
                hits = self.retriever.search(query_bundle.query_str, k=self.similarity_top_k)
        return [_node(hit) for hit in hits]

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return await asyncio.to_thread(self._retrieve, query_bundle)


def _node(hit: Any) -> NodeWithScore:
    meta = hit_metadata(hit)
    del meta["score"], meta["rank"]  # NodeWithScore carries the score; rank is the list position
    node = TextNode(id_=hit.chunk_id, text=hit.text, metadata=meta,
                    excluded_embed_metadata_keys=list(meta),
                    excluded_llm_metadata_keys=["chunk_id", "start", "end"])
    return NodeWithScore(node=node, score=float(hit.score))


__all__ = ["LLM2VecGenEmbedding", "RagenFaissVectorStore", "RagenLlamaIndexRetriever"]
