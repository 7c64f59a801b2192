"""The inference worker: one thread owns the model; HTTP handlers hand it jobs and await futures.

Two kinds of job share one FIFO queue:

- :class:`EmbedJob` (texts to embed as queries or documents). The worker merges the embed jobs waiting at
  the head of the queue (up to ``max_batch_tokens`` of input, waiting at most ``max_wait_ms`` after the
  first one arrived for more to come), sorts their texts by length and runs them as padded forward batches
  of at most ``max_batch_tokens`` (batch size x longest input) and ``max_batch_size`` texts. Results are
  scattered back to each job in input order.
- :class:`CallJob` (any function of the encoder: decode, top tokens, the steps of a chat completion). It runs
  alone on the worker thread, in queue order, so it never races a forward batch for the model. A
  streaming endpoint passes a function that pushes its pieces to the event loop
  (``loop.call_soon_threadsafe``) as it produces them. A call holds the model for its whole run, so a chat
  completion submits itself in steps (one call per few tokens, keeping its KV cache between calls; see
  :mod:`ragen.serve.chat`), and embedding batches run between the steps.

The queue is bounded (``max_queue`` jobs); :meth:`InferenceWorker.submit_embed` and
:meth:`~InferenceWorker.submit_call` raise :class:`Overloaded` when it is full, so the server can answer
429 at once. Every accepted job's future is resolved: with the result, with the error the model raised, or
with :class:`WorkerStopped` if the worker is stopped without draining.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..encoders.base import takes_instructions
from ..errors import RagenError
from .metrics import Metrics

logger = logging.getLogger(__name__)

KINDS = ("query", "document")


class Overloaded(RagenError):
    """The queue is full: the request was not accepted (answer 429 with Retry-After)."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class WorkerStopped(RagenError):
    """The worker is shutting down and takes no more jobs (answer 503)."""


@dataclass(eq=False)
class EmbedJob:
    texts: list[str]
    kind: str
    instruction: str | None
    lengths: list[int]  # estimated model input length of each text, in tokens (for batching)
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    vectors: np.ndarray | None = None
    remaining: int = 0


@dataclass(eq=False)
class CallJob:
    fn: Callable[[Any], Any]
    label: str
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)


def _fail(job: EmbedJob | CallJob, exc: BaseException) -> None:
    """Answer a queued job with ``exc`` (a job whose request already gave up stays cancelled)."""
    if job.future.set_running_or_notify_cancel():
        job.future.set_exception(exc)


class InferenceWorker:
    """Owns ``encoder`` on one thread; see the module docstring."""

    def __init__(self, encoder, *, max_batch_tokens: int = 16384, max_batch_size: int = 64,
                 max_wait_ms: float = 5.0, max_queue: int = 256, metrics: Metrics | None = None) -> None:
        if max_batch_tokens < 1 or max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise RagenError("max_batch_tokens, max_batch_size and max_queue must be >= 1, max_wait_ms >= 0")
        self.encoder = encoder
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_batch_size = int(max_batch_size)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.max_queue = int(max_queue)
        self.metrics = metrics
        self._instructions = takes_instructions(encoder)
        self._queue: deque[EmbedJob | CallJob] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._busy = False
        self._thread: threading.Thread | None = None

    # --- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="ragen-inference", daemon=True)
        self._thread.start()

    def stop(self, *, drain: bool = True, timeout: float | None = 60.0) -> None:
        """Stop taking jobs; with ``drain`` finish the queued ones first, else fail them with WorkerStopped."""
        with self._cond:
            self._stopping = True
            if not drain:
                dropped = list(self._queue)
                self._queue.clear()
                for job in dropped:
                    _fail(job, WorkerStopped("the server is shutting down"))
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:  # whatever is left (a join timeout): answered, never dropped
            for job in self._queue:
                _fail(job, WorkerStopped("the server is shutting down"))
            self._queue.clear()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    # --- submitting -------------------------------------------------------------------------------------
    def _put(self, job: EmbedJob | CallJob) -> Future:
        with self._cond:
            if self._stopping:
                raise WorkerStopped("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise Overloaded(f"the server is busy: {len(self._queue)} requests are queued (limit "
                                 f"{self.max_queue}); retry later")
            self._queue.append(job)
            self._cond.notify()
        return job.future

    def submit_embed(self, texts: Sequence[str], *, kind: str, lengths: Sequence[int],
                     instruction: str | None = None) -> Future:
        """Queue texts for embedding; the future gives raw float32 vectors ``(len(texts), dim)``.

        ``instruction``: ``None`` is the model's own query/document instruction, ``""`` none; encoders
        without instructions get a non-empty one prepended to each text."""
        if kind not in KINDS:
            raise RagenError(f"kind must be query or document, got {kind!r}")
        texts = list(texts)
        if len(lengths) != len(texts):
            raise RagenError("one length per text is needed")
        job = EmbedJob(texts, kind, instruction, [max(1, int(n)) for n in lengths])
        job.remaining = len(texts)
        if not texts:
            job.future.set_result(np.zeros((0, int(self.encoder.dim)), np.float32))
            return job.future
        return self._put(job)

    def submit_call(self, fn: Callable[[Any], Any], *, label: str = "call") -> Future:
        """Queue ``fn(encoder)`` to run alone on the worker thread; the future gives its return value."""
        return self._put(CallJob(fn, label))

    # --- the worker thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return  # stopping and drained
                job = self._queue.popleft()
            if not job.future.set_running_or_notify_cancel():
                continue  # its request gave up waiting (timeout): nobody needs the answer
            self._observe_wait(job)
            if isinstance(job, CallJob):
                self._run_call(job)
            else:
                self._run_embeds(self._collect(job))

    def _observe_wait(self, job: EmbedJob | CallJob) -> None:
        if self.metrics is not None:
            self.metrics.observe("ragen_queue_wait_seconds", time.monotonic() - job.enqueued)

    def _collect(self, first: EmbedJob) -> list[EmbedJob]:
        """``first`` plus the embed jobs queued behind it, within the token budget and the wait limit."""
        jobs = [first]
        tokens = sum(first.lengths)
        deadline = first.enqueued + self.max_wait_s
        while tokens < self.max_batch_tokens:
            with self._cond:
                while not self._queue and not self._stopping:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if not self._queue or not isinstance(self._queue[0], EmbedJob):
                    break
                job = self._queue.popleft()
            if not job.future.set_running_or_notify_cancel():
                continue
            self._observe_wait(job)
            jobs.append(job)
            tokens += sum(job.lengths)
        return jobs

    def _run_call(self, job: CallJob) -> None:
        t0 = time.perf_counter()
        try:
            result = job.fn(self.encoder)
        except Exception as exc:  # noqa: BLE001 - handed to the waiting request, which reports it
            if not isinstance(exc, RagenError):
                logger.exception("inference call %s failed", job.label)
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)
        finally:
            if self.metrics is not None:
                self.metrics.observe("ragen_inference_seconds", time.perf_counter() - t0, kind=job.label)

    def _run_embeds(self, jobs: list[EmbedJob]) -> None:
        if self.metrics is not None:
            self.metrics.observe("ragen_batch_requests", len(jobs))
        groups: dict[tuple[str, str | None], list[tuple[EmbedJob, int]]] = {}
        for job in jobs:
            for i in range(len(job.texts)):
                groups.setdefault((job.kind, job.instruction), []).append((job, i))
        for (kind, instruction), items in groups.items():
            items.sort(key=lambda it: -it[0].lengths[it[1]])  # longest first: similar lengths share a batch
            for batch in self._batches(items):
                self._forward(kind, instruction, batch)

    def _batches(self, items: list[tuple[EmbedJob, int]]):
        batch: list[tuple[EmbedJob, int]] = []
        for job, i in items:
            longest = batch[0][0].lengths[batch[0][1]] if batch else job.lengths[i]
            if batch and ((len(batch) + 1) * longest > self.max_batch_tokens or len(batch) >= self.max_batch_size):
                yield batch
                batch = []
            batch.append((job, i))
        if batch:
            yield batch

    def _forward(self, kind: str, instruction: str | None, batch: list[tuple[EmbedJob, int]]) -> None:
        live = [(job, i) for job, i in batch if not job.future.done()]  # a job failed by an earlier batch
        if not live:
            return
        texts = [job.texts[i] for job, i in live]
        t0 = time.perf_counter()
        try:
            vectors = self._encode(kind, instruction, texts)
        except Exception as exc:  # noqa: BLE001 - every job in the batch gets the error as its answer
            if not isinstance(exc, RagenError):
                logger.exception("embedding a batch of %d texts failed", len(texts))
            for job in {id(j): j for j, _ in live}.values():
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        if self.metrics is not None:
            self.metrics.observe("ragen_inference_seconds", time.perf_counter() - t0, kind="embed")
            self.metrics.observe("ragen_batch_size", len(texts))
            self.metrics.observe("ragen_batch_tokens", len(texts) * max(j.lengths[i] for j, i in live))
            self.metrics.inc("ragen_inputs_total", len(texts), input_type=kind)
        for row, (job, i) in enumerate(live):
            if job.vectors is None:
                job.vectors = np.zeros((len(job.texts), vectors.shape[1]), dtype=np.float32)
            job.vectors[i] = vectors[row]
            job.remaining -= 1
            if job.remaining == 0:
                job.future.set_result(job.vectors)

    def _encode(self, kind: str, instruction: str | None, texts: list[str]) -> np.ndarray:
        enc = self.encoder
        method = enc.encode_queries if kind == "query" else enc.encode_documents
        # one forward batch either way; the largest batch size lets a compiled encoder pad to a bucket
        size = max(len(texts), self.max_batch_size)
        if self._instructions:
            out = method(texts, instruction=instruction, batch_size=size)
        else:
            if instruction:
                texts = [instruction + t for t in texts]
            out = method(texts, batch_size=size)
        return np.asarray(out, dtype=np.float32)


__all__ = ["InferenceWorker", "Overloaded", "WorkerStopped", "EmbedJob", "CallJob", "KINDS"]
