"""Encoder + store: build an index from a folder (:func:`build_index`) and search it (:class:`Retriever`).

The only module that sees both an encoder and the store. Everything it records about the encoder goes
through :class:`~ragen.store.EncoderInfo` (spec, fingerprint, dim, instructions), so the store stays free
of model code.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .corpus import (DEFAULT_CHUNK_OVERLAP, DEFAULT_CHUNK_SIZE, ChunkingConfig, FileSelection, ScanReport,
                     default_token_overlap, scan, token_splitter)
from .errors import DataError, StoreError
from .guard import GuardVerdict, RefusalGuard, resolve_guard
from .store import EncoderInfo, FileRecord, IndexConfig, Store, StoreWriter, read_manifest
from .types import Hit

logger = logging.getLogger(__name__)

STAGES = ("scan", "read", "embed", "write", "done")


@dataclass(frozen=True)
class ProgressEvent:
    """A progress report from :func:`build_index`.

    ``stage``: ``scan`` (walking the folder), ``read`` (extracting and chunking files; ``done``/``total``
    count files), ``embed`` (``done``/``total`` count chunks embedded so far / queued so far: files are read
    and embedded in windows, so ``total`` grows while files are read), ``write`` (building
    and switching to the new FAISS generation), ``done``. ``detail`` is a short human-readable note.
    """

    stage: str
    done: int
    total: int
    detail: str = ""


@dataclass(frozen=True)
class Retrieval:
    """What :meth:`Retriever.retrieve` found: the hits (empty when the guard blocked the query), the guard's
    verdict (``None`` without a guard), and the seconds spent embedding, checking and searching."""

    query: str
    hits: list[Hit]
    verdict: GuardVerdict | None
    embed_seconds: float
    guard_seconds: float
    search_seconds: float

    @property
    def blocked(self) -> bool:
        return self.verdict is not None and self.verdict.blocked


@dataclass(frozen=True)
class IndexStats:
    """What a :func:`build_index` run did.

    ``files_seen``: every file found under the source (supported or not). ``files_indexed``: files in
    the index after the run. ``files_changed``: new or modified files read in this run. ``files_skipped``:
    unsupported, binary or unreadable files (per reason in ``skipped``). ``chunks_embedded``: vectors
    computed in this run (chunks already stored, e.g. by an interrupted run, are not embedded again).
    ``files_with_replacements``: files whose undecodable bytes were replaced with U+FFFD.
    ``skipped_files``: ``(relpath, reason)`` of every skipped file. ``files_resumed``: changed files an
    interrupted run had already extracted (taken from its staging, not read again; counted in
    ``files_changed``). ``files_hashed``: files whose size and mtime matched but whose mtime was too close
    to their last read to trust, so their bytes were hashed.
    """

    files_seen: int
    files_indexed: int
    files_skipped: int
    chunks_total: int
    chunks_embedded: int
    chunks_removed: int
    seconds: float
    files_changed: int = 0
    files_removed: int = 0
    encode_seconds: float = 0.0
    index_kind: str = "flat"
    generation: int = 0
    skipped: tuple[tuple[str, int], ...] = ()
    files_with_replacements: tuple[str, ...] = ()
    skipped_files: tuple[tuple[str, str], ...] = ()
    chunks_truncated: int | None = None
    token_limit: int | None = None
    chunking: dict | None = None
    files_resumed: int = 0
    files_hashed: int = 0


def encoder_budget(encoder):
    """The encoder's :class:`~ragen.encoders.base.TokenBudget` (its tokenizer and input limit), or None."""
    method = getattr(encoder, "document_token_budget", None)
    return method() if callable(method) else None


def resolve_chunking(encoder, chunk_unit: str | None = None, chunk_size: int | None = None,
                     chunk_overlap: int | None = None, budget=None) -> ChunkingConfig:
    """The chunking for ``encoder``: ``chunk_unit`` (default: ``tokens`` when the encoder exposes its
    tokenizer, else ``chars``); ``chunk_size`` (tokens: default the encoder's input limit minus the document
    instruction and special tokens; chars: 1000); ``chunk_overlap`` (tokens: a fifth; chars: 200)."""
    budget = encoder_budget(encoder) if budget is None else budget
    unit = chunk_unit or ("tokens" if budget is not None else "chars")
    if unit == "tokens":
        if budget is None:
            raise DataError(f"chunk unit tokens: the encoder {getattr(encoder, 'spec', encoder)} exposes no "
                            "tokenizer; use --chunk-unit chars")
        size = budget.max_text_tokens if chunk_size is None else chunk_size
        overlap = default_token_overlap(size) if chunk_overlap is None else chunk_overlap
        return ChunkingConfig(chunk_size=size, chunk_overlap=overlap, unit="tokens")
    return ChunkingConfig(chunk_size=DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size,
                          chunk_overlap=DEFAULT_CHUNK_OVERLAP if chunk_overlap is None else chunk_overlap, unit=unit)


@dataclass(frozen=True)
class RecordedEncoder(EncoderInfo):
    """:class:`~ragen.store.EncoderInfo` plus how the encoder was loaded, so that queries load the same one:
    the hub ``revision``/``base_revision`` asked for, ``numerics``, ``trust_remote_code``, and
    ``resolved_revisions`` (the hub commits actually loaded, e.g. ``{"checkpoint": sha, "base_model": sha}``;
    None for local directories)."""

    revision: str | None = None
    base_revision: str | None = None
    numerics: str | None = None
    trust_remote_code: bool = False
    resolved_revisions: dict | None = None

    @classmethod
    def from_manifest(cls, data: object) -> RecordedEncoder:
        """The encoder section of a manifest (unknown keys ignored)."""
        data = data if isinstance(data, dict) else {}
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


LOAD_OPTIONS = ("revision", "base_revision", "numerics", "trust_remote_code")


def encoder_info(encoder, load_options: dict | None = None) -> RecordedEncoder:
    """What the manifest records about ``encoder``; a local-directory spec is stored as an absolute path
    so that queries from another working directory load the same model. ``load_options``: the
    ``revision``/``base_revision``/``numerics``/``trust_remote_code`` it was loaded with."""
    spec = str(encoder.spec)
    local = Path(spec).expanduser()
    if local.exists():
        spec = str(local.resolve())
    base = getattr(encoder, "base_model", None)
    if base and Path(str(base)).expanduser().exists():
        base = str(Path(str(base)).expanduser().resolve())
    opts = {k: v for k, v in (load_options or {}).items() if k in LOAD_OPTIONS and v is not None}
    numerics = opts.get("numerics", getattr(encoder, "numerics", None))
    resolved = getattr(encoder, "resolved_revisions", None)
    return RecordedEncoder(spec=spec, fingerprint=str(encoder.fingerprint), dim=int(encoder.dim),
                           query_instruction=getattr(encoder, "query_instruction", None),
                           document_instruction=getattr(encoder, "document_instruction", None),
                           base_model=str(base) if base else None,
                           revision=opts.get("revision"), base_revision=opts.get("base_revision"),
                           numerics=numerics if isinstance(numerics, str) else None,
                           trust_remote_code=bool(opts.get("trust_remote_code", False)),
                           resolved_revisions=dict(resolved) if isinstance(resolved, dict) else None)


def recorded_load_options(manifest_encoder: object) -> dict:
    """``load_encoder`` keyword arguments that load the encoder an index recorded: its backbone, numerics,
    remote-code opt-in, and the hub commits it resolved to (else the revisions it asked for), so that a
    checkpoint replaced on the hub later is not silently swapped in."""
    rec = RecordedEncoder.from_manifest(manifest_encoder)
    resolved = rec.resolved_revisions if isinstance(rec.resolved_revisions, dict) else {}
    main = resolved.get("checkpoint") or resolved.get("model")
    out: dict = {"base_model": rec.base_model,
                 "revision": main if isinstance(main, str) and main else rec.revision,
                 "base_revision": resolved.get("base_model") if isinstance(resolved.get("base_model"), str)
                 else rec.base_revision,
                 "trust_remote_code": rec.trust_remote_code is True}
    if isinstance(rec.numerics, str):
        out["numerics"] = rec.numerics
    return out


def scan_source(source: str | Path, index_dir: str | Path, selection: FileSelection | None = None) -> ScanReport:
    """The supported files under ``source`` (the index directory itself excluded). Raises
    :class:`~ragen.errors.DataError` when there is nothing to index, so callers can check a folder before
    loading a model."""
    src = Path(source).expanduser()
    report = scan(src, exclude=(Path(index_dir).expanduser(),), selection=selection)
    files_seen = len(report.files) + report.files_skipped
    if files_seen == 0:
        raise DataError(f"{source}: no files found")
    if not report.files:
        if set(report.skipped) == {"unsupported type"}:
            raise DataError(f"{source}: none of the {files_seen} files is a supported type "
                            f"({_describe_skips(report.skipped)}); supported: text, markdown, rst, html, pdf, "
                            "source code, json/jsonl")
        raise DataError(f"{source}: none of the {files_seen} files is selected ({_describe_skips(report.skipped)}); "
                        "see --include/--exclude/--no-gitignore/--max-file-size, and --list-skipped")
    return report


def build_index(
    source: str | Path,
    index_dir: str | Path,
    *,
    encoder,
    chunk_size: int | None = None,
    chunk_overlap: int | None = None,
    chunk_unit: str | None = None,
    batch_size: int = 32,
    rebuild: bool = False,
    progress: Callable[[ProgressEvent], None] | None = None,
    index_type: str = "flat",
    index_config: IndexConfig | None = None,
    scanned: ScanReport | None = None,
    selection: FileSelection | None = None,
    load_options: dict | None = None,
    parallel=None,
) -> IndexStats:
    """Index the supported files under ``source`` into ``index_dir``, incrementally.

    Only new or changed chunks are embedded (matched by content hash); files that disappeared are
    removed; ``rebuild=True`` re-embeds everything. Safe to kill at any moment: the previous index stays
    loadable and the next run resumes. ``index_type``: ``flat`` (exact, default), ``hnsw`` or ``ivf``
    (approximate, for large corpora); ``index_config`` sets their parameters (and wins over ``index_type``).
    ``scanned``: the result of :func:`scan_source` when the caller already checked the folder.
    ``selection``: include/exclude globs, ``.gitignore``, size cap; recorded in the manifest (under
    ``chunking.files``) so that a plain re-run selects the same files. Chunking: see
    :func:`resolve_chunking` (by default, chunks measured in the encoder's tokens that fit its input);
    ``IndexStats.chunks_truncated`` counts the chunks embedded now that exceeded the encoder's limit (None
    when the encoder exposes no tokenizer). ``load_options``: how the encoder was loaded (``revision``,
    ``base_revision``, ``numerics``, ``trust_remote_code``), recorded with its resolved hub commits.
    """
    t0 = time.perf_counter()
    emit = progress or (lambda event: None)
    budget = encoder_budget(encoder)
    chunking = resolve_chunking(encoder, chunk_unit, chunk_size, chunk_overlap, budget)
    splitter = token_splitter(chunking, budget.tokenizer) if chunking.unit == "tokens" else None
    config = index_config or IndexConfig(kind=index_type)
    selection = selection or FileSelection()
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    src = Path(source).expanduser()
    index_path = Path(index_dir).expanduser()

    emit(ProgressEvent("scan", 0, 0, str(src)))
    report = scanned if scanned is not None else scan_source(src, index_path, selection)
    files_seen = len(report.files) + report.files_skipped
    emit(ProgressEvent("scan", len(report.files), len(report.files), f"{len(report.files)} files"))

    info = encoder_info(encoder, load_options)
    writer = StoreWriter(index_path, encoder=info, chunking={**chunking.to_dict(), "files": selection.to_dict()},
                         index_config=config,
                         rebuild=rebuild, source=str(src.resolve()))
    committed = False
    try:
        known = writer.known_files()
        skipped = dict(report.skipped)
        skipped_files = list(report.skipped_files)
        updated: list[FileRecord] = []
        present: list[str] = []
        replaced: list[str] = []
        # documents a framework vector store added are not this folder's files: never removed or re-read here
        # (a pass that re-commits every file carries them over with their chunks and vectors)
        framework = framework_documents(index_path) if not writer.created else set()
        old_encoder = (writer.committed or {}).get("encoder") or {}
        if framework and old_encoder.get("fingerprint") not in (None, info.fingerprint):
            raise DataError(f"{index_path}: holds {len(framework)} document(s) a framework vector store added with "
                            f"encoder {old_encoder.get('spec')}; their vectors cannot move to {info.spec}. Index "
                            "into another --index, or delete those documents through the framework first")
        if framework:
            present.extend(sorted(framework))
            if writer.full:
                kept, old_vectors = _framework_records(index_path, framework)
                updated.extend(kept)
                missing = writer.missing_vectors(old_vectors)
                if missing:
                    hashes = sorted(missing)
                    writer.add_vectors(hashes, np.stack([np.frombuffer(old_vectors[h], dtype=np.float32)
                                                         for h in hashes]))
        from .ingest import ingest

        got = ingest(report.files, writer, encoder=encoder, parallel=parallel, budget=budget, chunking=chunking,
                     splitter=splitter, selection=selection, batch_size=batch_size, framework=framework,
                     emit=lambda stage, done, total, detail="": emit(ProgressEvent(stage, done, total, detail)))
        present.extend(got.present)
        for reason, n in got.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
        skipped_files.extend(got.skipped_files)
        replaced.extend(got.replaced)
        if len(present) == len(framework):
            raise DataError(f"{source}: no readable files ({_describe_skips(skipped)})")
        if not got.chunks_new and not known:
            raise DataError(f"{source}: the {len(present)} readable files hold no text")

        emit(ProgressEvent("write", 0, 1, config.kind))
        result = writer.commit(updated, present, staged=True, restamp=got.restamp, skipped_paths=got.content_skips)
        committed = True
        emit(ProgressEvent("write", 1, 1, result.index_kind))
    finally:
        created = writer.created
        writer.close()
        if created and not committed and writer.generation == 0 and not _has_vectors(index_path):
            shutil.rmtree(index_path, ignore_errors=True)  # a run that failed before embedding anything
    stats = IndexStats(
        files_seen=files_seen, files_indexed=result.files, files_skipped=sum(skipped.values()),
        chunks_total=result.chunks, chunks_embedded=got.embedded, chunks_removed=result.chunks_removed,
        seconds=time.perf_counter() - t0, files_changed=got.files_changed, files_removed=result.files_removed,
        encode_seconds=got.encode_seconds, index_kind=result.index_kind, generation=result.generation,
        skipped=tuple(sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0]))),
        files_with_replacements=tuple(replaced), skipped_files=tuple(skipped_files),
        chunks_truncated=got.truncated, token_limit=budget.limit if budget is not None else None,
        chunking=chunking.to_dict(), files_resumed=got.files_resumed, files_hashed=got.files_hashed)
    if got.truncated:
        logger.warning("%d of %d chunks embedded now exceed the encoder's %d-token input limit and were truncated "
                       "(chunk unit %s, size %d)", got.truncated, got.embedded, budget.limit, chunking.unit,
                       chunking.chunk_size)
    emit(ProgressEvent("done", 1, 1, ""))
    return stats


FRAMEWORK_NODES_DB = "framework_nodes.sqlite"  # ragen.integrations' own table beside the index


def framework_documents(index_dir: str | Path) -> set[str]:
    """The paths in an index that a framework vector store (LlamaIndex/LangChain ``RagenVectorStore``) wrote,
    not a folder scan: every chunk a framework store commits has a row in its ``framework_nodes.sqlite``
    with the chunk's id and content hash. ``ragen index`` leaves these documents alone."""
    import sqlite3

    directory = Path(index_dir).expanduser()
    nodes_db, db = directory / FRAMEWORK_NODES_DB, directory / "chunks.sqlite"
    if not nodes_db.is_file() or not db.is_file():
        return set()
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30.0)
        try:
            conn.execute("ATTACH DATABASE ? AS fw", (f"file:{nodes_db}?mode=ro",))
            rows = conn.execute("SELECT DISTINCT c.path FROM chunks c JOIN fw.nodes n "
                                "ON n.chunk_id = c.chunk_id AND n.content_hash = c.content_hash").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        if "no such table" in str(exc):
            return set()
        raise StoreError(f"{directory}: cannot read which documents a framework store added ({exc})") from None
    return {p for (p,) in rows}


def _framework_records(index_path: Path, paths: set[str]) -> tuple[list[FileRecord], dict[str, bytes]]:
    """The committed file records of ``paths`` with all their chunks, and their vectors by content hash (for
    a pass that re-commits every file: a framework's vectors cannot be recomputed from the text alone)."""
    import sqlite3

    from .types import Chunk

    if not paths:
        return [], {}
    conn = sqlite3.connect(f"file:{index_path / 'chunks.sqlite'}?mode=ro", uri=True, timeout=30.0)
    try:
        records, vectors = [], {}
        for path in sorted(paths):
            row = conn.execute("SELECT size, mtime_ns FROM files WHERE path=?", (path,)).fetchone()
            if row is None:
                continue
            chunks = tuple(Chunk(*r) for r in conn.execute(
                "SELECT chunk_id, path, position, text, start, end, content_hash FROM chunks WHERE path=? "
                "ORDER BY position", (path,)))
            records.append(FileRecord(path, int(row[0]), int(row[1]), chunks))
            for c in chunks:
                if c.content_hash not in vectors:
                    got = conn.execute("SELECT vector FROM vectors WHERE content_hash=? LIMIT 1",
                                       (c.content_hash,)).fetchone()
                    if got is not None:
                        vectors[c.content_hash] = bytes(got[0])
        return records, vectors
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{index_path}: cannot read the documents a framework store added ({exc})") from None
    finally:
        conn.close()


def _has_vectors(index_path: Path) -> bool:
    """Whether an uncommitted index directory holds embedded batches worth resuming from."""
    import sqlite3

    db = index_path / "chunks.sqlite"
    if not db.exists():
        return False
    try:
        conn = sqlite3.connect(str(db))
        try:
            return conn.execute("SELECT COUNT(*) FROM vectors").fetchone()[0] > 0
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return True


def _describe_skips(skipped: dict[str, int]) -> str:
    if not skipped:
        return "nothing skipped"
    return ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1]))


class Retriever:
    """Search an index with the encoder it was built with.

    >>> r = Retriever.open("indexes/default")            # loads the model recorded in the manifest
    >>> for hit in r.search("how do plants make sugar?", k=5):
    ...     print(hit.rank, round(hit.score, 3), hit.path, hit.text[:80])

    ``guard``: a refusal guard (see :mod:`ragen.guard`): ``True`` for the one saved with the index
    (``guard.json``, else the defaults), a :class:`~ragen.guard.GuardConfig`, a path to a guard file, or a
    :class:`~ragen.guard.RefusalGuard`. A query the guard blocks gets no hits; :meth:`retrieve` says why.
    """

    def __init__(self, encoder, store: Store, *, guard=None) -> None:
        check_compatible(encoder, store)
        self.encoder = encoder
        self.store = store
        self.guard: RefusalGuard | None = resolve_guard(guard, encoder, store.index_dir)

    @classmethod
    def open(cls, index_dir: str | Path, *, encoder=None, model: str | None = None,
             device: str | None = None, base_model: str | None = None, guard=None) -> Retriever:
        """Open ``index_dir`` for search. ``encoder``: an encoder object to use; else ``model`` (a spec
        string); else the spec recorded in the index, loaded as recorded (backbone, numerics, remote-code
        opt-in, the hub commits it resolved to; ``base_model`` overrides the backbone). An encoder whose fingerprint or dimension differs from the index's raises
        :class:`~ragen.errors.StoreError`. ``guard``: as for the constructor."""
        store = Store.open(index_dir, device=device)
        try:
            if encoder is None:
                from .encoders import load_encoder

                options = recorded_load_options(store.manifest["encoder"]) if model is None else {}
                if base_model:
                    options["base_model"] = base_model
                encoder = load_encoder(model or store.spec, device=device, **options)
            return cls(encoder, store, guard=guard)
        except BaseException:
            store.close()
            raise

    def search(self, query: str, k: int = 10) -> list[Hit]:
        """The ``k`` chunks nearest to ``query`` (embedded with the encoder's query instruction); none when
        the guard blocks the query (:meth:`retrieve` also returns the reason)."""
        return self.retrieve(query, k).hits

    def retrieve(self, query: str, k: int = 10) -> Retrieval:
        """:meth:`search` plus the guard's verdict and timings."""
        if not isinstance(query, str):
            raise TypeError("query must be a string; use search_vector for a vector")
        t0 = time.perf_counter()
        vector = self.encoder.encode_queries([query], normalize=True)[0]  # (dim,)
        t1 = time.perf_counter()
        verdict = self.guard.check(query, vector) if self.guard is not None else None
        t2 = time.perf_counter()
        hits = [] if verdict is not None and verdict.blocked else self._hits(vector, k)
        return Retrieval(query=query, hits=hits, verdict=verdict, embed_seconds=t1 - t0, guard_seconds=t2 - t1,
                         search_seconds=time.perf_counter() - t2)

    def search_vector(self, vector: np.ndarray, k: int = 10) -> list[Hit]:
        """The ``k`` chunks nearest to a ``(dim,)`` query vector from ``encoder.encode_queries``. With a
        guard, only its threshold test applies here (decoding needs the query text)."""
        v = self._check_vector(vector)
        if self.guard is not None and self.guard.config.threshold is not None and self.guard.check(None, v).blocked:
            return []
        return self.store.hits(v, k)

    def search_batch(self, queries: Sequence[str], k: int = 10, *, batch_size: int = 32) -> list[list[Hit]]:
        """``search`` for many queries, embedded in batches."""
        vectors = self.encoder.encode_queries(list(queries), batch_size=batch_size, normalize=True)
        if self.guard is None:
            return [self.store.hits(v, k) for v in vectors]
        verdicts = self.guard.check_batch(list(queries), vectors)
        return [[] if verdict.blocked else self.store.hits(v, k) for v, verdict in zip(vectors, verdicts)]

    def _check_vector(self, vector: np.ndarray) -> np.ndarray:
        v = np.asarray(vector, dtype=np.float32)
        if v.ndim != 1 or v.shape[0] != self.store.dim:
            raise StoreError(f"query vector has shape {v.shape}; this index expects ({self.store.dim},)")
        return v

    def _hits(self, vector: np.ndarray, k: int) -> list[Hit]:
        return self.store.hits(self._check_vector(vector), k)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_compatible(encoder, store: Store) -> None:
    """Raise :class:`StoreError` unless ``encoder`` computes the function the index was built with."""
    if int(encoder.dim) != store.dim or str(encoder.fingerprint) != store.fingerprint:
        raise StoreError(
            f"{store.index_dir}: built with encoder {store.spec} (dim {store.dim}, fingerprint {store.fingerprint}), "
            f"but the query encoder {encoder.spec} has dim {encoder.dim}, fingerprint {encoder.fingerprint}; "
            f"query with --model {store.spec} or rebuild the index with this model")


__all__ = ["build_index", "framework_documents", "FRAMEWORK_NODES_DB", "resolve_chunking", "encoder_budget", "RecordedEncoder", "recorded_load_options", "Retriever", "Retrieval", "IndexStats", "ProgressEvent", "encoder_info", "check_compatible",
           "read_manifest", "IndexConfig"]
