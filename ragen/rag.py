"""Retrieval-augmented answers from the backbone the encoder already holds.

An LLM2Vec-Gen encoder *is* a frozen chat LLM (its ``lm``); :class:`ChatGenerator` wraps that same
module, so embedding and answering share one copy of the weights. For indexes built with a baseline
encoder (minilm, ...) or for a bigger generator, :meth:`ChatGenerator.from_pretrained` loads another
local causal LM (``--llm``).

Flow of :meth:`RagPipeline.stream`::

    question --Retriever.retrieve (guard)--> hits --numbered sources under a token budget--> chat prompt
             --greedy decoding with a KV cache--> text pieces --> Answer (text, sources, citations, timings)

The streaming shape is the API: ``AnswerStream`` is an iterator of text pieces whose ``sources`` are known
before the first piece and whose ``result`` (an :class:`Answer`) is complete after the last, so a server
can send the sources first, stream the pieces as SSE, and finish with the timings.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, RagenError
from .guard import GuardVerdict
from .retriever import Retrieval, Retriever
from .types import Hit

logger = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "Answer the question using only the numbered sources. Cite each source you use by its number in "
    "square brackets, like [1] or [2]. If the sources do not contain the answer, say that you do not know."
)
_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")


class GenerationError(RagenError):
    """No generator available, or a prompt that cannot fit the model."""


# ----------------------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------------------
class Generation:
    """An iterator of text pieces from one greedy decoding run; after the last piece, ``text``,
    ``finish_reason`` (``stop`` or ``length``), ``completion_tokens`` and ``first_piece_seconds`` are set."""

    def __init__(self, generator: ChatGenerator, prompt_ids: list[int], max_new_tokens: int,
                 stop: Sequence[str]) -> None:
        self._gen = generator
        self.prompt_ids = prompt_ids
        self.prompt_tokens = len(prompt_ids)
        self.max_new_tokens = max_new_tokens
        self.stop = tuple(s for s in stop if s)
        self.text = ""
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.first_piece_seconds: float | None = None
        self._started = time.perf_counter()
        self._pieces = self._run()

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def read(self) -> str:
        """Consume what is left; the whole text."""
        for _ in self:
            pass
        return self.text

    def _run(self) -> Iterator[str]:
        tok = self._gen.tokenizer
        ids: list[int] = []
        emitted = 0  # characters of the decoded text already handed out
        hold = max((len(s) for s in self.stop), default=1) - 1  # a stop string may still be forming
        for token in self._gen.token_stream(self.prompt_ids, self.max_new_tokens):
            if token in self._gen.stop_ids:
                self.finish_reason = "stop"
                break
            ids.append(token)
            self.completion_tokens = len(ids)
            with self._gen.lock:
                text = tok.decode(ids, skip_special_tokens=True)
            cut = _first_stop(text, self.stop)
            if cut is not None:
                text = text[:cut]
                self.finish_reason = "stop"
            # Hold back an incomplete UTF-8 sequence (decoded as U+FFFD) and a possible stop-string prefix.
            safe = len(text) if cut is not None else len(text.rstrip("\ufffd")) - hold
            if safe > emitted:
                piece, emitted = text[emitted:safe], safe
                self.text = text[:emitted]
                if self.first_piece_seconds is None:
                    self.first_piece_seconds = time.perf_counter() - self._started
                yield piece
            if cut is not None:
                break
        else:
            self.finish_reason = "length"
        with self._gen.lock:
            final = tok.decode(ids, skip_special_tokens=True)
        cut = _first_stop(final, self.stop)
        final = final if cut is None else final[:cut]
        if len(final) > emitted:
            if self.first_piece_seconds is None:
                self.first_piece_seconds = time.perf_counter() - self._started
            yield final[emitted:]
        self.text = final


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


class ChatGenerator:
    """Greedy chat generation with a KV cache from a causal LM and its tokenizer.

    Build it with :meth:`from_encoder` (the LLM2Vec-Gen encoder's own ``lm``: no second copy of the
    weights) or :meth:`from_pretrained` (another local causal LM). ``lock`` guards the tokenizer and
    each forward step; pass the lock the embedding side uses when both run in threads (one Hugging Face
    fast tokenizer must not be entered from two threads at once).
    """

    def __init__(self, lm: Any, tokenizer: Any, *, source: str, enable_thinking: bool = False,
                 lock: AbstractContextManager | None = None) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise GenerationError(f"{source}: the tokenizer has no chat template; answering needs a chat "
                                  "(instruct) model, pass one with --llm")
        self.lm = lm
        self.tokenizer = tokenizer
        self.source = source
        self.enable_thinking = enable_thinking
        self.lock = lock if lock is not None else threading.Lock()
        self.device = next(lm.parameters()).device
        self.stop_ids = self._find_stop_ids()
        from .encoders.llm2vec_gen import cache_keyword

        self._cache_arg = cache_keyword(lm)  # past_key_values -> cache across the transformers 5.x rename

    @classmethod
    def from_encoder(cls, encoder: Any, *, lock: AbstractContextManager | None = None) -> ChatGenerator:
        """The generator inside an LLM2Vec-Gen encoder: the same ``lm`` module, the same tokenizer."""
        lm, tok = getattr(encoder, "lm", None), getattr(encoder, "tokenizer", None)
        if lm is None or tok is None or not callable(getattr(lm, "generate", None)):
            raise GenerationError(f"{getattr(encoder, 'spec', encoder)} embeds the input text and holds no "
                                  "generator; pass --llm DIR (llm= in Python), a local chat model")
        return cls(lm, tok, source=str(getattr(encoder, "spec", "encoder")), lock=lock)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, device: str | None = None, dtype: str | None = None,
                        trust_remote_code: bool = False) -> ChatGenerator:
        """Load a local causal LM (a directory with config.json, weights and a tokenizer with a chat template)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .encoders.base import resolve_device, resolve_dtype

        source = str(name_or_path)
        if not Path(source).expanduser().is_dir():
            raise GenerationError(f"{source}: no such directory; --llm takes a local causal LM directory "
                                  "(config.json, weights, tokenizer)")
        dev = resolve_device(device)
        try:
            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            lm = AutoModelForCausalLM.from_pretrained(source, dtype=resolve_dtype(dtype, dev),
                                                      trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{source}: cannot load a causal LM ({str(exc).splitlines()[0][:160]}); expected "
                                  "config.json, weights and a tokenizer") from None
        lm.requires_grad_(False)
        return cls(lm.to(dev).eval(), tok, source=source)

    @property
    def context_window(self) -> int:
        cfg = self.lm.config.get_text_config() if hasattr(self.lm.config, "get_text_config") else self.lm.config
        return int(getattr(cfg, "max_position_embeddings", 0) or 4096)

    def _find_stop_ids(self) -> frozenset[int]:
        from .encoders.llm2vec_gen import stop_token_ids

        return stop_token_ids(self.lm, self.tokenizer)

    # ------------------------------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        with self.lock:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of the chat-templated conversation with the assistant turn opened (thinking off for
        templates that know the switch, e.g. Qwen3)."""
        msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
        with self.lock:
            from jinja2 import TemplateError

            try:
                text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                                          enable_thinking=self.enable_thinking)
            except (TemplateError, ValueError) as exc:  # e.g. a template that refuses a system message
                raise GenerationError(f"{self.source}: its chat template rejected the conversation "
                                      f"({str(exc).splitlines()[0][:160]})") from None
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def token_stream(self, prompt_ids: Sequence[int], max_new_tokens: int) -> Iterator[int]:
        """Greedy next tokens, one forward step per token over the KV cache; ends after a stop token or
        ``max_new_tokens`` tokens."""
        import torch

        from .encoders.llm2vec_gen import output_cache

        if not prompt_ids:
            raise GenerationError("empty prompt")
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        with self.lock, torch.inference_mode():
            out = self.lm(input_ids=torch.tensor([list(prompt_ids)], device=self.device), use_cache=True,
                          logits_to_keep=1)
            nxt = int(out.logits[0, -1].argmax())
        for step in range(max_new_tokens):
            yield nxt
            if nxt in self.stop_ids or step == max_new_tokens - 1:
                return
            cache = output_cache(out, self._cache_arg)
            with self.lock, torch.inference_mode():
                out = self.lm(input_ids=torch.tensor([[nxt]], device=self.device), use_cache=True, logits_to_keep=1,
                              **{self._cache_arg: cache})
                nxt = int(out.logits[0, -1].argmax())

    def stream(self, messages: Sequence[dict[str, str]], *, max_new_tokens: int = 256,
               stop: Sequence[str] = ()) -> Generation:
        """Stream the assistant's reply to ``messages`` (``[{"role", "content"}, ...]``) as text pieces."""
        return Generation(self, self.prompt_ids(messages), max_new_tokens, stop)

    def complete(self, messages: Sequence[dict[str, str]], *, max_new_tokens: int = 256,
                 stop: Sequence[str] = ()) -> str:
        return self.stream(messages, max_new_tokens=max_new_tokens, stop=stop).read()


# ----------------------------------------------------------------------------------------------------------
# answers
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AskSettings:
    """``k``: chunks retrieved; ``max_new_tokens``: answer length limit; ``max_prompt_tokens``: the token
    budget of the whole prompt (also capped by the model's context window minus ``max_new_tokens``);
    sources that do not fit are left out, the first one is cut to fit."""

    k: int = 5
    max_new_tokens: int = 256
    max_prompt_tokens: int = 3072
    system_prompt: str = DEFAULT_SYSTEM_PROMPT

    def __post_init__(self) -> None:
        for name in ("k", "max_new_tokens", "max_prompt_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RagenError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Source:
    """A retrieved chunk as it appears in the prompt: ``[number] path``; ``truncated`` when cut to fit."""

    number: int
    hit: Hit
    truncated: bool = False

    @property
    def path(self) -> str:
        return self.hit.path


def hit_to_dict(hit: Hit) -> dict[str, Any]:
    """A hit in the shape ``ragen query --json`` prints."""
    return {"rank": hit.rank, "score": round(float(hit.score), 6), "path": hit.path, "chunk_id": hit.chunk_id,
            "text": hit.text, "start": hit.start, "end": hit.end}


@dataclass(frozen=True)
class Answer:
    """A finished answer. ``sources``: the chunks the prompt held, numbered; ``cited``: the numbers the
    answer cites that name a source; ``hits``: everything retrieved; ``blocked``/``verdict``: the guard's
    decision; ``timings``: seconds per stage."""

    question: str
    text: str
    sources: tuple[Source, ...]
    cited: tuple[int, ...]
    hits: tuple[Hit, ...]
    blocked: bool
    verdict: GuardVerdict | None
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    generator: str
    timings: dict[str, float] = field(default_factory=dict)

    def cited_sources(self) -> list[Source]:
        return [s for s in self.sources if s.number in self.cited]

    def to_dict(self) -> dict[str, Any]:
        """The ``ragen ask --json`` object."""
        return {"answer": self.text, "hits": [hit_to_dict(h) for h in self.hits],
                "sources": [{"number": s.number, "path": s.path, "chunk_id": s.hit.chunk_id, "truncated": s.truncated}
                            for s in self.sources],
                "cited": list(self.cited), "blocked": self.blocked,
                "guard": self.verdict.to_dict() if self.verdict is not None else None,
                "finish_reason": self.finish_reason, "generator": self.generator,
                "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens},
                "timings": {k: round(v, 6) for k, v in self.timings.items()}}


def citations(text: str, valid: Sequence[int]) -> tuple[int, ...]:
    """The source numbers ``text`` cites as ``[n]`` or ``[n, m]``, in first-cited order, among ``valid``."""
    ok, seen = set(valid), []
    for group in _CITATION.findall(text):
        for n in (int(x) for x in group.split(",")):
            if n in ok and n not in seen:
                seen.append(n)
    return tuple(seen)


def format_source(number: int, hit: Hit, text: str | None = None) -> str:
    return f"[{number}] {hit.path}\n{(hit.text if text is None else text).strip()}"


def build_messages(question: str, sources: Sequence[tuple[int, Hit, str]], system_prompt: str = DEFAULT_SYSTEM_PROMPT
                   ) -> list[dict[str, str]]:
    """The chat messages for ``question`` with numbered ``(number, hit, text)`` sources."""
    blocks = "\n\n".join(format_source(n, h, t) for n, h, t in sources)
    user = (f"Sources:\n\n{blocks}\n\nQuestion: {question.strip()}" if sources
            else f"Sources: none were found.\n\nQuestion: {question.strip()}")
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]


def blocked_message(verdict: GuardVerdict) -> str:
    return f"I can't answer this: the refusal guard blocked the question because {verdict.reason}."


class AnswerStream:
    """Text pieces of one answer. ``retrieval`` and ``sources`` are set on creation (before any piece);
    ``result`` is the :class:`Answer` (reading it consumes any pieces not yet read)."""

    def __init__(self, pipeline: RagPipeline, question: str, k: int, max_new_tokens: int) -> None:
        t0 = time.perf_counter()
        self.question = question
        self.retrieval: Retrieval = pipeline.retriever.retrieve(question, k)
        t1 = time.perf_counter()
        self._pipeline = pipeline
        self._timings = {"embed": self.retrieval.embed_seconds, "guard": self.retrieval.guard_seconds,
                         "search": self.retrieval.search_seconds, "retrieve": t1 - t0}
        self._result: Answer | None = None
        self._t0 = t0
        gen = pipeline.generator
        if self.retrieval.blocked:
            assert self.retrieval.verdict is not None
            self.sources: tuple[Source, ...] = ()
            self._generation: Generation | None = None
            self._pieces: Iterator[str] = iter([blocked_message(self.retrieval.verdict)])
        else:
            self.sources, messages = pipeline.fit_sources(question, self.retrieval.hits, max_new_tokens)
            self._generation = Generation(gen, gen.prompt_ids(messages), max_new_tokens, ())
            self._pieces = self._generation
        self._timings["prompt"] = time.perf_counter() - t1
        self._t_gen = time.perf_counter()
        self._text: list[str] = []

    def __iter__(self) -> AnswerStream:
        return self

    def __next__(self) -> str:
        try:
            piece = next(self._pieces)
        except StopIteration:
            self._finish()
            raise
        if not self._text:
            self._timings["first_token"] = time.perf_counter() - self._t0
        self._text.append(piece)
        return piece

    @property
    def blocked(self) -> bool:
        return self.retrieval.blocked

    @property
    def result(self) -> Answer:
        for _ in self:
            pass
        assert self._result is not None
        return self._result

    def _finish(self) -> None:
        if self._result is not None:
            return
        text = "".join(self._text)
        self._timings["generate"] = time.perf_counter() - self._t_gen
        self._timings["total"] = time.perf_counter() - self._t0
        g = self._generation
        self._result = Answer(
            question=self.question, text=text, sources=self.sources,
            cited=citations(text, [s.number for s in self.sources]), hits=tuple(self.retrieval.hits),
            blocked=self.retrieval.blocked, verdict=self.retrieval.verdict,
            finish_reason="blocked" if g is None else str(g.finish_reason), prompt_tokens=0 if g is None else g.prompt_tokens,
            completion_tokens=0 if g is None else g.completion_tokens, generator=self._pipeline.generator.source,
            timings=dict(self._timings))


class RagPipeline:
    """Retrieve, then answer with citations.

    >>> with RagPipeline.open("indexes/default") as rag:     # the index's LLM2Vec-Gen model answers too
    ...     stream = rag.stream("why is the sky blue?")
    ...     for piece in stream:
    ...         print(piece, end="", flush=True)
    ...     answer = stream.result                          # text, sources, cited, timings
    """

    def __init__(self, retriever: Retriever, generator: ChatGenerator | None = None, *,
                 settings: AskSettings | None = None) -> None:
        self.retriever = retriever
        self.generator = generator if generator is not None else ChatGenerator.from_encoder(retriever.encoder)
        self.settings = settings or AskSettings()

    @classmethod
    def open(cls, index_dir: str | Path, *, llm: str | Path | None = None, guard: Any = None,
             device: str | None = None, dtype: str | None = None, model: str | None = None,
             base_model: str | None = None, settings: AskSettings | None = None) -> RagPipeline:
        """Open ``index_dir`` with its encoder; answer with that encoder's backbone, or with the local
        causal LM ``llm``. ``guard`` as for :class:`~ragen.retriever.Retriever`."""
        retriever = Retriever.open(index_dir, model=model, device=device, base_model=base_model, guard=guard)
        try:
            generator = (ChatGenerator.from_pretrained(llm, device=device, dtype=dtype) if llm is not None
                         else ChatGenerator.from_encoder(retriever.encoder))
            return cls(retriever, generator, settings=settings)
        except BaseException:
            retriever.close()
            raise

    def fit_sources(self, question: str, hits: Sequence[Hit], max_new_tokens: int
                    ) -> tuple[tuple[Source, ...], list[dict[str, str]]]:
        """Number the hits in rank order and keep those that fit the prompt budget (the first one is cut
        to fit when alone it is too long); the chat messages that hold them."""
        gen, s = self.generator, self.settings
        budget = min(s.max_prompt_tokens, gen.context_window - max_new_tokens)
        base = len(gen.prompt_ids(build_messages(question, [], s.system_prompt)))
        if base >= budget:
            raise GenerationError(f"the question alone takes {base} prompt tokens; the budget is {budget} "
                                  f"(context window {gen.context_window} minus {max_new_tokens} new tokens)")
        chosen: list[tuple[int, Hit, str]] = []
        sources: list[Source] = []
        used = gen.count_tokens("Sources:\n\n") - gen.count_tokens("Sources: none were found.")
        for hit in hits:
            number = len(chosen) + 1
            cost = gen.count_tokens(format_source(number, hit) + "\n\n")
            if base + used + cost <= budget:
                chosen.append((number, hit, hit.text))
                sources.append(Source(number, hit))
                used += cost
                continue
            if not chosen:  # the best hit alone is too long: keep as much of it as fits
                room = budget - base - used - gen.count_tokens(format_source(number, hit, "") + "\n\n") - 8
                if room > 16:
                    with gen.lock:
                        ids = gen.tokenizer(hit.text, add_special_tokens=False)["input_ids"][:room]
                        text = gen.tokenizer.decode(ids, skip_special_tokens=True)
                    chosen.append((number, hit, text))
                    sources.append(Source(number, hit, truncated=True))
            break
        messages = build_messages(question, chosen, s.system_prompt)
        while chosen and len(gen.prompt_ids(messages)) > budget:  # token counts of pieces are estimates
            chosen.pop()
            sources.pop()
            messages = build_messages(question, chosen, s.system_prompt)
        if len(sources) < len(hits):
            logger.info("prompt budget %d tokens: %d of %d sources fit", budget, len(sources), len(hits))
        return tuple(sources), messages

    def stream(self, question: str, *, k: int | None = None, max_new_tokens: int | None = None) -> AnswerStream:
        """Retrieve now, then stream the answer's text pieces (see :class:`AnswerStream`)."""
        if not isinstance(question, str) or not question.strip():
            raise RagenError("the question is empty")
        k = self.settings.k if k is None else k
        n = self.settings.max_new_tokens if max_new_tokens is None else max_new_tokens
        AskSettings(k=k, max_new_tokens=n)  # validates
        return AnswerStream(self, question, k, n)

    def ask(self, question: str, *, k: int | None = None, max_new_tokens: int | None = None) -> Answer:
        return self.stream(question, k=k, max_new_tokens=max_new_tokens).result

    def close(self) -> None:
        self.retriever.close()

    def __enter__(self) -> RagPipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["ChatGenerator", "Generation", "RagPipeline", "AnswerStream", "Answer", "Source", "AskSettings",
           "GenerationError", "build_messages", "citations", "hit_to_dict", "DEFAULT_SYSTEM_PROMPT"]
