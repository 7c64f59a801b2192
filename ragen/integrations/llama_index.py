"""LlamaIndex adapters: an embedding model, a GPU-aware FAISS vector store, and a retriever over a ragen index.

- :class:`LLM2VecGenEmbedding` is a ``llama_index.core.embeddings.BaseEmbedding``: use it as
  ``Settings.embed_model`` (or ``embed_model=``) for any index. Queries get the query instruction, nodes the
  document instruction, exactly as ``Encoder.encode_queries`` / ``encode_documents`` would embed them.
- :class:`RagenFaissVectorStore` is LlamaIndex's ``FaissVectorStore`` on an inner-product index (cosine
  similarity with normalised vectors), on the GPU when FAISS sees one, persisted atomically from a CPU copy.
- :class:`RagenLlamaIndexRetriever` is a ``BaseRetriever`` over an index built with ``ragen index``: no
  re-embedding, results identical to ``Retriever.search``; ``filters=`` (``MetadataFilters``) on the chunk
  metadata a ragen index stores: ``path``, ``chunk_id``, ``start``, ``end``.

Needs the ``llama-index`` extra: ``pip install "ragen-toolkit[llama-index]"``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import install_hint

try:
    from llama_index.core.base.base_retriever import BaseRetriever
    from llama_index.core.bridge.pydantic import Field, PrivateAttr
    from llama_index.core.callbacks import CallbackManager
    from llama_index.core.embeddings import BaseEmbedding
    from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore, QueryBundle, TextNode
    from llama_index.core.vector_stores.types import (FilterCondition, FilterOperator, MetadataFilters,
                                                      BasePydanticVectorStore, VectorStoreQuery,
                                                      VectorStoreQueryResult)
    from llama_index.core.vector_stores.utils import metadata_dict_to_node, node_to_metadata_dict
    from llama_index.vector_stores.faiss import FaissVectorStore
    from fsspec.implementations.local import LocalFileSystem  # a llama-index-core dependency
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(f"ragen's LlamaIndex integration needs the 'llama-index' extra "
                      f"(llama-index-core and llama-index-vector-stores-faiss): "
                      f"{install_hint('llama-index')} ({exc})") from exc

import numpy as np

from .._io import atomic_path, atomic_write_text
from ..encoders.base import Encoder
from ..errors import RagenError, StoreError
from ._index_store import IndexStore, NodeRecord, StoredNode
from ._shared import (HIT_METADATA_KEYS, EmbedSettings, check_filter_key, embed, hit_fields, hit_metadata,
                      open_index, search_filtered, shared_encoder)

logger = logging.getLogger(__name__)

DEFAULT_PERSIST_FNAME = "default__vector_store.json"  # the file name StorageContext.persist gives the store
FAISS_SUFFIX = ".faiss"  # the FAISS index itself sits beside that JSON file: default__vector_store.faiss


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
        num_workers: int | None = None,
        embeddings_cache: Any = None,
        rate_limiter: Any = None,
    ) -> None:
        """Every ``BaseEmbedding`` field is accepted (``embed_batch_size``, ``callback_manager``,
        ``num_workers``, ``embeddings_cache``, ``rate_limiter``), so ``from_dict(e.to_dict())`` and
        ``from_json(e.to_json())`` rebuild an equal instance (loading the model through the shared cache)."""
        if (model_name is None) == (encoder is None) and (encoder is None or model_name != encoder.spec):
            raise RagenError("LLM2VecGenEmbedding needs exactly one of model_name (an encoder spec) or encoder "
                             "(both only when model_name is that encoder's spec)")
        if encoder is None:
            encoder = shared_encoder(model_name, base_model=base_model, device=device, dtype=dtype)  # type: ignore[arg-type]
        super().__init__(model_name=model_name if model_name is not None else encoder.spec, base_model=base_model,
                         device=device, dtype=dtype, query_instruction=query_instruction,
                         text_instruction=text_instruction, embed_batch_size=embed_batch_size,
                         max_length=max_length, normalize=normalize, callback_manager=callback_manager,
                         num_workers=num_workers, embeddings_cache=embeddings_cache, rate_limiter=rate_limiter)
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
        raise RagenError("use_gpu=True but this FAISS build sees no GPU; replace faiss-cpu by the CUDA 12 build "
                         "(pip uninstall -y faiss-cpu && pip install faiss-gpu) or pass use_gpu=None")
    return gpus > 0 if use_gpu is None else bool(use_gpu)


def _to_gpu(index: Any) -> tuple[Any, Any]:
    """(gpu index, its resources); the resources object must outlive the index."""
    import faiss

    resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(resources, 0, index), resources


def _faiss_path(persist_path: str) -> str:
    """Where the FAISS index of a store persisted at ``persist_path`` lives: beside the JSON file."""
    return persist_path[:-len(".json")] + FAISS_SUFFIX if persist_path.endswith(".json") else persist_path


def _layout_marker(faiss_name: str) -> dict:
    """The JSON written at the path StorageContext gives the store. A ``SimpleVectorStore`` (what
    ``StorageContext.from_defaults(persist_dir=...)`` loads when no ``vector_store=`` is passed) fails on it
    with this sentence as its error message, instead of a ``UnicodeDecodeError`` on FAISS bytes."""
    message = (f"this directory holds a ragen FAISS vector store ({faiss_name}), not a SimpleVectorStore: load it "
               "with StorageContext.from_defaults(persist_dir=DIR, "
               "vector_store=RagenFaissVectorStore.from_persist_dir(DIR))")
    return {"ragen_faiss_vector_store": {"format": 1, "faiss_file": faiss_name}, "embedding_dict": {"ragen": [message]}}


_USE_RAGEN_STORE = ("a FAISS index keeps vectors by position only, with no document ids or metadata; "
                    "ragen.integrations.llama_index.RagenVectorStore(DIR, embed_model=...) supports delete_ref_doc, "
                    "refresh_ref_docs, delete_nodes and metadata filters")


class RagenFaissVectorStore(FaissVectorStore):
    """``FaissVectorStore`` with inner-product search, GPU placement when available, and atomic persistence.

    Build one with :meth:`create` (new, empty) or :meth:`from_persist_dir` (reload). With
    ``LLM2VecGenEmbedding(normalize=True)`` the scores are cosine similarities. A vector of another width than
    the store's raises :class:`~ragen.errors.StoreError` before anything is added.

    Persisted layout (``index.storage_context.persist(persist_dir=DIR)``): the FAISS index in
    ``DIR/default__vector_store.faiss`` and, at the ``default__vector_store.json`` path LlamaIndex assigns,
    a small JSON file pointing at it. Reload with
    ``StorageContext.from_defaults(persist_dir=DIR, vector_store=RagenFaissVectorStore.from_persist_dir(DIR))``;
    without ``vector_store=`` LlamaIndex fails with a message saying exactly that. Directories persisted by
    older ragen versions (FAISS bytes in the ``.json`` file) still load.
    """

    _gpu_resources: Any = PrivateAttr(default=None)

    @classmethod
    def create(cls, dim: int, *, use_gpu: bool | None = None) -> RagenFaissVectorStore:
        import faiss

        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
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

    @property
    def dim(self) -> int:
        return int(self._faiss_index.d)

    def _check_width(self, width: int, what: str) -> None:
        if width != self.dim:
            raise StoreError(f"{what} has dimension {width}, but this vector store was created with dimension "
                             f"{self.dim}; create it with RagenFaissVectorStore.create(embed_model.dim) for the "
                             "embedding model in use")

    def add(self, nodes: list[BaseNode], **add_kwargs: Any) -> list[str]:
        """Add the nodes' embeddings (all checked first, so a bad node adds nothing)."""
        vectors = []
        for node in nodes:
            vector = node.get_embedding()
            self._check_width(len(vector), f"the embedding of node {node.node_id!r}")
            vectors.append(vector)
        if not vectors:
            return []
        first = int(self._faiss_index.ntotal)
        self._faiss_index.add(np.asarray(vectors, dtype=np.float32))  # (n, dim)
        return [str(first + i) for i in range(len(vectors))]

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        if query.filters is not None:
            raise RagenError(f"RagenFaissVectorStore cannot filter: {_USE_RAGEN_STORE}")
        if query.query_embedding is not None:
            self._check_width(len(query.query_embedding), "the query embedding")
        return super().query(query, **kwargs)

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        raise RagenError(f"RagenFaissVectorStore cannot delete documents: {_USE_RAGEN_STORE}")

    def delete_nodes(self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None,
                     **delete_kwargs: Any) -> None:
        raise RagenError(f"RagenFaissVectorStore cannot delete nodes: {_USE_RAGEN_STORE}")

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
        persist_path = str(persist_path)
        if not os.path.isfile(persist_path):
            raise StoreError(f"{persist_path}: no persisted FAISS vector store here; build and persist an index first")
        with open(persist_path, "rb") as f:
            head = f.read(1)
        faiss_path = persist_path
        if head == b"{":  # the JSON marker: the index is the file it names
            try:
                with open(persist_path, encoding="utf-8") as f:
                    name = json.load(f)["ragen_faiss_vector_store"]["faiss_file"]
            except (ValueError, KeyError, TypeError):
                raise StoreError(f"{persist_path}: not a ragen FAISS vector store (a JSON file without the "
                                 "'ragen_faiss_vector_store' entry; a SimpleVectorStore loads without vector_store=)"
                                 ) from None
            faiss_path = os.path.join(os.path.dirname(persist_path), os.path.basename(str(name)))
            if not os.path.isfile(faiss_path):
                raise StoreError(f"{faiss_path}: missing; {persist_path} names it as the FAISS index of this store")
        try:
            index = faiss.read_index(faiss_path)
        except RuntimeError as exc:
            raise StoreError(f"{faiss_path}: not a readable FAISS index ({str(exc).splitlines()[0][:120]})") from None
        return cls._wrap(index, use_gpu)

    @property
    def on_gpu(self) -> bool:
        return self._gpu_resources is not None

    def persist(self, persist_path: str = os.path.join("./storage", DEFAULT_PERSIST_FNAME), fs: Any = None) -> None:
        """Write a CPU copy of the index (GPU indexes cannot be serialised) via temp file + fsync + rename:
        to ``<name>.faiss`` beside a ``<name>.json`` path (plus the JSON marker), or to any other path as is."""
        import faiss

        if fs is not None and not isinstance(fs, LocalFileSystem):
            raise RagenError("the FAISS vector store persists to the local file system only")
        persist_path = str(persist_path)
        index = faiss.index_gpu_to_cpu(self._faiss_index) if self.on_gpu else self._faiss_index
        faiss_path = _faiss_path(persist_path)
        with atomic_path(faiss_path) as tmp:
            faiss.write_index(index, str(tmp))
        if faiss_path != persist_path:
            atomic_write_text(persist_path, json.dumps(_layout_marker(os.path.basename(faiss_path))) + "\n")


# ----------------------------------------------------------------------------------------------------------
# metadata filters
# ----------------------------------------------------------------------------------------------------------
_LIST_OPS = (FilterOperator.ANY, FilterOperator.ALL, FilterOperator.CONTAINS)


def _compare(op: FilterOperator, actual: Any, wanted: Any) -> bool:
    """LlamaIndex's filter operators on one metadata value; a missing value (``None``) matches only
    ``!=``, ``nin`` and ``is_empty``."""
    if op == FilterOperator.EQ:
        return actual == wanted
    if op == FilterOperator.NE:
        return actual != wanted
    if op == FilterOperator.IS_EMPTY:
        return actual is None or actual == "" or actual == []
    if op in (FilterOperator.IN, FilterOperator.NIN, FilterOperator.ANY, FilterOperator.ALL):
        if not isinstance(wanted, (list, tuple, set)):
            raise RagenError(f"the {op.value!r} filter needs a list of values, got {wanted!r}")
    if op == FilterOperator.IN:
        return actual in wanted
    if op == FilterOperator.NIN:
        return actual not in wanted
    if actual is None:
        return False
    if op in (FilterOperator.GT, FilterOperator.GTE, FilterOperator.LT, FilterOperator.LTE):
        try:
            return {FilterOperator.GT: lambda: actual > wanted, FilterOperator.GTE: lambda: actual >= wanted,
                    FilterOperator.LT: lambda: actual < wanted, FilterOperator.LTE: lambda: actual <= wanted}[op]()
        except TypeError:
            raise RagenError(f"cannot compare metadata value {actual!r} with {wanted!r} ({op.value})") from None
    if op == FilterOperator.TEXT_MATCH:
        return isinstance(actual, str) and str(wanted) in actual
    if op == FilterOperator.TEXT_MATCH_INSENSITIVE:
        return isinstance(actual, str) and str(wanted).lower() in actual.lower()
    values = actual if isinstance(actual, (list, tuple, set)) else None
    if values is None:
        return False
    if op == FilterOperator.CONTAINS:
        return wanted in values
    if op == FilterOperator.ANY:
        return any(v in values for v in wanted)
    return all(v in values for v in wanted)  # ALL


def metadata_filter_fn(filters: MetadataFilters, *, keys: tuple[str, ...] | None = None) -> Callable[[dict], bool]:
    """A predicate over a metadata dict equivalent to LlamaIndex ``MetadataFilters`` (nested filters,
    ``and``/``or``/``not``). ``keys``: the only keys (all single-valued) the data has, e.g. a ragen index's
    ``path``, ``chunk_id``, ``start``, ``end``; other keys and list operators then raise up front."""
    if not isinstance(filters, MetadataFilters):
        raise RagenError(f"filters must be llama_index MetadataFilters, got {type(filters).__name__}")

    def check(f: MetadataFilters) -> None:
        for item in f.filters:
            if isinstance(item, MetadataFilters):
                check(item)
            elif keys is not None:
                check_filter_key(item.key)
                if item.operator in _LIST_OPS:
                    raise RagenError(f"filter operator {item.operator.value!r} applies to list-valued metadata; a "
                                     "ragen index's metadata (path, chunk_id, start, end) are single values: use ==, "
                                     "!=, <, <=, >, >=, in, nin, text_match, text_match_insensitive or is_empty")

    check(filters)

    def test(f: MetadataFilters, meta: dict) -> bool:
        results = (test(item, meta) if isinstance(item, MetadataFilters)
                   else _compare(item.operator, meta.get(item.key), item.value) for item in f.filters)
        condition = f.condition or FilterCondition.AND
        if condition == FilterCondition.OR:
            return any(results)
        if condition == FilterCondition.NOT:  # LlamaIndex: none of the filters holds
            return not any(results)
        return all(results)

    return lambda meta: test(filters, meta)


# ----------------------------------------------------------------------------------------------------------
# a full read-write vector store over a ragen index
# ----------------------------------------------------------------------------------------------------------
class RagenVectorStore(BasePydanticVectorStore):
    """A LlamaIndex vector store that *is* a ragen index (SQLite + FAISS): the directory ``ragen index``
    writes and ``ragen query`` reads, created when absent.

    ``add`` / ``delete`` (``index.delete_ref_doc``) / ``delete_nodes`` / ``get_nodes`` / ``clear`` and
    therefore ``index.insert``, ``index.update_ref_doc`` and ``index.refresh_ref_docs`` work; queries take
    ``filters`` (``MetadataFilters`` over the nodes' own metadata and ``path``/``chunk_id``/``start``/``end``),
    ``doc_ids`` and ``node_ids``. A document's ``ref_doc_id`` is its path in the index, a node's id its chunk
    id. Each change is one atomic commit; ``persist`` has nothing left to write. Reopen with
    ``VectorStoreIndex.from_vector_store(RagenVectorStore(DIR), embed_model=...)``.

    ``embed_model``: an :class:`LLM2VecGenEmbedding` (or a ragen encoder); required to create a new index
    (it records which encoder made the vectors, so ``ragen query`` can embed queries), checked against an
    existing one. Node metadata lives beside the index in ``framework_nodes.sqlite``; see
    ``ragen.integrations._index_store`` for what a later ``ragen index FOLDER`` run does to these documents.
    """

    stores_text: bool = True
    flat_metadata: bool = False
    index_dir: str = Field(description="The ragen index directory.")

    _core: Any = PrivateAttr()

    def __init__(self, index_dir: str | os.PathLike[str], *, embed_model: Any = None, stores_text: bool = True,
                 flat_metadata: bool = False, is_embedding_query: bool = True) -> None:
        # stores_text / flat_metadata / is_embedding_query: what to_dict() records, accepted so that
        # from_dict() round-trips; this store's values are fixed
        if (stores_text, flat_metadata, is_embedding_query) != (True, False, True):
            raise RagenError("RagenVectorStore always stores text and nested metadata and searches by embedding "
                             "(stores_text=True, flat_metadata=False, is_embedding_query=True)")
        super().__init__(index_dir=str(index_dir))
        self._core = IndexStore(index_dir, encoder=_encoder_info_of(embed_model))

    @classmethod
    def class_name(cls) -> str:
        return "RagenVectorStore"

    @property
    def client(self) -> Any:
        """The underlying :class:`ragen.integrations._index_store.IndexStore`."""
        return self._core

    def add(self, nodes: Sequence[BaseNode], **add_kwargs: Any) -> list[str]:
        records = []
        for node in nodes:
            embedding = node.embedding
            if embedding is None:
                raise StoreError(f"node {node.node_id!r} has no embedding; embed it first (VectorStoreIndex does)")
            record = node_to_metadata_dict(node, remove_text=True, flat_metadata=False)
            records.append(NodeRecord(chunk_id=node.node_id, path=node.ref_doc_id or node.node_id,
                                      text=node.get_content(metadata_mode=MetadataMode.NONE),
                                      vector=np.asarray(embedding, dtype=np.float32), metadata=dict(node.metadata),
                                      node=record, start=getattr(node, "start_char_idx", None),
                                      end=getattr(node, "end_char_idx", None)))
        self._core.write(add=records)
        return [r.chunk_id for r in records]

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        self._core.write(delete_paths=[ref_doc_id])

    def delete_nodes(self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None,
                     **delete_kwargs: Any) -> None:
        if node_ids is None and filters is None:
            raise RagenError("delete_nodes needs node_ids or filters; use clear() to delete everything")
        doomed = self._core.get(node_ids, _keep(filters))
        self._core.write(delete_ids=[n.chunk_id for n in doomed])

    def get_nodes(self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None) -> list[BaseNode]:
        return [_to_node(n) for n in self._core.get(node_ids, _keep(filters))]

    def clear(self) -> None:
        self._core.write(clear=True)

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        if query.query_embedding is None:
            raise RagenError("RagenVectorStore searches by embedding; the query carries none")
        base = _keep(query.filters)
        doc_ids = set(query.doc_ids) if query.doc_ids else None
        node_ids = set(query.node_ids) if query.node_ids else None

        def keep(n: StoredNode) -> bool:
            return ((doc_ids is None or n.path in doc_ids) and (node_ids is None or n.chunk_id in node_ids)
                    and (base is None or base(n)))

        filtered = base is not None or doc_ids is not None or node_ids is not None
        found = self._core.search(np.asarray(query.query_embedding, dtype=np.float32), query.similarity_top_k,
                                  keep if filtered else None)
        return VectorStoreQueryResult(nodes=[_to_node(n) for n in found], similarities=[n.score for n in found],
                                      ids=[n.chunk_id for n in found])

    def persist(self, persist_path: str = "", fs: Any = None) -> None:
        """Nothing to do: every change was committed to the index directory when it was made."""


def _encoder_info_of(embed_model: Any):
    if embed_model is None:
        return None
    from ..retriever import encoder_info

    encoder = getattr(embed_model, "encoder", embed_model)
    if not all(hasattr(encoder, attr) for attr in ("spec", "fingerprint", "dim")):
        raise RagenError(f"embed_model must be an LLM2VecGenEmbedding or a ragen encoder, got "
                         f"{type(embed_model).__name__}")
    return encoder_info(encoder)


def _keep(filters: MetadataFilters | None) -> Callable[[StoredNode], bool] | None:
    if filters is None:
        return None
    test = metadata_filter_fn(filters)
    return lambda n: test(n.fields)


def _to_node(n: StoredNode) -> BaseNode:
    if n.node is not None:
        node = metadata_dict_to_node(n.node, text=n.text)
    else:  # a chunk written by `ragen index`
        node = TextNode(id_=n.chunk_id, text=n.text,
                        metadata={"path": n.path, "chunk_id": n.chunk_id, "start": n.start, "end": n.end},
                        excluded_embed_metadata_keys=["path", "chunk_id", "start", "end"],
                        excluded_llm_metadata_keys=["chunk_id", "start", "end"])
    return node


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

    ``filters``: LlamaIndex ``MetadataFilters`` over those four keys, e.g.
    ``MetadataFilters(filters=[MetadataFilter(key="path", value="docs/a.md")])``; applied after the FAISS
    search (more candidates are fetched until ``similarity_top_k`` pass or the whole index was searched).
    """

    def __init__(self, index: Any, *, similarity_top_k: int = 10, filters: MetadataFilters | None = None,
                 model: str | None = None, device: str | None = None,
                 callback_manager: CallbackManager | None = None) -> None:
        if not isinstance(similarity_top_k, int) or isinstance(similarity_top_k, bool) or similarity_top_k < 1:
            raise RagenError(f"similarity_top_k must be a positive integer, got {similarity_top_k!r}")
        self._keep = None
        if filters is not None:
            test = metadata_filter_fn(filters, keys=HIT_METADATA_KEYS)
            self._keep = lambda hit: test(hit_fields(hit))
        self.filters = filters
        self.retriever = open_index(index, model=model, device=device)
        self.similarity_top_k = similarity_top_k
        super().__init__(callback_manager=callback_manager)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        query = query_bundle.query_str if query_bundle.embedding is None else np.asarray(query_bundle.embedding,
                                                                                          dtype=np.float32)
        hits = search_filtered(self.retriever, query, self.similarity_top_k, self._keep)
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


__all__ = ["LLM2VecGenEmbedding", "RagenFaissVectorStore", "RagenLlamaIndexRetriever", "RagenVectorStore",
           "metadata_filter_fn"]
