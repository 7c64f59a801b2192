"""LangChain adapters: an ``Embeddings`` model and a ``BaseRetriever`` over a ragen index.

- :class:`LLM2VecGenEmbeddings` is a pydantic ``Embeddings`` model (as ``HuggingFaceEmbeddings`` is):
  ``embed_query`` applies the query instruction, ``embed_documents`` the document instruction, in batches,
  with async variants that run the encode in a worker thread. ``model_dump()`` gives the arguments that
  rebuild it. The ``HuggingFaceEmbeddings`` spellings ``model_kwargs={"device": ...}`` and
  ``encode_kwargs={"batch_size": ..., "normalize_embeddings": ...}`` are accepted; other keys are refused
  with ragen's equivalent.
- :class:`RagenLangChainRetriever` searches an index built with ``ragen index`` and returns ``Document``s
  whose metadata holds ``path``, ``chunk_id``, ``start``, ``end``, ``score`` and ``rank``. It is a normal
  pydantic ``BaseRetriever`` (``name``, ``tags``, ``metadata``, callbacks, ``configurable_fields``,
  ``with_config``, ``batch``/``abatch``); ``invoke(q, k=..., filter=...)`` overrides ``k``/``filter`` for
  one call, as ``VectorStoreRetriever`` does with its search kwargs.

Filters (``filter=``) apply to the chunk metadata a ragen index stores: ``path``, ``chunk_id``, ``start``,
``end``. Either a dict in the style of LangChain's FAISS and Chroma stores (``{"path": "a.md"}``,
``{"path": {"$in": [...]}}``, operators ``$eq $ne $gt $gte $lt $lte $in $nin $contains``, combinators
``$and $or $not``; several keys mean all of them), or a callable taking a ``Document`` (as
``InMemoryVectorStore`` does) and returning ``True`` to keep it.

Needs the ``langchain`` extra: ``pip install "ragen-toolkit[langchain]"``.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from ..errors import install_hint

try:
    from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.embeddings import Embeddings
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.vectorstores import VectorStore
    from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(f"ragen's LangChain integration needs the 'langchain' extra (langchain-core): "
                      f"{install_hint('langchain')} ({exc})") from exc

from ..errors import RagenError
from ._index_store import IndexStore, NodeRecord, StoredNode
from ._shared import (HIT_METADATA_KEYS, EmbedSettings, check_filter_key, embed, hit_fields, hit_metadata,
                      open_index, search_filtered, shared_encoder)

# HuggingFaceEmbeddings keys -> the LLM2VecGenEmbeddings field they set.
_MODEL_KWARGS = {"device": "device", "dtype": "dtype", "torch_dtype": "dtype"}
_ENCODE_KWARGS = {"batch_size": "batch_size", "normalize_embeddings": "normalize"}
_REFUSED = {
    "prompt": "query_instruction= / document_instruction= (one each for queries and documents)",
    "prompt_name": "query_instruction= / document_instruction= (one each for queries and documents)",
    "trust_remote_code": "nothing: ragen loads models without remote code",
    "max_seq_length": "max_length=",
    "model_kwargs": "dtype= (the only load option ragen passes to the model)",
}


def _one_line(cls_name: str, exc: ValidationError) -> RagenError:
    """A pydantic validation error as ragen's one-line error: the first bad field, the value, what is expected."""
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err.get("loc", ())) or "arguments"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return RagenError(f"{cls_name}: {where}={err.get('input')!r}: {err.get('msg')}{more}")


def _dtype_name(value: Any) -> str:
    return str(value).replace("torch.", "")


def _fold(data: dict, option: str, given: Any, mapping: dict[str, str]) -> None:
    """Move ``option``'s keys (HuggingFaceEmbeddings style) onto ragen's own fields in ``data``."""
    if given is None:
        return
    if not isinstance(given, dict):
        raise RagenError(f"{option} must be a dict, got {type(given).__name__}")
    for key, value in given.items():
        field = mapping.get(key)
        if field is None:
            if key == "show_progress_bar" and not value:
                continue  # asking for no progress bar is what ragen does anyway
            hint = _REFUSED.get(key)
            accepted = ", ".join(sorted(mapping))
            raise RagenError(f"{option}[{key!r}] is not supported by LLM2VecGenEmbeddings"
                             + (f"; use {hint}" if hint else "") + f" (accepted {option} keys: {accepted})")
        if field == "dtype":
            value = _dtype_name(value)
        if data.get(field) is not None and data[field] != value:
            raise RagenError(f"{field}={data[field]!r} and {option}[{key!r}]={value!r} disagree; pass one of them")
        data[field] = value


class LLM2VecGenEmbeddings(BaseModel, Embeddings):
    """An LLM2Vec-Gen (or baseline) encoder as a LangChain embedding model.

    Same arguments and semantics as :class:`ragen.integrations.llama_index.LLM2VecGenEmbedding` (which
    names the document side ``text_instruction``); instances naming the same model share one loaded model
    with each other and with the LlamaIndex adapter. ``LLM2VecGenEmbeddings(**e.model_dump())`` rebuilds
    ``e`` (an instance made from ``encoder=`` dumps that encoder's spec as ``model_name``).
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())

    model_name: str | None = Field(default=None, description="Encoder spec: checkpoint dir, hub id, minilm, st:NAME.")
    base_model: str | None = Field(default=None, description="Backbone override for LLM2Vec-Gen checkpoints.")
    device: str | None = Field(default=None, description="cpu, cuda, cuda:N; None picks a GPU when present.")
    dtype: str | None = Field(default=None, description="float32, bfloat16, float16; None: bf16 on GPU, fp32 on CPU.")
    query_instruction: str | None = Field(default=None, description="None: the encoder's query instruction.")
    document_instruction: str | None = Field(default=None, description="None: the encoder's document instruction.")
    batch_size: int = 32
    max_length: int = Field(default=512, description="Token limit of every input (all encoder kinds).")
    normalize: bool = Field(default=True, description="L2-normalise vectors (cosine = inner product).")
    model_kwargs: dict[str, Any] | None = Field(default=None,
                                                description="HuggingFaceEmbeddings spelling: device, dtype.")
    encode_kwargs: dict[str, Any] | None = Field(
        default=None, description="HuggingFaceEmbeddings spelling: batch_size, normalize_embeddings.")
    encoder: Any = Field(default=None, exclude=True, repr=False, description="An already loaded ragen encoder.")

    def __init__(self, model_name: str | None = None, **fields: Any) -> None:
        try:
            super().__init__(model_name=model_name, **fields)
        except ValidationError as exc:
            raise _one_line(type(self).__name__, exc) from None

    @model_validator(mode="before")
    @classmethod
    def _huggingface_spellings(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        _fold(data, "model_kwargs", data.get("model_kwargs"), _MODEL_KWARGS)
        _fold(data, "encode_kwargs", data.get("encode_kwargs"), _ENCODE_KWARGS)
        if data.get("dtype") is not None:
            data["dtype"] = _dtype_name(data["dtype"])
        return data

    def model_post_init(self, __context: Any) -> None:
        if self.model_name is None and self.encoder is None:
            raise RagenError("LLM2VecGenEmbeddings needs exactly one of model_name (an encoder spec) or encoder")
        if self.model_name is not None and self.encoder is not None and self.model_name != self.encoder.spec:
            raise RagenError("LLM2VecGenEmbeddings needs exactly one of model_name (an encoder spec) or encoder "
                             "(both only when model_name is that encoder's spec)")
        _ = self.settings  # validate now, not at the first embed
        if self.encoder is None:
            self.encoder = shared_encoder(self.model_name, base_model=self.base_model, device=self.device,
                                          dtype=self.dtype)
        if self.model_name is None:
            self.model_name = str(self.encoder.spec)

    @property
    def settings(self) -> EmbedSettings:
        """Built from the fields on every call, so ``model_copy(update=...)`` takes effect."""
        return EmbedSettings(query_instruction=self.query_instruction, document_instruction=self.document_instruction,
                             batch_size=self.batch_size, max_length=self.max_length, normalize=self.normalize)

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


# ----------------------------------------------------------------------------------------------------------
# filters
# ----------------------------------------------------------------------------------------------------------
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "$eq": lambda a, b: a == b,
    "$ne": lambda a, b: a != b,
    "$gt": lambda a, b: a > b,
    "$gte": lambda a, b: a >= b,
    "$lt": lambda a, b: a < b,
    "$lte": lambda a, b: a <= b,
    "$in": lambda a, b: a in b,
    "$nin": lambda a, b: a not in b,
    "$contains": lambda a, b: isinstance(a, str) and str(b) in a,
}


def _condition(key: str, spec: Any, keys: tuple[str, ...] | None) -> Callable[[dict], bool]:
    if keys is not None:
        check_filter_key(key)
    if isinstance(spec, dict):
        tests = []
        for op, wanted in spec.items():
            if op not in _OPS:
                raise RagenError(f"unknown filter operator {op!r} for {key!r}; expected one of {', '.join(_OPS)}")
            if op in ("$in", "$nin") and not isinstance(wanted, (list, tuple, set)):
                raise RagenError(f"the {op} filter on {key!r} needs a list of values, got {wanted!r}")
            tests.append((op, _OPS[op], wanted))

        def test(meta: dict) -> bool:
            value = meta.get(key)
            if value is None:  # a missing key matches only $ne / $nin
                return all(op in ("$ne", "$nin") or (op == "$eq" and wanted is None) for op, _, wanted in tests)
            try:
                return all(fn(value, wanted) for _, fn, wanted in tests)
            except TypeError:
                raise RagenError(f"filter on {key!r}: cannot compare {value!r} with {spec!r}") from None

        return test
    if isinstance(spec, (list, tuple, set)):  # LangChain's FAISS store: a list means "one of"
        return lambda meta: meta.get(key) in spec
    return lambda meta: meta.get(key) == spec


def _dict_filter(spec: dict, keys: tuple[str, ...] | None) -> Callable[[dict], bool]:
    parts: list[Callable[[dict], bool]] = []
    for key, value in spec.items():
        if key in ("$and", "$or"):
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, dict) for v in value):
                raise RagenError(f"{key} takes a list of filter dicts, got {value!r}")
            subs = [_dict_filter(v, keys) for v in value]
            parts.append((lambda m, subs=subs: all(s(m) for s in subs)) if key == "$and"
                         else (lambda m, subs=subs: any(s(m) for s in subs)))
        elif key == "$not":
            if not isinstance(value, dict):
                raise RagenError(f"$not takes one filter dict, got {value!r}")
            sub = _dict_filter(value, keys)
            parts.append(lambda m, sub=sub: not sub(m))
        else:
            parts.append(_condition(key, value, keys))
    return lambda meta: all(p(meta) for p in parts)


def compile_filter(spec: Any, *, keys: tuple[str, ...] | None = HIT_METADATA_KEYS
                   ) -> Callable[[dict, Callable[[], Document]], bool] | None:
    """A predicate ``(metadata, make_document) -> bool`` for a LangChain-style ``filter``: a dict over the
    metadata (``keys``: the only keys there are, checked up front; ``None``: any) or a callable taking a
    ``Document``."""
    if spec is None:
        return None
    if callable(spec):
        return lambda meta, make_document: bool(spec(make_document()))
    if isinstance(spec, dict):
        test = _dict_filter(spec, keys)
        return lambda meta, make_document: test(meta)
    known = ", ".join(keys) if keys else "the metadata"
    raise RagenError(f"filter must be a dict over {known} or a callable taking a Document, got {type(spec).__name__}")


def _document(hit: Any) -> Document:
    return Document(page_content=hit.text, metadata=hit_metadata(hit), id=hit.chunk_id)


def _hit_keep(spec: Any) -> Callable[[Any], bool] | None:
    pred = compile_filter(spec)
    if pred is None:
        return None
    return lambda hit: pred(hit_fields(hit), lambda: _document(hit))


def _check_k(k: Any) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise RagenError(f"k must be a positive integer, got {k!r}")
    return k


# ----------------------------------------------------------------------------------------------------------
# retriever over a ragen index
# ----------------------------------------------------------------------------------------------------------
class RagenLangChainRetriever(BaseRetriever):
    """A LangChain retriever over an index built with ``ragen index`` (no re-embedding).

    ``index`` is an index directory (opened with ``Retriever.open(index, model=model, device=device)``) or an
    open ``ragen.retriever.Retriever``; ``k`` results per query, in ragen's order; ``filter`` as described in
    the module docstring. ``invoke(query, k=2, filter={...})`` overrides both for one call.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    index: Any = Field(description="An index directory or an open ragen Retriever.")
    k: int = 4
    filter: Any = Field(default=None, description="Metadata filter: dict over path/chunk_id/start/end, or callable.")
    model: str | None = Field(default=None, description="Encoder spec to query with instead of the index's own.")
    device: str | None = None

    _retriever: Any = PrivateAttr()

    def __init__(self, index: Any = None, **fields: Any) -> None:
        try:
            super().__init__(index=index, **fields)
        except ValidationError as exc:
            raise _one_line(type(self).__name__, exc) from None

    def model_post_init(self, __context: Any) -> None:
        _check_k(self.k)
        _hit_keep(self.filter)  # validate now, not at the first search
        self._retriever = open_index(self.index, model=self.model, device=self.device)

    @property
    def retriever(self) -> Any:
        """The underlying ``ragen.retriever.Retriever``."""
        return self._retriever

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: int | None = None, filter: Any = None) -> list[Document]:
        keep = _hit_keep(self.filter if filter is None else filter)  # from the fields: model_copy(update=) counts
        hits = search_filtered(self._retriever, query, self.k if k is None else _check_k(k), keep)
        return [_document(hit) for hit in hits]

    async def _aget_relevant_documents(self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun,
                                       k: int | None = None, filter: Any = None) -> list[Document]:
        return await asyncio.to_thread(self._get_relevant_documents, query, run_manager=run_manager.get_sync(),
                                       k=k, filter=filter)


# ----------------------------------------------------------------------------------------------------------
# a full read-write vector store over a ragen index
# ----------------------------------------------------------------------------------------------------------
class RagenVectorStore(VectorStore):
    """A LangChain ``VectorStore`` that *is* a ragen index (SQLite + FAISS): the directory ``ragen index``
    writes and ``ragen query`` reads, created when absent.

    ``add_texts``/``add_documents`` (an existing id is replaced), ``delete(ids=...)`` or
    ``delete(filter=...)``, ``get_by_ids``, ``similarity_search[_with_score|_by_vector]`` with ``filter``
    (dict or ``Document`` callable, over the texts' own metadata and ``path``/``chunk_id``/``start``/``end``),
    and ``as_retriever(search_kwargs={"k": 2, "filter": {...}})``. Scores are cosine similarities. A text's
    ``metadata["path"]`` (else ``["source"]``, else its id) is its document in the index, so chunks of one
    file can share a path. Each call is one atomic commit.

    ``embedding``: an :class:`LLM2VecGenEmbeddings`; it records the encoder in a new index (so
    ``ragen query`` can embed queries) and must match an existing one. Metadata lives beside the index in
    ``framework_nodes.sqlite``; see ``ragen.integrations._index_store`` for what a later ``ragen index
    FOLDER`` run does to these texts.
    """

    def __init__(self, index_dir: str | os.PathLike[str], embedding: Embeddings) -> None:
        encoder = getattr(embedding, "encoder", None)
        if encoder is None or not all(hasattr(encoder, a) for a in ("spec", "fingerprint", "dim")):
            raise RagenError(f"embedding must be an LLM2VecGenEmbeddings (a ragen encoder), got "
                             f"{type(embedding).__name__}: the index records the encoder that made its vectors")
        from ..retriever import encoder_info

        self.index_dir = str(index_dir)
        self._embedding = embedding
        self._core = IndexStore(index_dir, encoder=encoder_info(encoder))

    @property
    def embeddings(self) -> Embeddings:
        return self._embedding

    @classmethod
    def from_texts(cls, texts: list[str], embedding: Embeddings, metadatas: list[dict] | None = None, *,
                   ids: list[str] | None = None, index_dir: str | os.PathLike[str] | None = None,
                   **kwargs: Any) -> RagenVectorStore:
        if index_dir is None:
            raise RagenError("RagenVectorStore.from_texts needs index_dir= (the ragen index directory to write)")
        _no_extra("from_texts", kwargs)
        store = cls(index_dir, embedding)
        store.add_texts(texts, metadatas, ids=ids)
        return store

    def add_texts(self, texts: Iterable[str], metadatas: list[dict] | None = None, *, ids: list[str] | None = None,
                  **kwargs: Any) -> list[str]:
        _no_extra("add_texts", kwargs)
        texts = list(texts)
        if metadatas is not None and len(metadatas) != len(texts):
            raise RagenError(f"got {len(metadatas)} metadatas for {len(texts)} texts")
        if ids is not None and len(ids) != len(texts):
            raise RagenError(f"got {len(ids)} ids for {len(texts)} texts")
        ids = [i if i else str(uuid.uuid4()) for i in (ids or [None] * len(texts))]
        if not texts:
            return []
        vectors = self._embedding.embed_documents(texts)
        records = []
        for text, meta, cid, vec in zip(texts, metadatas or [{}] * len(texts), ids, vectors):
            meta = dict(meta or {})
            path = str(meta.get("path") or meta.get("source") or cid)
            records.append(NodeRecord(chunk_id=str(cid), path=path, text=text, vector=np.asarray(vec, np.float32),
                                      metadata=meta))
        self._core.write(add=records)
        return [r.chunk_id for r in records]

    def delete(self, ids: list[str] | None = None, *, filter: Any = None, **kwargs: Any) -> bool:
        _no_extra("delete", kwargs)
        if ids is None and filter is None:
            raise RagenError("delete needs ids or filter=; deleting everything takes filter={} explicitly")
        keep = _node_keep(filter) if filter else None
        doomed = self._core.get(ids, keep)
        self._core.write(delete_ids=[n.chunk_id for n in doomed])
        return True

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        return [_node_document(n) for n in self._core.get(ids)]

    def similarity_search_with_score(self, query: str, k: int = 4, *, filter: Any = None,
                                     **kwargs: Any) -> list[tuple[Document, float]]:
        _no_extra("similarity_search_with_score", kwargs)
        return self.similarity_search_with_score_by_vector(self._embedding.embed_query(query), k, filter=filter)

    def similarity_search_with_score_by_vector(self, embedding: list[float], k: int = 4, *, filter: Any = None,
                                               **kwargs: Any) -> list[tuple[Document, float]]:
        _no_extra("similarity_search_with_score_by_vector", kwargs)
        found = self._core.search(np.asarray(embedding, dtype=np.float32), _check_k(k), _node_keep(filter))
        return [(_node_document(n), n.score) for n in found]

    def similarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score(query, k, **kwargs)]

    def similarity_search_by_vector(self, embedding: list[float], k: int = 4, **kwargs: Any) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score_by_vector(embedding, k, **kwargs)]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        return lambda score: min(1.0, max(0.0, (1.0 + score) / 2.0))  # cosine similarity -> [0, 1]


def _no_extra(method: str, kwargs: dict) -> None:
    if kwargs:
        raise RagenError(f"RagenVectorStore.{method} got unsupported arguments: {', '.join(sorted(kwargs))}")


def _node_document(n: StoredNode) -> Document:
    return Document(page_content=n.text, metadata=n.fields, id=n.chunk_id)


def _node_keep(spec: Any) -> Callable[[StoredNode], bool] | None:
    pred = compile_filter(spec, keys=None)
    if pred is None:
        return None
    return lambda n: pred(n.fields, lambda: _node_document(n))


__all__ = ["LLM2VecGenEmbeddings", "RagenLangChainRetriever", "RagenVectorStore", "compile_filter"]
