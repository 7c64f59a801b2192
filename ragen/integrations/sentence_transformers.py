"""An LLM2Vec-Gen (or baseline) encoder where a ``SentenceTransformer`` is expected.

:class:`LLM2VecGenSentenceTransformer` has the parts of the ``SentenceTransformer`` API that evaluators,
mteb 1.x scripts and retrieval tools call: ``encode`` (``prompt_name``/``prompt``, ``batch_size``,
``normalize_embeddings``, ``convert_to_numpy``/``convert_to_tensor``, ``truncate_dim``,
``show_progress_bar``), ``encode_query``/``encode_document``, the older ``encode_queries``/``encode_corpus``,
``similarity``/``similarity_pairwise`` (cosine), ``get_sentence_embedding_dimension`` and ``max_seq_length``.

Faithful to LLM2Vec-Gen. The vectors are the ones ``Encoder.encode_queries``/``encode_documents`` compute:

- ``encode_query`` and ``encode(..., prompt_name="query")`` apply the query instruction
  ("Generate a passage that best answers this question: " by default);
- ``encode_document`` and ``prompt_name="document"`` (or ``"passage"``, ``"corpus"``) the document
  instruction ("Summarize the following passage: ");
- ``encode(texts)`` with neither ``prompt`` nor ``prompt_name`` uses ``default_prompt_name`` = ``"query"``,
  as the reference MTEB wrapper applies the task (query-side) instruction to everything that is not a
  corpus passage (e.g. both sides of an STS pair);
- ``prompt="..."`` is used as the instruction itself (``""``: none); ``prompts={...}`` adds named ones.

For input-centric baselines (``minilm``, ``st:...``) the defaults are no instruction, and a non-empty
prompt is prepended to the text, exactly as sentence-transformers does.

Only torch and numpy are needed (no sentence-transformers install): this is a duck-typed wrapper, not a
``SentenceTransformer`` subclass, so code that checks ``isinstance(model, SentenceTransformer)`` or
trains it will not accept it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..encoders.base import Encoder, takes_instructions
from ..errors import RagenError
from ._shared import EmbedSettings, embed, shared_encoder

logger = logging.getLogger(__name__)

_DOCUMENT_NAMES = ("document", "passage", "corpus")


class EvaluationRecord:
    """Stands in for ``SentenceTransformer.model_card_data``: sentence-transformers evaluators hand their
    metrics to ``set_evaluation_metrics``; they are kept in ``metrics`` (evaluator name, epoch, step, dict)."""

    def __init__(self) -> None:
        self.metrics: list[tuple[str, int, int, dict[str, Any]]] = []

    def set_evaluation_metrics(self, evaluator: Any, metrics: dict[str, Any], epoch: int = 0, step: int = 0) -> None:
        self.metrics.append((type(evaluator).__name__, epoch, step, dict(metrics)))


class LLM2VecGenSentenceTransformer:
    """``model_name_or_path``: an encoder spec (checkpoint directory or hub id, ``minilm``, ``st:NAME``,
    ``mean:BACKBONE``), loaded through the cache the other adapters share; or pass ``encoder=``.
    ``query_instruction``/``document_instruction``: ``None`` keeps the encoder's own. ``max_seq_length``:
    the token limit of every input (LLM2Vec-Gen: 512 as in the reference evaluation)."""

    similarity_fn_name = "cosine"

    def __init__(self, model_name_or_path: str | None = None, *, encoder: Encoder | None = None,
                 device: str | None = None, dtype: str | None = None, base_model: str | None = None,
                 query_instruction: str | None = None, document_instruction: str | None = None,
                 prompts: dict[str, str] | None = None, default_prompt_name: str | None = "query",
                 max_seq_length: int = 512) -> None:
        if (model_name_or_path is None) == (encoder is None):
            raise RagenError("LLM2VecGenSentenceTransformer needs exactly one of model_name_or_path "
                             "(an encoder spec) or encoder")
        if encoder is None:
            encoder = shared_encoder(model_name_or_path, base_model=base_model, device=device,  # type: ignore[arg-type]
                                     dtype=dtype)
        self.encoder = encoder
        self.model_name = model_name_or_path if model_name_or_path is not None else str(encoder.spec)
        EmbedSettings(query_instruction=query_instruction, document_instruction=document_instruction,
                      max_length=max_seq_length)  # validates the three
        self.max_seq_length = max_seq_length
        own = takes_instructions(encoder)
        query = query_instruction if query_instruction is not None else (
            getattr(encoder, "query_instruction", None) or "" if own else "")
        document = document_instruction if document_instruction is not None else (
            getattr(encoder, "document_instruction", None) or "" if own else "")
        self.prompts: dict[str, str] = {"query": query, **{name: document for name in _DOCUMENT_NAMES}}
        for name, text in (prompts or {}).items():
            if not isinstance(name, str) or not isinstance(text, str):
                raise RagenError(f"prompts must map names to instruction strings, got {name!r}: {text!r}")
            self.prompts[name] = text
        if default_prompt_name is not None and default_prompt_name not in self.prompts:
            raise RagenError(f"default_prompt_name {default_prompt_name!r} is not one of the prompts "
                             f"({', '.join(sorted(self.prompts))})")
        self.default_prompt_name = default_prompt_name
        self.model_card_data = EvaluationRecord()

    def __repr__(self) -> str:
        return f"LLM2VecGenSentenceTransformer(model_name={self.model_name!r}, dim={self.encoder.dim})"

    # --- what SentenceTransformer exposes about itself ----------------------------------------------------
    def get_sentence_embedding_dimension(self) -> int:
        return int(self.encoder.dim)

    get_embedding_dimension = get_sentence_embedding_dimension

    def get_max_seq_length(self) -> int:
        return self.max_seq_length

    @property
    def device(self):
        import torch

        return torch.device(str(getattr(self.encoder, "device", "cpu")))

    # --- encoding -----------------------------------------------------------------------------------------
    def encode(self, sentences: str | Sequence[str], prompt_name: str | None = None, prompt: str | None = None,
               batch_size: int = 32, show_progress_bar: bool | None = None,
               output_value: str | None = "sentence_embedding", precision: str | None = "float32",
               convert_to_numpy: bool = True, convert_to_tensor: bool = False, device: str | None = None,
               normalize_embeddings: bool = False, truncate_dim: int | None = None, task_name: str | None = None,
               prompt_type: Any = None):
        """Embed ``sentences`` as sentence-transformers does: a ``(n, dim)`` float32 array (a ``(dim,)``
        one for a single string), a tensor with ``convert_to_tensor=True``, a list of 1-D tensors when both
        conversions are off. ``show_progress_bar`` is accepted; ragen draws no progress bar.

        ``task_name``/``prompt_type``: what mteb 1.x passes to a non-SentenceTransformer model. A passage
        (``prompt_type`` ``"passage"``/``"document"``) gets the document instruction; otherwise the prompt named
        ``task_name`` when ``prompts`` has one (e.g. ``prompts=`` the reference's ``generative.json``), else the
        query instruction."""
        if prompt_name is None and prompt is None:
            side = getattr(prompt_type, "value", prompt_type)
            if side in ("passage", "document"):
                prompt_name = "document"
            elif task_name is not None and task_name in self.prompts:
                prompt_name = task_name
            elif task_name is not None:
                logger.warning("no prompt named %r: using the query instruction", task_name)
                prompt_name = "query"
        if output_value != "sentence_embedding":
            raise RagenError(f"output_value={output_value!r} is not available: LLM2Vec-Gen pools its special tokens "
                             "into one sentence embedding; use output_value='sentence_embedding'")
        if precision not in (None, "float32"):
            raise RagenError(f"precision={precision!r} is not supported; ragen embeds in float32")
        if device is not None and str(device) != str(self.device):
            raise RagenError(f"device={device!r}: this model was loaded on {self.device}; choose the device "
                             "when constructing LLM2VecGenSentenceTransformer(device=...)")
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        kind, instruction = self._instruction(prompt_name, prompt)
        settings = EmbedSettings(query_instruction=instruction, document_instruction=instruction,
                                 batch_size=batch_size, max_length=self.max_seq_length,
                                 normalize=normalize_embeddings and truncate_dim is None)
        vectors = embed(self.encoder, texts, kind, settings)  # (n, dim) float32
        if truncate_dim is not None:
            if not isinstance(truncate_dim, int) or not 0 < truncate_dim <= vectors.shape[1]:
                raise RagenError(f"truncate_dim must be between 1 and {vectors.shape[1]}, got {truncate_dim!r}")
            vectors = np.ascontiguousarray(vectors[:, :truncate_dim])
            if normalize_embeddings:
                vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return self._convert(vectors, single, convert_to_numpy, convert_to_tensor)

    def encode_query(self, sentences: str | Sequence[str], prompt_name: str | None = None, prompt: str | None = None,
                     **options: Any):
        """``encode`` with the query instruction unless ``prompt_name``/``prompt`` says otherwise."""
        if prompt_name is None and prompt is None:
            prompt_name = "query"
        return self.encode(sentences, prompt_name=prompt_name, prompt=prompt, **options)

    def encode_document(self, sentences: str | Sequence[str], prompt_name: str | None = None,
                        prompt: str | None = None, **options: Any):
        """``encode`` with the document instruction unless ``prompt_name``/``prompt`` says otherwise."""
        if prompt_name is None and prompt is None:
            prompt_name = "document"
        return self.encode(sentences, prompt_name=prompt_name, prompt=prompt, **options)

    # the interface of mteb 1.x's dense retrieval (and BEIR's models)
    def encode_queries(self, queries: Sequence[str], batch_size: int = 32, **options: Any):
        return self.encode_query(list(queries), batch_size=batch_size, **options)

    def encode_corpus(self, corpus: Sequence[dict[str, str]] | dict[str, list[str]] | Sequence[str],
                      batch_size: int = 32, **options: Any):
        """Documents as strings or ``{"title", "text"}`` records, joined ``title + " " + text`` and stripped
        (as the reference MTEB wrapper does), with the document instruction."""
        return self.encode_document(_corpus_texts(corpus), batch_size=batch_size, **options)

    def _instruction(self, prompt_name: str | None, prompt: str | None) -> tuple[str, str]:
        """(``query``/``document`` side, the instruction text) for one encode call."""
        if prompt is not None:
            if not isinstance(prompt, str):
                raise RagenError(f"prompt must be a string, got {type(prompt).__name__}")
            side = "document" if prompt_name in _DOCUMENT_NAMES else "query"
            return side, prompt
        name = prompt_name if prompt_name is not None else self.default_prompt_name
        if name is None:
            return "query", ""
        if name not in self.prompts:
            raise RagenError(f"prompt_name {name!r} is not one of the prompts ({', '.join(sorted(self.prompts))})")
        return ("document" if name in _DOCUMENT_NAMES else "query"), self.prompts[name]

    def _convert(self, vectors: np.ndarray, single: bool, convert_to_numpy: bool, convert_to_tensor: bool):
        if convert_to_tensor:
            import torch

            out = torch.from_numpy(vectors)
            return out[0] if single else out
        if convert_to_numpy:
            return vectors[0] if single else vectors
        import torch

        rows = [torch.from_numpy(row.copy()) for row in vectors]
        return rows[0] if single else rows

    # --- similarity ---------------------------------------------------------------------------------------
    def similarity(self, embeddings1, embeddings2):
        """Cosine similarity matrix ``(n1, n2)`` as a float32 tensor (sentence-transformers' default)."""
        import torch

        a, b = _as_matrix(embeddings1), _as_matrix(embeddings2)
        a = torch.nn.functional.normalize(a, dim=-1)
        b = torch.nn.functional.normalize(b, dim=-1)
        return a @ b.T

    def similarity_pairwise(self, embeddings1, embeddings2):
        """Cosine similarity of row ``i`` with row ``i``: a ``(n,)`` float32 tensor."""
        import torch

        a, b = _as_matrix(embeddings1), _as_matrix(embeddings2)
        if a.shape != b.shape:
            raise RagenError(f"similarity_pairwise needs two equally shaped inputs, got {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
        return (torch.nn.functional.normalize(a, dim=-1) * torch.nn.functional.normalize(b, dim=-1)).sum(dim=-1)


def _as_matrix(x):
    import torch

    if isinstance(x, list):
        x = torch.stack([torch.as_tensor(np.asarray(row) if not isinstance(row, torch.Tensor) else row) for row in x])
    t = torch.as_tensor(x).to(torch.float32)
    return t.unsqueeze(0) if t.ndim == 1 else t


def _corpus_texts(corpus) -> list[str]:
    if isinstance(corpus, dict):
        texts = corpus["text"]
        titles = corpus.get("title") or [""] * len(texts)
        return [(title + " " + text).strip() for title, text in zip(titles, texts)]
    out = []
    for doc in corpus:
        if isinstance(doc, str):
            out.append(doc)
        elif isinstance(doc, dict) and "text" in doc:
            out.append((doc.get("title", "") + " " + doc["text"]).strip())
        else:
            raise RagenError(f"corpus entries must be strings or dicts with 'text' (and 'title'), got {doc!r}")
    return out


__all__ = ["LLM2VecGenSentenceTransformer", "EvaluationRecord"]
