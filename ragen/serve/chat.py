"""``POST /v1/chat/completions``: OpenAI chat completions from the served model's own backbone.

The generator is :meth:`ChatGenerator.from_encoder` (the LLM2Vec-Gen encoder's ``lm``: the weights the
embeddings use, never a second copy) or, with ``ragen serve --llm DIR``, another local causal LM. Every
step that touches a model or its tokenizer runs on the inference worker as a call job:

1. a *prepare* call templates the conversation (for ``index``: retrieves first, through the worker's
   embedding batches, then numbers the sources as ``ragen ask`` does) and checks the prompt's length;
2. *step* calls each decode up to ``ServeConfig.chat_step_tokens`` tokens over the KV cache the
   generation keeps between calls. Embedding batches queued meanwhile run between two steps, so a long
   answer never holds the model for its whole length.

A client that goes away mid-stream gets no further step: the next SSE write fails, the response's
generator is closed, and no more call jobs are queued for it.

Ragen's extensions of the OpenAI request: ``index`` (a served index; the last user message is the
question), ``k`` (sources retrieved, default 5) and ``guard`` (``true``: check the question with the
refusal guard even when the server runs without ``--guard``). The answer then carries ``sources``
(numbered as in the prompt: ``[1]``, ``[2]``, ...), ``cited`` (the numbers the answer cites),
``blocked`` and ``reason`` (the guard's decision); in a stream the first chunk carries ``sources``,
``blocked`` and ``reason`` and the chunk with the ``finish_reason`` carries ``cited``.

Decoding is greedy: sampling fields (``temperature``, ``top_p``, ``seed``, ...) are accepted and have no
effect; ``n`` must be 1.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from ..rag import AskSettings, Generation, GenerationError, RagPipeline, blocked_message, citations
from .worker import Overloaded, WorkerStopped

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
MAX_STOP = 4


def _content(value: Any, where: str, api_error) -> str:
    """A message's content: a string, ``None`` (empty) or a list of ``{"type": "text", "text": ...}`` parts."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise api_error(400, f"'{where}.content' parts must be {{\"type\": \"text\", \"text\": ...}}; this "
                                     "server takes text only")
            parts.append(part["text"])
        return "".join(parts)
    raise api_error(400, f"'{where}.content' must be a string or a list of text parts")


def parse_messages(value: Any, max_messages: int, api_error) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise api_error(400, "'messages' is required: a non-empty list of {role, content} objects")
    if len(value) > max_messages:
        raise api_error(413, f"'messages' has {len(value)} messages; the limit is {max_messages} per request",
                        "invalid_request_error", "too_many_messages")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise api_error(400, f"'messages[{i}]' must be an object with role and content")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ROLES:
            raise api_error(400, f"'messages[{i}].role' must be system, user or assistant, got "
                                 f"{json.dumps(role)[:40]}")
        messages.append({"role": role, "content": _content(m.get("content"), f"messages[{i}]", api_error)})
    if messages[-1]["role"] != "user":
        raise api_error(400, "the last message must be the user's (role user)")
    return messages


def parse_stop(value: Any, api_error) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise api_error(400, "'stop' must be a string or a list of strings")
    if len(stops) > MAX_STOP:
        raise api_error(400, f"'stop' has {len(stops)} strings; at most {MAX_STOP} are allowed")
    return tuple(s for s in stops if s)


def source_json(source) -> dict:
    h = source.hit
    return {"number": source.number, "path": h.path, "chunk_id": h.chunk_id, "score": round(float(h.score), 6),
            "text": h.text, "start": h.start, "end": h.end, "truncated": source.truncated}


class ChatRun:
    """One completion: built on the worker by :meth:`prepare`, advanced there by :meth:`step`."""

    def __init__(self, generator, messages: list[dict[str, str]], max_new_tokens: int, stop: tuple[str, ...],
                 max_prompt_tokens: int) -> None:
        self.generator = generator
        self.messages = messages
        self.max_new_tokens = max_new_tokens
        self.stop = stop
        self.max_prompt_tokens = max_prompt_tokens
        self.generation: Generation | None = None
        self.finished = False
        self.text: list[str] = []

    def prepare(self, _encoder=None) -> int:
        gen = self.generator
        ids = gen.prompt_ids(self.messages)
        if len(ids) > self.max_prompt_tokens:
            raise GenerationError(f"the prompt has {len(ids)} tokens; the limit is {self.max_prompt_tokens}")
        window = gen.context_window
        if len(ids) + self.max_new_tokens > window:
            raise GenerationError(f"the prompt has {len(ids)} tokens and max_tokens is {self.max_new_tokens}; together "
                                  f"they exceed the model's context window of {window} tokens")
        self.generation = Generation(gen, ids, self.max_new_tokens, self.stop)
        return len(ids)

    def step(self, tokens: int) -> list[str]:
        """Decode about ``tokens`` more tokens (a piece can take a few more); the text pieces they gave."""
        assert self.generation is not None
        g, pieces = self.generation, []
        target = g.completion_tokens + tokens
        while not self.finished and g.completion_tokens < target:
            try:
                pieces.append(next(g))
            except StopIteration:
                self.finished = True
        if g.done and not self.finished:  # the last piece may follow the finish reason: collect it now
            pieces.extend(g)
            self.finished = True
        self.text.extend(pieces)
        return pieces

    def close(self) -> None:
        """Drop the KV cache of an abandoned generation."""
        if self.generation is not None:
            self.generation._pieces.close()
        self.finished = True

    @property
    def finish_reason(self) -> str:
        return str(self.generation.finish_reason) if self.generation is not None else "stop"

    @property
    def prompt_tokens(self) -> int:
        return self.generation.prompt_tokens if self.generation is not None else 0

    @property
    def completion_tokens(self) -> int:
        return self.generation.completion_tokens if self.generation is not None else 0


def register(state, config, api_error, read_json, endpoint):
    """Add the chat route's handler; returns it (for the route table)."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse

    def max_tokens_of(data: dict) -> int:
        value = data.get("max_completion_tokens")
        name = "max_completion_tokens"
        if value is None:
            value, name = data.get("max_tokens"), "max_tokens"
        if value is None:
            return min(256, config.max_new_tokens)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise api_error(400, f"'{name}' must be a positive integer, got {json.dumps(value)[:40]}")
        if value > config.max_new_tokens:
            raise api_error(400, f"'{name}' is {value}; this server generates at most {config.max_new_tokens} tokens "
                                 "per answer (ragen serve --max-new-tokens)", "invalid_request_error",
                            "max_tokens_too_large")
        return value

    async def ground(data: dict, messages: list[dict[str, str]], max_new: int) -> dict:
        """Retrieve for the last user message; the numbered sources and the messages that hold them."""
        served = state.index(data.get("index"))
        k = data.get("k", 5)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= config.max_k:
            raise api_error(400, f"'k' must be an integer between 1 and {config.max_k}, got {json.dumps(k)[:40]}")
        question = messages[-1]["content"]
        if not question.strip():
            raise api_error(400, "the question (the last user message) is empty")
        verdict, hits, _vector, _generation = await state.retrieve(served, question, k, data.get("guard"))
        system = next((m["content"] for m in messages if m["role"] == "system"), None)
        history = [m for m in messages[:-1] if m["role"] != "system"]
        if verdict is not None and verdict.blocked:
            return {"blocked": True, "verdict": verdict, "sources": (), "messages": None}
        settings = AskSettings(k=k, max_new_tokens=max_new, max_prompt_tokens=config.max_input_tokens,
                               **({"system_prompt": system} if system else {}))
        pipeline = RagPipeline(None, state.generator, settings=settings)
        sources, rag_messages = await state.call(lambda enc: pipeline.fit_sources(question, hits, max_new), "chat")
        return {"blocked": False, "verdict": verdict, "sources": sources,
                "messages": [rag_messages[0], *history, rag_messages[1]]}

    @endpoint("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        data = await read_json(request)
        state.check_model(data.get("model"))
        if state.generator is None:
            raise api_error(400, f"{state.encoder.spec} embeds text and cannot generate; /v1/chat/completions needs an "
                                 "LLM2Vec-Gen model or a server started with --llm DIR (a local causal LM)",
                            "invalid_request_error", "model_cannot_generate")
        messages = parse_messages(data.get("messages"), config.max_inputs, api_error)
        if sum(len(m["content"]) for m in messages) > config.max_body_bytes:
            raise api_error(413, "the messages are too long", "invalid_request_error", "messages_too_long")
        n = data.get("n", 1)
        if n not in (1, None):
            raise api_error(400, "'n' must be 1: this server gives one (greedy) answer per request")
        stream = data.get("stream", False)
        if not isinstance(stream, bool):
            raise api_error(400, "'stream' must be true or false")
        options = data.get("stream_options") or {}
        if not isinstance(options, dict):
            raise api_error(400, "'stream_options' must be an object")
        include_usage = bool(options.get("include_usage", False))
        max_new = max_tokens_of(data)
        stop = parse_stop(data.get("stop"), api_error)
        counts = await state.count_tokens([m["content"] for m in messages], "messages")
        if sum(counts) > config.max_input_tokens:
            raise api_error(400, f"the messages have {sum(counts)} tokens; the limit is {config.max_input_tokens}",
                            "invalid_request_error", "input_too_long")
        grounded = None
        if data.get("index") is not None or data.get("k") is not None:
            if data.get("index") is None and not state.indexes:
                raise api_error(404, "this server serves no index; start it with --index NAME=DIR",
                                "invalid_request_error", "index_not_found")
            grounded = await ground(data, messages, max_new)
        elif data.get("guard"):
            raise api_error(400, "'guard' checks a retrieval question: pass 'index' too")
        cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        extra: dict = {}
        if grounded is not None:
            verdict = grounded["verdict"]
            extra = {"sources": [source_json(s) for s in grounded["sources"]], "blocked": grounded["blocked"],
                     "reason": verdict.reason if verdict is not None else None}
        run: ChatRun | None = None
        if grounded is None or not grounded["blocked"]:
            run = ChatRun(state.generator, grounded["messages"] if grounded else messages, max_new, stop,
                          config.max_input_tokens)
            await state.call(run.prepare, "chat")
        blocked_text = blocked_message(grounded["verdict"]) if grounded is not None and grounded["blocked"] else None
        state.metrics.inc("ragen_tokens_total", run.prompt_tokens if run else 0, route="/v1/chat/completions")

        def usage() -> dict:
            p, c = (run.prompt_tokens, run.completion_tokens) if run else (0, 0)
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        def cited(text: str) -> list[int]:
            return list(citations(text, [s["number"] for s in extra["sources"]])) if grounded is not None else []

        async def steps() -> AsyncIterator[list[str]]:
            try:
                while not run.finished:
                    pieces = await state.call(lambda enc: run.step(config.chat_step_tokens), "chat")
                    state.metrics.inc("ragen_chat_steps_total")
                    yield pieces
            finally:
                if not run.finished:  # abandoned (client gone, error): free the KV cache on the worker
                    state.metrics.inc("ragen_chat_abandoned_total")
                    try:
                        state.worker.submit_call(lambda enc: run.close(), label="chat")
                    except (Overloaded, WorkerStopped):  # the cache goes with the object instead
                        logger.debug("could not queue the cleanup of an abandoned generation")

        if not stream:
            if run is not None:
                async for _ in steps():
                    pass
            text = blocked_text if run is None else "".join(run.text)
            state.metrics.inc("ragen_completion_tokens_total", usage()["completion_tokens"])
            body = {"id": cid, "object": "chat.completion", "created": created, "model": state.model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": run.finish_reason if run else "stop", "logprobs": None}],
                    "usage": usage(), **extra}
            if grounded is not None:
                body["cited"] = cited(text)
            return JSONResponse(body)

        def chunk(delta: dict, finish: str | None = None, **more) -> str:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_id,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **more}
            return f"data: {json.dumps(obj)}\n\n"

        async def sse() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""}, **extra)
            try:
                if run is None:
                    yield chunk({"content": blocked_text})
                else:
                    async for pieces in steps():
                        if pieces:
                            yield chunk({"content": "".join(pieces)})
                text = blocked_text if run is None else "".join(run.text)
                yield chunk({}, run.finish_reason if run else "stop",
                            **({"cited": cited(text)} if grounded is not None else {}))
                state.metrics.inc("ragen_completion_tokens_total", usage()["completion_tokens"])
                if include_usage:
                    obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_id,
                           "choices": [], "usage": usage()}
                    yield f"data: {json.dumps(obj)}\n\n"
            except Exception as exc:  # noqa: BLE001 - headers are sent: the error goes in the stream
                status, message, kind = state.describe_error(exc)
                yield f"data: {json.dumps({'error': {'message': message, 'type': kind, 'code': status}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return chat_completions


__all__ = ["register", "ChatRun", "parse_messages", "parse_stop", "source_json"]
