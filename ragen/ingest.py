"""Streaming ingestion: read, chunk, embed and stage a folder's files with bounded memory.

:func:`ingest` walks the scanned files once. Each file is classified before it is read:

- **unchanged** (in the committed index, same size and mtime, mtime well before the recorded read; or,
  when the mtime is within :data:`~ragen.corpus.RACY_WINDOW_NS` of that read, the same SHA-256 of its
  bytes): nothing to do;
- **resumed** (extracted by an interrupted run with the same settings and unchanged since): taken from
  the staging tables, never extracted again (a PDF's extraction survives ``kill -9``);
- **remembered skip** (an earlier run found its bytes unindexable, and it did not change): counted under
  its recorded reason, not read;
- otherwise it is read and chunked; chunks whose text has no vector yet are queued.

Queued texts are embedded once a window fills (longest first, so batches pad little), each batch
committed on its own (:meth:`~ragen.store.StoreWriter.add_vectors`); then the window's files are staged
(:meth:`~ragen.store.StoreWriter.stage`), one transaction. Memory holds one window of texts and the list
of paths, never the corpus. A killed run loses at most the batch being embedded and the files read since
the last flush; the next run with the same settings resumes from what was staged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .corpus import (ChunkingConfig, FileSelection, SkipFile, SourceFile, chunk_document, file_sha256, read_document,
                     stat_verdict)
from .store import FileRecord, FileState, SkippedFile, StoreWriter

logger = logging.getLogger(__name__)

FLUSH_SECONDS = 30.0  # stage what was read at least this often, so slow extraction (PDFs) is never lost for long


WINDOW_BATCHES = 16  # texts queued before embedding: this many batches per rank (at least 256 texts)


@dataclass
class IngestResult:
    """What :func:`ingest` found and did."""

    present: list[str] = field(default_factory=list)  # every path that belongs in the index now
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> files
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    content_skips: set[str] = field(default_factory=set)  # skipped by their bytes (remembered)
    replaced: list[str] = field(default_factory=list)  # undecodable bytes replaced
    restamp: list[tuple[str, str, int]] = field(default_factory=list)  # (path, sha256, read_ns): hashed, unchanged
    files_changed: int = 0  # read now, or resumed
    files_resumed: int = 0  # taken from an interrupted run's staging
    files_hashed: int = 0  # racy files whose bytes were hashed
    chunks_new: int = 0  # chunks of the changed files
    embedded: int = 0
    encode_seconds: float = 0.0
    truncated: int | None = None


class _Embedder:
    """Embeds queued texts batch by batch (over every rank of a distributed run), committing each batch."""

    def __init__(self, writer: StoreWriter, encoder, parallel, batch_size: int, budget, emit) -> None:
        self.writer, self.encoder, self.parallel = writer, encoder, parallel
        self.batch_size = batch_size
        self.ranks = parallel.world_size if parallel is not None else 1
        self.budget = budget
        self.emit = emit
        self.queued = 0

    def run(self, todo: dict[str, str], result: IngestResult) -> None:
        order = sorted(todo, key=lambda h: -len(todo[h]))
        step = self.batch_size * self.ranks
        for start in range(0, len(order), step):
            part = order[start:start + step]
            groups = [part[s:s + self.batch_size] for s in range(0, len(part), self.batch_size)]
            if self.budget is not None:
                result.truncated = (result.truncated or 0) + sum(self.budget.truncated([todo[h] for h in g])
                                                                 for g in groups)
            t0 = time.perf_counter()
            if self.parallel is None:
                encoded = [self.encoder.encode_documents([todo[h] for h in groups[0]], batch_size=self.batch_size,
                                                         normalize=True)]
            else:
                encoded = self.parallel.encode([[todo[h] for h in g] for g in groups], self.batch_size)
            result.encode_seconds += time.perf_counter() - t0
            for hashes, vectors in zip(groups, encoded):
                self.writer.add_vectors(hashes, np.asarray(vectors))
            result.embedded += len(part)
            self.emit("embed", result.embedded, self.queued)


def ingest(files: Sequence[SourceFile], writer: StoreWriter, *, encoder, parallel=None, budget=None,
           chunking: ChunkingConfig, splitter=None, selection: FileSelection, batch_size: int,
           framework: Iterable[str] = (), emit: Callable[[str, int, int, str], None] = lambda *a: None,
           window: int | None = None, flush_seconds: float | None = None) -> IngestResult:
    """Bring the writer's staging up to date with ``files`` (see the module docstring); the caller then
    commits with ``staged=True``. ``window``: texts to queue before embedding (default:
    :data:`WINDOW_BATCHES` batches per rank, at least 256); ``flush_seconds``: stage read files at least
    this often (default :data:`FLUSH_SECONDS`)."""
    result = IngestResult(truncated=0 if budget is not None else None)
    framework = set(framework)
    embedder = _Embedder(writer, encoder, parallel, batch_size, budget, emit)
    window = window or max(batch_size * embedder.ranks * WINDOW_BATCHES, 256)
    flush_seconds = FLUSH_SECONDS if flush_seconds is None else flush_seconds
    known = writer.file_states()
    staged = writer.staged_files()
    remembered = writer.remembered_skips()
    taken_staged: set[str] = set()
    restaged: set[str] = set()
    pending: list[FileRecord] = []
    pending_skips: list[SkippedFile] = []
    pending_chunks = 0
    todo: dict[str, str] = {}
    last_flush = time.monotonic()

    def skip(rel: str, reason: str) -> None:
        result.skipped[reason] = result.skipped.get(reason, 0) + 1
        result.skipped_files.append((rel, reason))

    def unchanged(state: FileState, sf: SourceFile) -> FileState | None:
        """The file's state if it did not change (with a new read time when its bytes were hashed now)."""
        verdict = stat_verdict(state.size, state.mtime_ns, state.read_ns, sf)
        if verdict == "racy" and state.sha256 is not None:
            result.files_hashed += 1
            got = file_sha256(sf, selection.max_file_size)
            return state._replace(read_ns=got[1]) if got is not None and got[0] == state.sha256 else None
        return state if verdict == "same" else None

    def flush() -> None:
        nonlocal pending, pending_skips, pending_chunks, todo, last_flush
        if todo:
            embedder.run(todo, result)
        if pending or pending_skips:
            writer.stage(pending, skipped=pending_skips)
            restaged.update(f.path for f in pending)
        pending, pending_skips, pending_chunks, todo = [], [], 0, {}
        last_flush = time.monotonic()

    total = len(files)
    for n, sf in enumerate(files, 1):
        rel = sf.relpath
        emit("read", n, total, rel)
        if rel in framework:
            skip(rel, "path held by a document a framework vector store added")
            continue
        state = known.get(rel)
        if state is not None and (now := unchanged(state, sf)) is not None:
            result.present.append(rel)  # unchanged since the last committed run: nothing to read
            if now.read_ns != state.read_ns:  # hashed now: a later run can trust the stat sooner
                result.restamp.append((rel, now.sha256, now.read_ns))
            continue
        was = staged.get(rel)
        if was is not None and unchanged(was, sf) is not None:
            taken_staged.add(rel)  # an interrupted run already extracted it: not read again
            result.present.append(rel)
            result.files_changed += 1
            result.files_resumed += 1
            continue
        old_skip = remembered.get(rel)
        if old_skip is not None and (now := unchanged(old_skip.state, sf)) is not None:
            skip(rel, old_skip.reason)
            result.content_skips.add(rel)
            if now.read_ns != old_skip.state.read_ns:
                pending_skips.append(SkippedFile(rel, now, old_skip.reason))
            continue
        try:
            doc = read_document(sf, max_file_size=selection.max_file_size)
        except SkipFile as why:
            reason = str(why)
            skip(rel, reason)
            logger.info("skipping %s: %s", rel, reason)
            if why.remembered:
                result.content_skips.add(rel)
                pending_skips.append(SkippedFile(rel, FileState(sf.size, sf.mtime_ns, why.sha256, why.read_ns), reason))
            continue
        if doc.replaced:
            result.replaced.append(rel)
            logger.warning("%s: undecodable bytes replaced with U+FFFD", rel)
        chunks = tuple(chunk_document(doc, chunking, splitter=splitter))
        pending.append(FileRecord(rel, sf.size, sf.mtime_ns, chunks, doc.sha256, doc.read_ns))
        result.present.append(rel)
        result.files_changed += 1
        result.chunks_new += len(chunks)
        pending_chunks += len(chunks)
        fresh = {c.content_hash for c in chunks if c.content_hash not in todo}
        missing = writer.missing_vectors(fresh) if fresh else set()
        for c in chunks:
            if c.content_hash in missing and c.content_hash not in todo:
                todo[c.content_hash] = c.text
                embedder.queued += 1
        if (len(todo) >= window or pending_chunks >= 8 * window or len(pending) >= 4096
                or time.monotonic() - last_flush >= flush_seconds):
            flush()
    flush()
    # staged by an interrupted run but not taken now (changed again, deleted, skipped): not this run's work
    writer.unstage(set(staged) - taken_staged - restaged)
    if taken_staged:
        result.chunks_new += writer.staged_chunk_count(taken_staged - restaged)
        left = writer.staged_missing_vectors()  # vectors an interrupted run had not stored yet
        if left:
            embedder.queued += len(left)
            embedder.run(left, result)
    return result
