"""What the LlamaIndex and LangChain adapters share: one model cache and one ``embed`` path.

Both adapters resolve their ``model_name`` through :func:`shared_encoder`, so every adapter instance that
names the same checkpoint (same spec, base model, device and dtype) uses one loaded model, and both
embed through :func:`embed`, so a LlamaIndex vector and a LangChain vector of the same text are the same
array that ``Encoder.encode_queries`` / ``encode_documents`` returns.

Instructions. LLM2Vec-Gen encoders take an instruction per call (``encode_queries(..., instruction=...)``);
``None`` means the encoder's own default (``query_instruction`` / ``document_instruction``), ``""`` means
none. Input-centric baselines (``minilm``, ``st:...``, ``mean:...``) have no instruction parameter: there a
non-empty instruction is prepended to every text, exactly as LLM2Vec-Gen applies its instruction, so a
value the user sets is never silently dropped. Their default is no instruction.

``max_length`` caps the input of every encoder, in its own tokens: LLM2Vec-Gen truncates the text so its
special tokens survive; sentence-transformers baselines (``minilm``, ``st:...``) truncate at
``min(max_length, the model's max_seq_length)``, as ``HuggingFaceEmbedding(max_length=...)`` does;
mean-pooling baselines at ``max_length``.

Metadata filters. A ragen index knows four things about each chunk: ``path`` (relative to the indexed
folder), ``chunk_id`` (``"<path>#<position>"``), ``start`` and ``end`` (character offsets into the file).
Both retrievers filter on these (:func:`search_filtered`), after the FAISS search, fetching more candidates
until ``k`` chunks pass or the whole index has been searched.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..encoders import load_encoder
from ..encoders.base import Encoder, accepts_keyword, resolve_device, takes_instructions
from ..errors import RagenError

logger = logging.getLogger(__name__)

Kind = Literal["query", "document"]

# One loaded model per (spec, base_model, device, dtype), held only while some adapter uses it.
_MODELS: weakref.WeakValueDictionary[tuple[str, str | None, str, str | None], Encoder] = weakref.WeakValueDictionary()
_MODELS_LOCK = threading.Lock()
# One lock per encoder object: encodes run in worker threads (the async paths), and a Hugging Face fast
# tokenizer must not be entered from two threads at once; on one device the forward passes would
# serialise anyway.
_ENCODE_LOCKS: weakref.WeakKeyDictionary[object, threading.Lock] = weakref.WeakKeyDictionary()
_ENCODE_LOCKS_LOCK = threading.Lock()  # separate from _MODELS_LOCK: a long model load must not stall encodes


def _canonical(spec: str | None) -> str | None:
    """Local paths by absolute location, so ``./ckpt`` and ``/abs/ckpt`` share one model; others as given."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def shared_encoder(spec: str, *, base_model: str | None = None, device: str | None = None,
                   dtype: str | None = None) -> Encoder:
    """The loaded encoder for ``spec``: from the cache when another adapter already loaded it."""
    if not isinstance(spec, str) or not spec.strip():
        raise RagenError(f"model_name must be an encoder spec string, got {spec!r}")
    key = (_canonical(spec.strip()), _canonical(base_model), resolve_device(device), dtype)
    with _MODELS_LOCK:  # held while loading, so two threads never load the same checkpoint twice
        encoder = _MODELS.get(key)
        if encoder is None:
            logger.info("loading encoder %s (base_model=%s, device=%s, dtype=%s)", *key)
            encoder = load_encoder(spec.strip(), device=key[2], dtype=dtype, base_model=base_model)
            _MODELS[key] = encoder
        return encoder


def encode_lock(encoder: object) -> threading.Lock:
    with _ENCODE_LOCKS_LOCK:
        lock = _ENCODE_LOCKS.get(encoder)
        if lock is None:
            lock = _ENCODE_LOCKS[encoder] = threading.Lock()
        return lock


@dataclass(frozen=True)
class EmbedSettings:
    """How texts are embedded; ``None`` instructions mean the encoder's defaults."""

    query_instruction: str | None = None
    document_instruction: str | None = None
    batch_size: int = 32
    max_length: int = 512
    normalize: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise RagenError(f"batch size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.max_length, int) or self.max_length < 1:
            raise RagenError(f"max_length must be a positive integer, got {self.max_length!r}")
        for name in ("query_instruction", "document_instruction"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise RagenError(f"{name} must be a string or None, got {type(value).__name__}")


def embed(encoder: Encoder, texts: Sequence[str], kind: Kind, settings: EmbedSettings) -> np.ndarray:
    """Embed ``texts`` as queries or documents: float32 ``(len(texts), dim)``; the one path both adapters use."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string; wrap it in a list")
    texts = list(texts)
    if not texts:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    method = encoder.encode_queries if kind == "query" else encoder.encode_documents
    instruction = settings.query_instruction if kind == "query" else settings.document_instruction
    with encode_lock(encoder):
        if takes_instructions(encoder):
            if accepts_keyword(method, "max_length"):
                return method(texts, instruction=instruction, batch_size=settings.batch_size,  # type: ignore[call-arg]
                              max_length=settings.max_length, normalize=settings.normalize)
            return method(texts, instruction=instruction, batch_size=settings.batch_size,  # type: ignore[call-arg]
                          normalize=settings.normalize)
        if instruction:
            texts = [instruction + t for t in texts]
        if accepts_keyword(method, "max_length"):
            return method(texts, batch_size=settings.batch_size, max_length=settings.max_length,  # type: ignore[call-arg]
                          normalize=settings.normalize)
        return method(texts, batch_size=settings.batch_size, normalize=settings.normalize)


def open_index(index: object, *, model: str | None = None, device: str | None = None):
    """A :class:`ragen.retriever.Retriever` from an index directory, or ``index`` itself if it is one.

    ``model``: an encoder spec to query with instead of the one recorded in the index (it must compute the
    same function, e.g. the same checkpoint at another path); ``device``: for the model and the FAISS index.
    """
    from ..retriever import Retriever

    if isinstance(index, Retriever):
        if model is not None or device is not None:
            raise RagenError("model/device apply when opening an index directory; this Retriever is already open")
        return index
    if isinstance(index, (str, Path)):
        from ..retriever import read_manifest

        # Load the model through the shared cache, so an embedding adapter on the same checkpoint and this
        # retriever hold one copy; Retriever.open still checks its fingerprint against the index.
        spec = model or str(read_manifest(index)["encoder"]["spec"])
        return Retriever.open(index, encoder=shared_encoder(spec, device=device), device=device)
    raise RagenError(f"expected an index directory or a ragen Retriever, got {type(index).__name__}")


HIT_METADATA_KEYS = ("path", "chunk_id", "start", "end")  # what a ragen index stores per chunk


def check_filter_key(key: object) -> str:
    if key not in HIT_METADATA_KEYS:
        raise RagenError(f"cannot filter on metadata key {key!r}: a ragen index stores only "
                         f"{', '.join(HIT_METADATA_KEYS)} per chunk")
    return str(key)


def search_filtered(retriever, query: str | np.ndarray, k: int, keep: Callable[[Any], bool] | None = None) -> list:
    """The ``k`` best hits of ``retriever`` for a query string or ``(dim,)`` query vector that pass ``keep``
    (a predicate over a :class:`~ragen.types.Hit`); ranks renumbered from 1. Without ``keep``: plain search.

    Filters run after the FAISS search: the candidate pool grows (x4 each round) until ``k`` hits pass or
    the whole index has been searched, so a selective filter costs more searches, never missing results."""
    with encode_lock(retriever.encoder):
        if isinstance(query, str):
            if keep is None:
                return retriever.search(query, k=k)
            vector = retriever.encoder.encode_queries([query], normalize=True)[0]  # what Retriever.search does
        else:
            vector = np.asarray(query, dtype=np.float32)
    if keep is None:
        return retriever.search_vector(vector, k=k)
    total = int(retriever.store.count)
    fetch = min(total, max(4 * k, 64))
    while True:
        hits = retriever.search_vector(vector, k=max(fetch, 1))
        kept = [h for h in hits if keep(h)]
        if len(kept) >= k or fetch >= total:
            break
        fetch = min(total, fetch * 4)
    return [dataclasses.replace(h, rank=i + 1) for i, h in enumerate(kept[:k])]


def hit_fields(hit) -> dict:
    """The metadata a ragen index stores for a hit's chunk (:data:`HIT_METADATA_KEYS`)."""
    return {key: getattr(hit, key) for key in HIT_METADATA_KEYS}


def hit_metadata(hit) -> dict:
    """Metadata both adapters attach to a ragen hit."""
    return {"path": hit.path, "chunk_id": hit.chunk_id, "start": hit.start, "end": hit.end,
            "score": float(hit.score), "rank": hit.rank}


def generator_for(model_name: str | None, encoder: Any, embedding: Any, *, base_model: str | None,
                  device: str | None, dtype: str | None) -> tuple[Any, Any]:
    """The encoder (from ``embedding``, ``encoder`` or the shared cache) and a generator on its own ``lm``,
    locked together with the embedding side: the one constructor of both frameworks' LLM classes."""
    from ..rag import ChatGenerator

    given = [x is not None for x in (model_name, encoder, embedding)]
    if sum(given) != 1:
        raise RagenError("pass exactly one of model_name (an LLM2Vec-Gen spec), encoder, or embedding "
                         "(an LLM2VecGenEmbedding/LLM2VecGenEmbeddings whose model should also answer)")
    if embedding is not None:
        encoder = getattr(embedding, "encoder", None)
        if encoder is None:
            raise RagenError(f"embedding= must be a ragen embedding adapter, got {type(embedding).__name__}")
    if encoder is None:
        encoder = shared_encoder(model_name, base_model=base_model, device=device, dtype=dtype)  # type: ignore[arg-type]
    return encoder, ChatGenerator.from_encoder(encoder, lock=encode_lock(encoder))


__all__ = ["EmbedSettings", "embed", "shared_encoder", "encode_lock", "takes_instructions", "open_index",
           "generator_for", "hit_metadata", "hit_fields", "search_filtered", "check_filter_key", "HIT_METADATA_KEYS"]
