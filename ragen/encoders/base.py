"""The encoder protocol and helpers shared by every encoder implementation."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

DEFAULT_QUERY_INSTRUCTION = "Generate a passage that best answers this question: "
DEFAULT_DOCUMENT_INSTRUCTION = "Summarize the following passage: "


@runtime_checkable
class Encoder(Protocol):
    """What the store, retriever, integrations and benchmarks need from an encoder.

    Both ``encode_*`` methods return a float32 array of shape ``(len(texts), dim)``, rows in input order.
    ``fingerprint`` identifies the exact function the encoder computes: an index built with one
    encoder can only be queried with an encoder of the same fingerprint.
    """

    @property
    def dim(self) -> int: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def spec(self) -> str: ...

    def encode_queries(
        self, texts: Sequence[str], *, batch_size: int = 32, normalize: bool = False
    ) -> np.ndarray: ...

    def encode_documents(
        self, texts: Sequence[str], *, batch_size: int = 32, normalize: bool = False
    ) -> np.ndarray: ...


@dataclass(frozen=True)
class TokenBudget:
    """How a document's text meets the encoder's input limit, for token-aware chunking.

    ``tokenizer``: the encoder's own ``tokenizers.Tokenizer`` (a copy; truncation and padding off).
    ``limit``: input tokens the encoder embeds (longer inputs are truncated). ``overhead``: tokens every
    document input spends besides its text (the document instruction or prompt, LLM2Vec-Gen's K special
    tokens, BOS/CLS/SEP). ``prefix``/``suffix``: the text the encoder puts around a document.
    Optional encoder method ``document_token_budget()`` returns one; :func:`token_budget` asks for it.
    """

    tokenizer: Any
    limit: int
    overhead: int
    prefix: str = ""
    suffix: str = ""
    add_special_tokens: bool = True
    name: str = ""

    @property
    def max_text_tokens(self) -> int:
        """Tokens of document text that fit: the limit minus the overhead (at least 1)."""
        return max(1, self.limit - self.overhead)

    def input_lengths(self, texts: Sequence[str]) -> list[int]:
        """Untruncated input length in tokens of each document text, exactly as the encoder builds it."""
        encs = self.tokenizer.encode_batch([self.prefix + t + self.suffix for t in clean_texts(texts)],
                                           add_special_tokens=self.add_special_tokens)
        return [len(e.ids) for e in encs]

    def truncated(self, texts: Sequence[str]) -> int:
        """How many of ``texts`` exceed the limit, i.e. lose their end when embedded."""
        return sum(1 for n in self.input_lengths(texts) if n > self.limit) if texts else 0


def make_token_budget(hf_tokenizer: Any, limit: int, *, prefix: str = "", suffix: str = "",
                      add_special_tokens: bool = True, name: str = "") -> TokenBudget | None:
    """A :class:`TokenBudget` from a transformers tokenizer (None for a slow one with no Rust backend)."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(backend.to_str())  # a copy: the encoder's own tokenizer keeps its settings
    tok.no_truncation()
    tok.no_padding()
    overhead = len(tok.encode(prefix + suffix, add_special_tokens=add_special_tokens).ids)
    return TokenBudget(tokenizer=tok, limit=int(limit), overhead=overhead, prefix=prefix, suffix=suffix,
                       add_special_tokens=add_special_tokens, name=name)


def token_budget(encoder: object) -> TokenBudget | None:
    """The encoder's :class:`TokenBudget`, or None when it exposes no tokenizer (``document_token_budget``)."""
    method = getattr(encoder, "document_token_budget", None)
    return method() if callable(method) else None


def accepts_keyword(method: object, name: str) -> bool:
    """Whether a callable takes the keyword argument ``name``."""
    import inspect

    try:
        return name in inspect.signature(method).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def takes_instructions(encoder: Encoder) -> bool:
    """Whether the encoder applies instructions itself (``encode_queries(..., instruction=...)``, as
    LLM2Vec-Gen does). Input-centric baselines don't: callers either embed raw text or prefix it."""
    return accepts_keyword(encoder.encode_queries, "instruction") and accepts_keyword(encoder.encode_documents,
                                                                                     "instruction")


def mps_available() -> bool:
    """Whether Apple's Metal backend is usable (False on builds without it, and where the check fails)."""
    import torch

    backend = getattr(getattr(torch, "backends", None), "mps", None)
    is_available = getattr(backend, "is_available", None)
    if not callable(is_available):
        return False
    try:
        return bool(is_available())
    except (RuntimeError, OSError):  # a broken Metal install reports itself this way
        return False


def resolve_device(device: str | None) -> str:
    """``None``/``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"mps"`` on Apple silicon, else
    ``"cpu"``; anything else as given (checked)."""
    import torch

    if device is None or device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if mps_available() else "cpu"
    from ..errors import RagenError

    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise RagenError(f"unknown device {device!r}; expected auto, cpu, cuda, cuda:N, mps or another torch device") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RagenError(f"device {device!r} was requested but no CUDA device is available; use --device cpu")
    if device.startswith("mps") and not mps_available():
        raise RagenError(f"device {device!r} was requested but Apple's MPS backend is not available; use --device cpu")
    return device


_SURROGATES = re.compile("[\ud800-\udfff]")


def clean_texts(texts: Sequence[str] | str) -> list[str]:
    """Validate a batch of texts and replace lone surrogates (e.g. undecodable bytes smuggled in through
    ``surrogateescape``) with U+FFFD, so tokenizers never see a string they cannot encode."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string; wrap it in a list")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    return [_SURROGATES.sub("\ufffd", t) if _SURROGATES.search(t) else t for t in texts]


def decode_instruction(encoder: object, instruction: str | None = None, *, kind: str = "query") -> str:
    """The instruction under which a text's embedding is decoded or explained: ONE rule for ``ragen
    decode`` and ``ragen query --explain``.

    An explicit ``instruction`` wins (``""`` decodes the bare text, as the reference's ``generate`` does);
    otherwise the encoder's own instruction for ``kind`` (query or document), i.e. exactly the vector that
    retrieval compares. Encoders without instructions give ``""``.
    """
    if instruction is not None:
        return instruction
    if kind not in ("query", "document"):
        from ..errors import RagenError

        raise RagenError(f"kind must be query or document, got {kind!r}")
    value = getattr(encoder, f"{kind}_instruction", None)
    return value if isinstance(value, str) else ""


_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


def resolve_dtype(dtype: object, device: str):
    """``None``/``"auto"`` -> bf16 on CUDA, float32 elsewhere. Accepts torch dtypes or their names."""
    import torch

    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        from ..errors import RagenError

        raise RagenError(f"unknown dtype {dtype!r}; expected one of: auto, {', '.join(sorted(set(_DTYPES.values())))}")
    return getattr(torch, _DTYPES[name])


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Yield index batches, longest inputs first, so each batch pads to a similar length.

    Sorting removes most padding compute; callers scatter results back by index, so output order is
    unaffected. Longest first also surfaces an out-of-memory error on the first batch, not the last.
    """
    if batch_size < 1:
        from ..errors import RagenError

        raise RagenError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation; zero rows stay zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def hash_parts(*parts: object) -> str:
    """A short stable hex digest over JSON-able values and byte strings."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, (bytes, bytearray, memoryview)):
            h.update(bytes(part))
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def tensor_digest_bytes(tensor) -> bytes:
    """Bytes of a tensor rounded to bfloat16, so the same weights give the same digest in any dtype.

    An index built in bf16 on a GPU must accept queries from the same model in float32 on a CPU.
    """
    import torch

    t = tensor.detach().to("cpu", torch.float32).to(torch.bfloat16).view(torch.int16)
    return t.contiguous().numpy().tobytes()
