"""Token counts for limits, usage and batching, without touching the model's own tokenizer.

The inference thread uses the encoder's tokenizer; a Hugging Face fast tokenizer must not be entered from
two threads at once, so the server counts with an independent copy of the Rust tokenizer (built from its
JSON), with truncation and padding off. Tokenizers without a Rust backend fall back to an estimate of
one token per four characters.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

logger = logging.getLogger(__name__)


def _hf_tokenizer(encoder):
    tok = getattr(encoder, "tokenizer", None)
    if tok is None:
        tok = getattr(getattr(encoder, "model", None), "tokenizer", None)
    return tok


def model_max_length(encoder) -> int:
    """The input length (tokens) the encoder's ``encode_*`` truncates to by default."""
    model = getattr(encoder, "model", None)
    if model is not None and isinstance(getattr(model, "max_seq_length", None), int):  # sentence-transformers
        return int(model.max_seq_length)
    if isinstance(getattr(encoder, "max_length", None), int):  # PooledEncoder
        return int(encoder.max_length)
    return 512  # LLM2VecGen.encode's default max_length


class TokenCounter:
    """Counts a text's own tokens and estimates its model input length (with instruction and markers)."""

    def __init__(self, encoder) -> None:
        self.max_length = model_max_length(encoder)
        self._backend = None
        tok = _hf_tokenizer(encoder)
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers import Tokenizer

            self._backend = Tokenizer.from_str(backend.to_str())
            self._backend.no_truncation()
            self._backend.no_padding()
        else:
            logger.info("no fast tokenizer on %s: token counts are estimates (4 characters per token)",
                        type(encoder).__name__)
        # Tokens every input carries besides its text: the special tokens of LLM2Vec-Gen, [CLS]/[SEP], ...
        self._markers = len(getattr(encoder, "special_ids", ())) + 2
        self._instruction_cache: dict[str, int] = {}

    @property
    def exact(self) -> bool:
        return self._backend is not None

    def count(self, texts: Sequence[str]) -> list[int]:
        """Each text's own token count (no special tokens, no truncation)."""
        if not texts:
            return []
        if self._backend is None:
            return [max(1, -(-len(t) // 4)) if t else 0 for t in texts]
        return [len(e.ids) for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def input_length(self, own_tokens: int, instruction: str | None) -> int:
        """Estimated model input length of a text with ``own_tokens`` tokens: what batching pads to."""
        extra = 0
        if instruction:
            extra = self._instruction_cache.get(instruction)
            if extra is None:
                extra = self._instruction_cache[instruction] = self.count([instruction])[0]
        return max(1, min(own_tokens + extra + self._markers, self.max_length))


__all__ = ["TokenCounter", "model_max_length"]
