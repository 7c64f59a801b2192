"""A LangChain chat model that answers with the backbone the LLM2Vec-Gen embedding model already holds.

>>> from ragen.integrations.langchain import LLM2VecGenEmbeddings, RagenLangChainRetriever
>>> from ragen.integrations.langchain_chat import ChatLLM2VecGen
>>> embeddings = LLM2VecGenEmbeddings("McGill-NLP/LLM2Vec-Gen-Qwen3-06B")
>>> chat = ChatLLM2VecGen(embedding=embeddings)          # the same loaded model, not a copy
>>> for chunk in (prompt | chat | StrOutputParser()).stream("..."): print(chunk, end="")

Greedy decoding through the chat template (Qwen3: thinking off) with a KV cache; ``stream`` yields the
text as it is generated (also through ``on_llm_new_token`` callbacks); the async paths run the model in a
worker thread (LangChain's default executor). Needs the ``langchain`` extra.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import install_hint

try:
    from langchain_core.callbacks import CallbackManagerForLLMRun
    from langchain_core.language_models.chat_models import BaseChatModel
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
    from pydantic import PrivateAttr
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(f"ragen's LangChain integration needs the 'langchain' extra (langchain-core): "
                      f"{install_hint('langchain')} ({exc})") from exc

from ..encoders.base import Encoder
from ..errors import RagenError
from ..rag import ChatGenerator, Generation
from ._shared import generator_for

_ROLES = {"system": "system", "human": "user", "ai": "assistant"}


def to_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    out = []
    for m in messages:
        role = _ROLES.get(m.type)
        if role is None:
            raise RagenError(f"message type {m.type!r} is not supported; expected system, human or ai messages")
        content = m.content if isinstance(m.content, str) else "".join(
            part if isinstance(part, str) else str(part.get("text", "")) for part in m.content)
        out.append({"role": role, "content": content})
    return out


class ChatLLM2VecGen(BaseChatModel):
    """The LLM2Vec-Gen backbone as a LangChain chat model (greedy decoding).

    One of ``model_name`` (shared with :class:`~ragen.integrations.langchain.LLM2VecGenEmbeddings` of the same
    spec), ``encoder`` (a loaded LLM2Vec-Gen model) or ``embedding`` (an embedding adapter whose model should
    answer too).
    """

    model_name: str = ""
    max_new_tokens: int = 256

    _encoder: Any = PrivateAttr()
    _generator: Any = PrivateAttr()

    def __init__(self, model_name: str | None = None, *, encoder: Encoder | None = None, embedding: Any = None,
                 base_model: str | None = None, device: str | None = None, dtype: str | None = None,
                 max_new_tokens: int = 256) -> None:
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise RagenError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        encoder, generator = generator_for(model_name, encoder, embedding, base_model=base_model, device=device,
                                           dtype=dtype)
        super().__init__(model_name=model_name or str(encoder.spec), max_new_tokens=max_new_tokens)
        self._encoder = encoder
        self._generator = generator

    @property
    def _llm_type(self) -> str:
        return "llm2vec-gen"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "max_new_tokens": self.max_new_tokens}

    @property
    def encoder(self) -> Encoder:
        return self._encoder

    @property
    def generator(self) -> ChatGenerator:
        return self._generator

    def _pieces(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> Generation:
        n = int(kwargs.get("max_new_tokens") or self.max_new_tokens)
        return self._generator.stream(to_messages(messages), max_new_tokens=n, stop=stop or ())

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        generation = self._pieces(messages, stop, kwargs)
        text = generation.read()
        info = {"finish_reason": generation.finish_reason, "completion_tokens": generation.completion_tokens,
                "prompt_tokens": generation.prompt_tokens}
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=text), generation_info=info)])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        for piece in self._pieces(messages, stop, kwargs):
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager is not None:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk


__all__ = ["ChatLLM2VecGen"]
