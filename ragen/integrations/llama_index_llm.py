"""A LlamaIndex ``LLM`` that answers with the backbone the LLM2Vec-Gen embedding model already holds.

>>> from llama_index.core import Settings, VectorStoreIndex
>>> from ragen.integrations.llama_index import LLM2VecGenEmbedding
>>> from ragen.integrations.llama_index_llm import LLM2VecGenLLM
>>> Settings.embed_model = LLM2VecGenEmbedding("McGill-NLP/LLM2Vec-Gen-Qwen3-06B")
>>> Settings.llm = LLM2VecGenLLM("McGill-NLP/LLM2Vec-Gen-Qwen3-06B")   # the same loaded model, not a copy
>>> VectorStoreIndex.from_documents(docs).as_query_engine(streaming=True).query("...").print_response_stream()

Both resolve ``model_name`` through one cache (:mod:`ragen.integrations._shared`), so ``Settings.llm`` and
``Settings.embed_model`` hold one model. Generation is greedy, uses the chat template (Qwen3: thinking off)
and a KV cache; ``chat`` sends the real messages through the template, ``complete`` sends the prompt as one
user turn. Async methods run the model in a worker thread. Needs the ``llama-index`` extra.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from ..errors import install_hint

try:
    from llama_index.core.base.llms.types import (ChatMessage, ChatResponse, ChatResponseAsyncGen, ChatResponseGen,
                                                  CompletionResponse, CompletionResponseAsyncGen,
                                                  CompletionResponseGen, LLMMetadata, MessageRole)
    from llama_index.core.bridge.pydantic import Field, PrivateAttr
    from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
    from llama_index.core.llms.custom import CustomLLM
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(f"ragen's LlamaIndex integration needs the 'llama-index' extra (llama-index-core): "
                      f"{install_hint('llama-index')} ({exc})") from exc

from ..encoders.base import Encoder
from ..errors import RagenError
from ..rag import ChatGenerator
from ._shared import generator_for

_DONE = object()


def to_messages(messages: Sequence[Any]) -> list[dict[str, str]]:
    out = []
    for m in messages:
        role = m.role.value if isinstance(m.role, MessageRole) else str(m.role)
        if role not in ("system", "user", "assistant"):
            raise RagenError(f"chat role {role!r} is not supported; expected system, user or assistant")
        out.append({"role": role, "content": m.content or ""})
    return out


async def iterate_in_thread(it: Iterator[Any]) -> AsyncIterator[Any]:
    """Each ``next`` in a worker thread, so the event loop keeps running while the model works."""
    while True:
        item = await asyncio.to_thread(next, it, _DONE)
        if item is _DONE:
            return
        yield item


class LLM2VecGenLLM(CustomLLM):
    """The LLM2Vec-Gen backbone as a LlamaIndex LLM (greedy decoding).

    One of ``model_name`` (shared with :class:`~ragen.integrations.llama_index.LLM2VecGenEmbedding` of the
    same spec), ``encoder`` (a loaded LLM2Vec-Gen model) or ``embedding`` (an embedding adapter whose model
    should answer too). ``max_new_tokens``: the reply length limit; ``stop``: strings that end a reply.
    """

    model_name: str = Field(default="", description="The LLM2Vec-Gen spec whose backbone answers.")
    max_new_tokens: int = Field(default=256, gt=0, description="Longest reply, in tokens.")
    stop: list[str] = Field(default_factory=list, description="Strings that end a reply.")

    _encoder: Any = PrivateAttr()
    _generator: Any = PrivateAttr()

    def __init__(self, model_name: str | None = None, *, encoder: Encoder | None = None, embedding: Any = None,
                 base_model: str | None = None, device: str | None = None, dtype: str | None = None,
                 max_new_tokens: int = 256, stop: Sequence[str] = (), callback_manager: Any = None) -> None:
        enc, gen = generator_for(model_name, encoder, embedding, base_model=base_model, device=device, dtype=dtype)
        super().__init__(model_name=model_name or str(enc.spec), max_new_tokens=max_new_tokens, stop=list(stop),
                         callback_manager=callback_manager)
        self._encoder = enc
        self._generator = gen

    @classmethod
    def class_name(cls) -> str:
        return "LLM2VecGenLLM"

    @property
    def encoder(self) -> Encoder:
        return self._encoder

    @property
    def generator(self) -> ChatGenerator:
        return self._generator

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self._generator.context_window, num_output=self.max_new_tokens,
                           is_chat_model=True, model_name=self.model_name)

    def _limits(self, kwargs: dict[str, Any]) -> tuple[int, list[str]]:
        n = int(kwargs.get("max_new_tokens") or kwargs.get("max_tokens") or self.max_new_tokens)
        return n, list(kwargs.get("stop") or self.stop)

    def _pieces(self, messages: list[dict[str, str]], kwargs: dict[str, Any]) -> Iterator[str]:
        n, stop = self._limits(kwargs)
        return self._generator.stream(messages, max_new_tokens=n, stop=stop)

    # completion -------------------------------------------------------------------------------------------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        text = "".join(self._pieces([{"role": "user", "content": prompt}], kwargs))
        return CompletionResponse(text=text)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        pieces = self._pieces([{"role": "user", "content": prompt}], kwargs)

        def gen() -> CompletionResponseGen:
            text = ""
            for piece in pieces:
                text += piece
                yield CompletionResponse(text=text, delta=piece)

        return gen()

    # chat -------------------------------------------------------------------------------------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        text = "".join(self._pieces(to_messages(messages), kwargs))
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        pieces = self._pieces(to_messages(messages), kwargs)

        def gen() -> ChatResponseGen:
            text = ""
            for piece in pieces:
                text += piece
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=piece)

        return gen()

    # async: the model runs in a worker thread ----------------------------------------------------------------
    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await asyncio.to_thread(self.complete, prompt, formatted, **kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        sync = await asyncio.to_thread(self.stream_complete, prompt, formatted, **kwargs)
        return iterate_in_thread(sync)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await asyncio.to_thread(self.chat, messages, **kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        sync = await asyncio.to_thread(self.stream_chat, messages, **kwargs)
        return iterate_in_thread(sync)


__all__ = ["LLM2VecGenLLM"]
