"""The ``ragen serve`` web application (Starlette): OpenAI-compatible embeddings, search, decoding.

Routes (all JSON; errors are ``{"error": {"message", "type", "code"}}`` with a 4xx/5xx status):

    POST /v1/embeddings   OpenAI schema + ragen's input_type / instruction / normalize
    GET  /v1/models       the served model (id, dim, fingerprint, instructions, indexes)
    POST /v1/search       {index, query, k, guard} -> the hits `ragen query --json` prints (+ blocked, reason)
    POST /v1/chat/completions  OpenAI chat (stream, stop, usage) + ragen's index / k / guard (see chat.py)
    POST /v1/decode       {input, max_new_tokens} -> what each embedding decodes to (LLM2Vec-Gen)
    POST /v1/top_tokens   {input, k} -> logit lens of each pooled position (LLM2Vec-Gen)
    GET  /health          liveness, never needs the API key
    GET  /ready           200 once the model and the worker are up, 503 while shutting down
    GET  /metrics         Prometheus text format

Handlers never run the model: they validate, count tokens and hand a job to the
:class:`~ragen.serve.worker.InferenceWorker`, then await its future.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..encoders.base import l2_normalize
from ..errors import RagenError, StoreError
from ..errors import install_hint
from ..retriever import check_compatible
from ..store import Store
from .config import ServeConfig
from .metrics import Metrics, server_metrics
from .tokens import TokenCounter
from .worker import KINDS, InferenceWorker, Overloaded, WorkerStopped

logger = logging.getLogger(__name__)


def _require_starlette():
    try:
        import starlette  # noqa: F401
    except ImportError:
        raise ImportError(f"ragen serve needs the 'serve' extra: {install_hint('serve')}") from None


class ApiError(Exception):
    """An error answer: HTTP status, one-line message, OpenAI-style type and code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.headers = dict(headers or {})


def error_body(message: str, type: str, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "code": code, "param": None}}


def hit_json(hit) -> dict:
    """One hit exactly as ``ragen query --json`` prints it."""
    return {"rank": hit.rank, "score": round(hit.score, 6), "path": hit.path, "chunk_id": hit.chunk_id,
            "text": hit.text, "start": hit.start, "end": hit.end}


class ServedIndex:
    """One index a server searches. The store re-reads the committed generation on every search (and
    reloads when a writer switched it), so ``ragen index`` runs become visible without a restart; the
    lock keeps two searches from racing that reload."""

    def __init__(self, name: str, directory: str | Path, encoder, *, device: str | None = None) -> None:
        self.name = name
        self.directory = Path(directory).expanduser()
        self._encoder = encoder
        self.store = Store.open(self.directory, device=device)
        try:
            check_compatible(encoder, self.store)
        except StoreError:
            self.store.close()
            raise
        self._lock = threading.Lock()

    @property
    def generation(self) -> int:
        return int(self.store.generation)

    def hits(self, vector: np.ndarray, k: int) -> tuple[list, int]:
        with self._lock:
            hits = self.store.hits(vector, k)
            generation = self.generation
            if self.store.fingerprint != str(self._encoder.fingerprint):
                raise ApiError(409, f"index {self.name!r} was rebuilt with encoder {self.store.spec}, not the served "
                                    "model; restart the server with that model", "conflict_error", "index_model_changed")
        return hits, generation

    def close(self) -> None:
        with self._lock:
            self.store.close()


class ServerState:
    """Everything the handlers share: the encoder, the worker, the indexes, metrics, settings."""

    def __init__(self, encoder, indexes: Mapping[str, str | Path], config: ServeConfig,
                 device: str | None = None, generator=None, guard=None) -> None:
        self.encoder = encoder
        self.config = config
        self.model_id = config.model_name or str(encoder.spec)
        self._model_names = {self.model_id, str(encoder.spec)}
        spec_path = Path(str(encoder.spec)).expanduser()
        if spec_path.exists():
            self._model_names.add(str(spec_path.resolve()))
        self.created = int(time.time())
        self.counter = TokenCounter(encoder)
        self.metrics: Metrics = server_metrics(lambda: self.worker.queue_depth)
        self.worker = InferenceWorker(encoder, max_batch_tokens=config.max_batch_tokens,
                                      max_batch_size=config.max_batch_size, max_wait_ms=config.max_wait_ms,
                                      max_queue=config.max_queue, metrics=self.metrics)
        self.indexes: dict[str, ServedIndex] = {}
        try:
            for name, directory in indexes.items():
                self.indexes[name] = ServedIndex(name, directory, encoder, device=device)
        except BaseException:
            self.close()
            raise
        self.decodes = callable(getattr(encoder, "decode", None)) and callable(getattr(encoder, "top_tokens", None))
        self.generator = generator if generator is not None else _own_generator(encoder)
        # The refusal guard of each index: --guard (each index's guard.json, else the defaults) or
        # --guard-config FILE. Built now, before the worker owns the model (it embeds its prototypes).
        self.guard_setting = guard
        self.guards: dict = {}
        if guard is not None and guard is not False:
            from ..guard import resolve_guard

            try:
                for name, served in self.indexes.items():
                    self.guards[name] = resolve_guard(guard, encoder, served.directory)
            except BaseException:
                self.close()
                raise
        self._request_guards: dict = {}
        self._key_digest = hashlib.sha256(config.api_key.encode()).digest() if config.api_key else None

    # --- checks -----------------------------------------------------------------------------------------
    def check_auth(self, request) -> None:
        if self._key_digest is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = hashlib.sha256(token.strip().encode()).digest()
        # Compare digests in constant time: neither the key's content nor its length leaks.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self._key_digest):
            raise ApiError(401, "missing or wrong API key; send the header 'Authorization: Bearer KEY'",
                           "authentication_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})

    def check_model(self, model: object) -> None:
        if model is None:
            return
        if not isinstance(model, str) or model not in self._model_names:
            raise ApiError(404, f"model {model!r} is not served here; this server serves {self.model_id!r}",
                           "invalid_request_error", "model_not_found")

    def texts(self, value: object, field: str = "input") -> list[str]:
        if isinstance(value, str):
            texts = [value]
        elif isinstance(value, list) and value and all(isinstance(t, str) for t in value):
            texts = value
        elif isinstance(value, list) and value and all(isinstance(t, (int, list)) for t in value):
            raise ApiError(400, f"'{field}' holds token ids; this server takes text: send strings (for "
                                "LangChain's OpenAIEmbeddings pass check_embedding_ctx_length=False)")
        elif value is None:
            raise ApiError(400, f"'{field}' is required: a string or a non-empty list of strings")
        else:
            raise ApiError(400, f"'{field}' must be a string or a non-empty list of strings")
        if len(texts) > self.config.max_inputs:
            raise ApiError(413, f"'{field}' has {len(texts)} texts; the limit is {self.config.max_inputs} per request",
                           "invalid_request_error", "too_many_inputs")
        return texts

    async def count_tokens(self, texts: list[str], field: str = "input") -> list[int]:
        if sum(len(t) for t in texts) > 20_000:  # big inputs: count off the event loop
            counts = await asyncio.to_thread(self.counter.count, texts)
        else:
            counts = self.counter.count(texts)
        limit = self.config.max_input_tokens
        for i, n in enumerate(counts):
            if n > limit:
                where = f"{field}[{i}]" if len(texts) > 1 else field
                self.metrics.inc("ragen_rejected_total", reason="input_too_long")
                raise ApiError(400, f"{where} has {n} tokens; the limit is {limit} tokens per input",
                               "invalid_request_error", "input_too_long")
        return counts

    @staticmethod
    def instruction_for(data: dict) -> str | None:
        """The ``instruction`` a request names (None: the model's own query/document instruction)."""
        value = data.get("instruction")
        if value is not None and not isinstance(value, str):
            raise ApiError(400, "'instruction' must be a string")
        return value

    def effective_instruction(self, kind: str, instruction: str | None) -> str | None:
        return instruction if instruction is not None else getattr(self.encoder, f"{kind}_instruction", None)

    def index(self, name: object) -> ServedIndex:
        if name is None:
            if len(self.indexes) == 1:
                return next(iter(self.indexes.values()))
            if not self.indexes:
                raise ApiError(404, "this server serves no index; start it with --index NAME=DIR",
                               "invalid_request_error", "index_not_found")
            raise ApiError(400, f"'index' is required: this server serves {', '.join(sorted(self.indexes))}")
        if not isinstance(name, str) or name not in self.indexes:
            served = ", ".join(sorted(self.indexes)) or "none"
            raise ApiError(404, f"index {name!r} is not served here (served: {served})", "invalid_request_error",
                           "index_not_found")
        return self.indexes[name]

    async def run(self, future):
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.config.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(503, f"no answer from the model within {self.config.request_timeout_s:g} s; retry later",
                           "overloaded_error", "timeout", {"Retry-After": str(self.config.retry_after_s)}) from None

    async def embed(self, texts: list[str], counts: list[int], kind: str, instruction: str | None) -> np.ndarray:
        eff = self.effective_instruction(kind, instruction)
        lengths = [self.counter.input_length(n, eff) for n in counts]
        try:
            future = self.worker.submit_embed(texts, kind=kind, lengths=lengths, instruction=instruction)
        except Overloaded:
            self.metrics.inc("ragen_rejected_total", reason="queue_full")
            raise
        return await self.run(future)

    async def guard_for(self, served: ServedIndex, requested: object):
        """The guard a search on ``served`` runs: the server's (always), else the index's own when the request
        asks for ``guard: true`` (built once, on the worker), else none."""
        if requested is not None and not isinstance(requested, bool):
            raise ApiError(400, "'guard' must be true or false")
        if served.name in self.guards:
            return self.guards[served.name]
        if not requested:
            return None
        guard = self._request_guards.get(served.name)
        if guard is None:
            from ..guard import GuardConfig, RefusalGuard

            config = GuardConfig.for_index(served.directory)
            guard = await self.call(lambda enc: RefusalGuard(enc, config), "guard")
            self._request_guards[served.name] = guard
        return guard

    async def retrieve(self, served: ServedIndex, query: str, k: int, requested_guard: object = None):
        """(verdict or None, hits, normalised query vector, generation); a blocked query gets no hits."""
        guard = await self.guard_for(served, requested_guard)
        counts = await self.count_tokens([query], "query")
        vector = l2_normalize(await self.embed([query], counts, "query", None))[0]  # as Retriever.search
        self.metrics.inc("ragen_tokens_total", counts[0], route="/v1/search")
        verdict = None
        if guard is not None:
            verdict = await self.call(lambda enc: guard.check_batch([query], vector[None, :])[0], "guard")
            if verdict.blocked:
                self.metrics.inc("ragen_guard_blocked_total", index=served.name)
                return verdict, [], vector, served.generation
        hits, generation = await asyncio.to_thread(served.hits, vector, k)
        self.metrics.set("ragen_index_generation", generation, index=served.name)
        return verdict, hits, vector, generation

    @staticmethod
    def describe_error(exc: BaseException) -> tuple[int, str, str]:
        """(status, one-line message, type) of an error, as the JSON error answers give them."""
        if isinstance(exc, ApiError):
            return exc.status, exc.message, exc.type
        if isinstance(exc, Overloaded):
            return 429, str(exc), "overloaded_error"
        if isinstance(exc, WorkerStopped):
            return 503, str(exc), "unavailable_error"
        if isinstance(exc, RagenError):
            return 400, str(exc).splitlines()[0] if str(exc) else type(exc).__name__, "invalid_request_error"
        logger.error("internal error while streaming", exc_info=exc)
        return 500, "internal server error (see the server log)", "server_error"

    async def call(self, fn, label: str):
        try:
            future = self.worker.submit_call(fn, label=label)
        except Overloaded:
            self.metrics.inc("ragen_rejected_total", reason="queue_full")
            raise
        return await self.run(future)

    def close(self) -> None:
        for served in self.indexes.values():
            served.close()


def _own_generator(encoder):
    """The chat generator inside an LLM2Vec-Gen encoder (its own ``lm``), or None for encoders without one."""
    lm, tok = getattr(encoder, "lm", None), getattr(encoder, "tokenizer", None)
    if lm is None or tok is None or not callable(getattr(lm, "generate", None)):
        return None
    from ..rag import ChatGenerator, GenerationError

    try:
        return ChatGenerator.from_encoder(encoder)
    except GenerationError as exc:  # e.g. no chat template: chat answers 400, the rest is served
        logger.warning("no chat completions: %s", exc)
        return None


def _int_field(data: dict, name: str, default: int, low: int, high: int) -> int:
    value = data.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer, got {json.dumps(value)[:40]}")
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be between {low} and {high}, got {value}")
    return value


def create_app(encoder, *, indexes: Mapping[str, str | Path] | None = None, config: ServeConfig | None = None,
               device: str | None = None, generator=None, guard=None):
    """The Starlette application serving ``encoder`` and ``indexes`` (name -> index directory).

    ``generator``: a :class:`~ragen.rag.ChatGenerator` for ``/v1/chat/completions`` (default: the
    LLM2Vec-Gen encoder's own backbone; none for baseline encoders). ``guard``: a refusal guard on every
    search and grounded chat, as ``Retriever(guard=...)`` takes it (``True``: each index's ``guard.json``,
    else the defaults; a path: that guard file).

    Indexes are opened and checked against the encoder here, so a wrong one fails before anything
    listens. The inference worker starts with the application's lifespan and drains on shutdown.
    """
    _require_starlette()
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    config = config or ServeConfig()
    state = ServerState(encoder, indexes or {}, config, device=device, generator=generator, guard=guard)

    def error_response(status: int, message: str, type: str, code: str | None = None,
                       headers: Mapping[str, str] | None = None) -> Response:
        return JSONResponse(error_body(message, type, code), status_code=status, headers=dict(headers or {}))

    def endpoint(route: str, *, auth: bool = True):
        def wrap(fn):
            async def handler(request: Request) -> Response:
                t0 = time.perf_counter()
                try:
                    if auth:
                        state.check_auth(request)
                    response = await fn(request)
                except ApiError as exc:
                    response = error_response(exc.status, exc.message, exc.type, exc.code, exc.headers)
                except Overloaded as exc:
                    response = error_response(429, str(exc), "overloaded_error", "queue_full",
                                              {"Retry-After": str(config.retry_after_s)})
                except WorkerStopped as exc:
                    response = error_response(503, str(exc), "unavailable_error", "shutting_down",
                                              {"Retry-After": str(config.retry_after_s)})
                except RagenError as exc:
                    response = error_response(400, str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                                              "invalid_request_error")
                except Exception:  # a bug: logged with its traceback, answered without one
                    logger.exception("internal error on %s", route)
                    response = error_response(500, "internal server error (see the server log)", "server_error")
                state.metrics.inc("ragen_requests_total", route=route, status=str(response.status_code))
                state.metrics.observe("ragen_request_duration_seconds", time.perf_counter() - t0, route=route)
                return response

            handler.__name__ = fn.__name__
            return handler

        return wrap

    async def read_json(request: Request) -> dict:
        limit = config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            state.metrics.inc("ragen_rejected_total", reason="body_too_large")
            raise ApiError(413, f"the request body has {int(declared)} bytes; the limit is {limit}",
                           "invalid_request_error", "body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                state.metrics.inc("ragen_rejected_total", reason="body_too_large")
                raise ApiError(413, f"the request body exceeds {limit} bytes", "invalid_request_error",
                               "body_too_large")
        try:
            data = json.loads(bytes(body))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON ({str(exc).splitlines()[0][:80]})") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return data

    @endpoint("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        data = await read_json(request)
        state.check_model(data.get("model"))
        texts = state.texts(data.get("input"))
        fmt = data.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise ApiError(400, f"'encoding_format' must be float or base64, got {json.dumps(fmt)[:40]}")
        dim = int(encoder.dim)
        dims = data.get("dimensions")
        if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims != dim):
            raise ApiError(400, f"model {state.model_id!r} gives {dim}-dimensional vectors and cannot shorten them; "
                                f"omit 'dimensions' or pass {dim}", "invalid_request_error", "unsupported_dimensions")
        kind = data.get("input_type") or "document"
        if kind not in KINDS:
            raise ApiError(400, f"'input_type' must be query or document, got {json.dumps(kind)[:40]}")
        normalize = data.get("normalize", config.normalize)
        if not isinstance(normalize, bool):
            raise ApiError(400, "'normalize' must be true or false")
        instruction = state.instruction_for(data)
        counts = await state.count_tokens(texts)
        vectors = await state.embed(texts, counts, kind, instruction)
        if normalize:
            vectors = l2_normalize(vectors)
        tokens = int(sum(counts))
        state.metrics.inc("ragen_tokens_total", tokens, route="/v1/embeddings")
        if fmt == "base64":
            items = [base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii") for v in vectors]
        else:
            items = [v.tolist() for v in vectors]
        return JSONResponse({"object": "list", "model": state.model_id,
                             "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(items)],
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    def model_card() -> dict:
        return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "ragen",
                "spec": str(encoder.spec), "dim": int(encoder.dim), "fingerprint": str(encoder.fingerprint),
                "encoder": type(encoder).__name__, "decodes": state.decodes,
                "chat": state.generator.source if state.generator is not None else None,
                "guard": sorted(state.guards),
                "query_instruction": getattr(encoder, "query_instruction", None),
                "document_instruction": getattr(encoder, "document_instruction", None),
                "max_input_length": state.counter.max_length, "indexes": sorted(state.indexes)}

    @endpoint("/v1/models")
    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @endpoint("/v1/models/{model_id:path}")
    async def model(request: Request) -> Response:
        state.check_model(request.path_params["model_id"])
        return JSONResponse(model_card())

    @endpoint("/v1/search")
    async def search(request: Request) -> Response:
        data = await read_json(request)
        state.check_model(data.get("model"))
        served = state.index(data.get("index"))
        query = data.get("query")
        if not isinstance(query, str) or not query.strip():
            raise ApiError(400, "'query' must be a non-empty string")
        k = _int_field(data, "k", 10, 1, config.max_k)
        verdict, hits, _vector, generation = await state.retrieve(served, query, k, data.get("guard"))
        body = {"object": "list", "index": served.name, "generation": generation, "model": state.model_id,
                "data": [hit_json(h) for h in hits]}
        if verdict is not None:
            body.update(blocked=verdict.blocked, reason=verdict.reason, guard=verdict.to_dict())
        return JSONResponse(body)

    def require_decoder(route: str) -> None:
        if not state.decodes:
            raise ApiError(400, f"{route} needs an LLM2Vec-Gen model; {encoder.spec} embeds the input text and has "
                                "nothing to decode", "invalid_request_error", "model_cannot_decode")

    def decode_instruction(data: dict) -> str | None:
        """``instruction`` verbatim; else ``input_type``'s instruction; else none (as ``ragen decode``)."""
        instruction = state.instruction_for(data)
        kind = data.get("input_type")
        if kind is not None and kind not in KINDS:
            raise ApiError(400, f"'input_type' must be query or document, got {json.dumps(kind)[:40]}")
        if instruction is None and kind is not None:
            instruction = getattr(encoder, f"{kind}_instruction", None)
        return instruction

    async def decoder_request(request: Request, route: str) -> tuple[dict, list[str], str | None, list[int]]:
        """What /v1/decode and /v1/top_tokens share: the body, its texts, the instruction, token counts."""
        require_decoder(route)
        data = await read_json(request)
        state.check_model(data.get("model"))
        texts = state.texts(data.get("input"))
        return data, texts, decode_instruction(data), await state.count_tokens(texts)

    @endpoint("/v1/decode")
    async def decode(request: Request) -> Response:
        data, texts, instruction, counts = await decoder_request(request, "/v1/decode")
        max_new = _int_field(data, "max_new_tokens", 64, 1, config.max_new_tokens)
        decoded = await state.call(lambda enc: enc.decode(texts, instruction=instruction, max_new_tokens=max_new),
                                   "decode")
        state.metrics.inc("ragen_tokens_total", int(sum(counts)), route="/v1/decode")
        return JSONResponse({"object": "list", "model": state.model_id,
                             "data": [{"index": i, "text": t} for i, t in enumerate(decoded)],
                             "usage": {"prompt_tokens": int(sum(counts)), "total_tokens": int(sum(counts))}})

    @endpoint("/v1/top_tokens")
    async def top_tokens(request: Request) -> Response:
        data, texts, instruction, counts = await decoder_request(request, "/v1/top_tokens")
        k = _int_field(data, "k", 5, 1, 100)
        tops = await state.call(lambda enc: enc.top_tokens(texts, k, instruction=instruction), "top_tokens")
        state.metrics.inc("ragen_tokens_total", int(sum(counts)), route="/v1/top_tokens")
        return JSONResponse({"object": "list", "model": state.model_id,
                             "data": [{"index": i, "positions": [[{"token": t, "prob": p} for t, p in pos]
                                                                  for pos in per_text]}
                                      for i, per_text in enumerate(tops)]})

    from .chat import register as register_chat

    chat_completions = register_chat(state, config, ApiError, read_json, endpoint)

    @endpoint("/health", auth=False)
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @endpoint("/ready")
    async def ready(request: Request) -> Response:
        if not state.worker.running:
            raise ApiError(503, "the server is not ready (starting or shutting down)", "unavailable_error",
                           "not_ready", {"Retry-After": str(config.retry_after_s)})
        return JSONResponse({"status": "ready", "model": state.model_id,
                             "indexes": {n: s.generation for n, s in state.indexes.items()},
                             "queue_depth": state.worker.queue_depth})

    @endpoint("/metrics")
    async def metrics(request: Request) -> Response:
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        state.metrics.inc("ragen_requests_total", route="other", status=str(exc.status_code))
        return error_response(exc.status_code, message.get(exc.status_code, str(exc.detail)), "invalid_request_error",
                              {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code))

    async def server_error(request: Request, exc: Exception) -> Response:
        logger.exception("internal error on %s", request.url.path, exc_info=exc)
        return error_response(500, "internal server error (see the server log)", "server_error")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.worker.start()
        logger.info("serving %s (dim %d) with indexes %s", state.model_id, int(encoder.dim), sorted(state.indexes))
        try:
            yield
        finally:
            # uvicorn has stopped accepting and finished the requests in flight; finish any queued job.
            await asyncio.to_thread(state.worker.stop, drain=True)
            state.close()

    routes = [
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", model, methods=["GET"]),
        Route("/v1/search", search, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/decode", decode, methods=["POST"]),
        Route("/v1/top_tokens", top_tokens, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.ragen = state
    return app


__all__ = ["create_app", "ServerState", "ServedIndex", "ApiError", "hit_json"]
