"""Training examples and the deterministic batch order.

The examples of optimizer step ``s`` are a pure function of ``(seed, s)``: an endless stream of seeded
per-epoch permutations, cut into global batches. Resuming at step ``s`` therefore needs no saved data
position beyond ``s`` itself, and any number of processes sees the same global batch (each takes its
contiguous slice), which is what makes multi-process losses equal single-process ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import DataError


REFERENCE_SUFFIX = "<|end_of_text|>"


@dataclass(frozen=True)
class Example:
    id: str
    query: str
    response: str
    teacher: np.ndarray  # (D,) float32
    ended: bool = True  # the LLM stopped by itself (finish_reason "stop"), so the response is EOS-terminated


@dataclass(frozen=True)
class Batch:
    query_ids: torch.Tensor  # (B, S) left padded, K special tokens last
    query_mask: torch.Tensor  # (B, S)
    response_ids: torch.Tensor  # (B, T) right padded, EOS-terminated unless truncated
    response_mask: torch.Tensor  # (B, T)
    teacher: torch.Tensor  # (B, D) float32

    @property
    def size(self) -> int:
        return int(self.query_ids.shape[0])


def build_examples(records: list[dict[str, Any]], vectors: np.ndarray) -> list[Example]:
    if len(records) != vectors.shape[0]:
        raise DataError(f"{len(records)} responses but {vectors.shape[0]} teacher vectors; recompute teacher vectors")
    return [Example(str(r["id"]), str(r["query"]), str(r["response"]), vectors[i],
                    ended=r.get("finish_reason", "stop") != "length") for i, r in enumerate(records)]


def split_eval(examples: list[Example], eval_size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out ``eval_size`` examples, chosen by a seeded permutation (stable for a given seed)."""
    if eval_size == 0:
        return examples, []
    if eval_size >= len(examples):
        raise DataError(f"train.eval_size={eval_size} leaves no training examples out of {len(examples)}")
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    held = set(perm[:eval_size])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def global_batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of optimizer step ``step`` (0-based): positions ``[step*B, (step+1)*B)`` of the
    stream ``perm(epoch 0) + perm(epoch 1) + ...``."""
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        take = min(batch_size - len(out), n - offset)
        out.extend(perm[offset:offset + take])
        pos += take
    return out


class Collator:
    """Tokenises examples exactly like inference does (``LLM2VecGen.tokenize``) and pads the responses."""

    def __init__(self, model: Any, *, max_length: int, max_response_length: int, query_instruction: str = "",
                 response_bos: bool = True, response_end: str = "eos") -> None:
        self.model = model
        self.response_bos = response_bos
        self.response_end = response_end
        self.max_length = max_length
        self.max_response_length = max_response_length
        self.query_instruction = query_instruction
        tok = model.tokenizer
        eos = tok.eos_token_id if tok.eos_token_id is not None else model.lm.config.eos_token_id
        if isinstance(eos, (list, tuple)):
            eos = eos[0]
        if eos is None:
            raise DataError(f"{model.base_model}: the tokenizer has no EOS token to terminate responses")
        self.eos_id = int(eos)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        self._response_cache: dict[tuple[str, bool], list[int]] = {}
        self._query_cache: dict[str, list[int]] = {}

    def _text(self, response: str) -> str:
        # The reference appends the literal text "<|end_of_text|>" to every answer: Llama 3's end-of-text
        # token, but plain text pieces for Qwen.
        return response.strip() + (REFERENCE_SUFFIX if self.response_end == "reference" else "")

    def _terminated(self, ids: list[int], ended: bool) -> list[int]:
        """Cut to the limit; EOS only where the LLM really stopped (not when generation hit max_new_tokens,
        and not when the limit cut the response): the decoder must not learn to stop where it did not.
        With ``response_end: reference`` the suffix is already in the text (cut with it, as the reference)."""
        if self.response_end == "reference":
            return ids[: self.max_response_length]
        if len(ids) >= self.max_response_length:
            return ids[: self.max_response_length]
        return ids + [self.eos_id] if ended else ids

    def response_tokens(self, example: Example) -> list[int]:
        key = (example.response, example.ended)
        ids = self._response_cache.get(key)
        if ids is None:
            raw = self.model.tokenizer(self._text(example.response), add_special_tokens=self.response_bos)["input_ids"]
            ids = self._response_cache[key] = self._terminated(raw, example.ended)
        return ids

    def query_tokens(self, query: str) -> list[int]:
        ids = self._query_cache.get(query)
        if ids is None:
            ids = self.model.tokenize([self.query_instruction + query.strip()], self.max_length)[0]
            self._query_cache[query] = ids
        return ids

    def warm(self, examples: list[Example]) -> None:
        """Tokenise everything up front (batched), so per-step token counts are known without work."""
        todo = list(dict.fromkeys((e.response, e.ended) for e in examples
                                  if (e.response, e.ended) not in self._response_cache))
        if todo:
            enc = self.model.tokenizer([self._text(r) for r, _ in todo], add_special_tokens=self.response_bos)["input_ids"]
            for (r, ended), ids in zip(todo, enc):
                self._response_cache[(r, ended)] = self._terminated(ids, ended)
        todo_q = list(dict.fromkeys(e.query for e in examples if e.query not in self._query_cache))
        if todo_q:
            texts = [self.query_instruction + q.strip() for q in todo_q]  # the reference strips the question
            for q, ids in zip(todo_q, self.model.tokenize(texts, self.max_length)):
                self._query_cache[q] = ids

    def __call__(self, examples: list[Example], device: str | torch.device) -> Batch:
        qids, qmask = self.model.pad_batch([self.query_tokens(e.query) for e in examples])
        responses = [self.response_tokens(e) for e in examples]
        width = max(len(r) for r in responses)
        rids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        rmask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, r in enumerate(responses):
            rids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            rmask[i, : len(r)] = 1
        teacher = torch.from_numpy(np.stack([e.teacher for e in examples]).astype(np.float32))
        return Batch(qids.to(device), qmask.to(device), rids.to(device), rmask.to(device), teacher.to(device))
