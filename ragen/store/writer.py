"""The writer: :class:`StoreWriter` and its commit protocol (see the package docstring), the write lock."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .._io import fsync_dir
from ..errors import StoreError
from ..types import Chunk
from . import locks
from .faiss_index import (IndexConfig, _train_sample_size, bytes_per_vector, check_faiss, empty_faiss_index, ivf_lists,
                          normalize_rows, pq_subquantizers, reserve, resolve_kind, serialize_trained, to_cpu)
from .schema import (_SCHEMA, _SQLITE_CORRUPT, _SQLITE_NOTADB, _TABLES, _TEMP_GENERATION, DB_NAME, FORMAT_VERSION,
                     LOCK_NAME, MANIFEST_NAME, READERS_LOCK_NAME, SCHEMA_VERSION, EncoderInfo, _code, _committed,
                     _connect, _corrupt, _db_error, _meta, _migrate, _tables)
from .segments import (_OWNED_NAME, _check_digest, _check_index_folder, _digests, _full_digest, _generation_paths,
                       _live_segments, _sample_digest, _SegmentSpec, _write_faiss_file, _write_owned)

logger = logging.getLogger(__name__)


COMPACT_RATIO = 0.25  # rebuild the base once deltas + deleted rows exceed this fraction of it


MAX_DELTAS = 8  # merge the delta segments into one past this many


@dataclass(frozen=True)
class FileRecord:
    """A file's new state, handed to :meth:`StoreWriter.commit` (or staged with :meth:`StoreWriter.stage`):
    its stat, all of its chunks, and optionally the SHA-256 of its bytes and when they were read."""

    path: str
    size: int
    mtime_ns: int
    chunks: tuple[Chunk, ...]
    sha256: str | None = None
    read_ns: int | None = None


class FileState(NamedTuple):
    """What the index recorded about a source file: enough to tell whether it changed since
    (:func:`ragen.corpus.stat_verdict`); ``sha256``/``read_ns`` are None for files recorded before they
    were tracked."""

    size: int
    mtime_ns: int
    sha256: str | None
    read_ns: int | None


@dataclass(frozen=True)
class SkippedFile:
    """A file whose bytes cannot be indexed (binary, invalid JSON, a damaged PDF), remembered with its
    state so that it is not read again until it changes."""

    path: str
    state: FileState
    reason: str


@dataclass(frozen=True)
class CommitResult:
    generation: int
    files: int
    chunks: int
    chunks_removed: int
    files_removed: int
    index_kind: str
    seconds_build: float = 0.0
    manifest: dict = field(default_factory=dict)


def _database_errors(method):
    """Database failures while writing (disk full, a lock held past the timeout, a damaged file) become a
    one-line :class:`StoreError` naming the index; the previous committed index is untouched either way."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise _db_error(self.index_dir / DB_NAME, exc, writing=True) from None

    return wrapper


class StoreWriter:
    """Exclusive writer of one index directory (a lock on ``write.lock``, see :mod:`.locks`).

    Use as a context manager. Typical run: :meth:`known_files` / :meth:`missing_vectors` to plan,
    :meth:`add_vectors` per embedded batch (each a committed transaction), :meth:`commit` once at the end.

    Vectors live in *epochs*: a normal run adds to the committed epoch, so unchanged chunks keep their
    vectors; ``rebuild`` (and a first run) fills a fresh epoch, so the previous index stays intact and
    loadable until the final commit switches to the new one. ``rebuild`` also replaces a damaged
    database (it is kept beside the index as ``chunks.sqlite.corrupt``).
    """

    def __init__(self, index_dir: str | Path, *, encoder: EncoderInfo, chunking: dict,
                 index_config: IndexConfig = IndexConfig(), rebuild: bool = False, source: str | None = None) -> None:
        self.index_dir = Path(index_dir).expanduser()
        self.encoder = encoder
        self.chunking = dict(chunking)
        self.index_config = index_config
        self.rebuild = rebuild
        self.source = source
        self._conn = None
        self._lock_fd = None
        self.created = not self.index_dir.exists()
        check_faiss()
        _check_index_folder(self.index_dir)
        self.index_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _acquire_lock(self.index_dir)
        db = self.index_dir / DB_NAME
        try:
            try:
                self._open_database()
            except sqlite3.DatabaseError as exc:
                if not (self.rebuild and _code(exc) in (_SQLITE_CORRUPT, _SQLITE_NOTADB, None)
                        and not isinstance(exc, sqlite3.OperationalError)):
                    raise
                self._set_aside_damaged_database(exc)
                self._open_database()
        except sqlite3.Error as exc:
            self.close()
            raise _db_error(db, exc, writing=True) from None
        except BaseException:
            self.close()
            raise

    # --- setup --------------------------------------------------------------------------------------------
    def _open_database(self) -> None:
        db = self.index_dir / DB_NAME
        self._conn = _connect(db)
        tables = _tables(self._conn)
        if self.rebuild and tables:
            problems = [row[0] for row in self._conn.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError(f"database disk image is malformed ({problems[0][:80]})")
        if "meta" in tables and not self.rebuild:
            missing = [t for t in _TABLES if t not in tables]
            if missing:
                raise _corrupt(db, f"table {missing[0]!r} is missing")
        self._conn.executescript(_SCHEMA)
        _migrate(self._conn)
        self._prepare()
        try:  # readers take it shared; created here so that readers never need to write the folder
            os.close(os.open(self.index_dir / READERS_LOCK_NAME, os.O_RDONLY | os.O_CREAT, 0o644))
        except OSError as exc:
            raise StoreError(f"{self.index_dir / READERS_LOCK_NAME}: cannot create ({exc.strerror})") from None

    def _set_aside_damaged_database(self, exc: sqlite3.Error) -> None:
        """--rebuild over a damaged database: keep it (renamed) for inspection and start a fresh one."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        db = self.index_dir / DB_NAME
        aside = self.index_dir / f"{DB_NAME}.corrupt"
        logger.warning("%s: damaged (%s); rebuilding, the damaged database is kept as %s", db, exc, aside.name)
        os.replace(db, aside)
        for suffix in ("-wal", "-shm"):  # SQLite's companions of the damaged file: meaningless without it
            (self.index_dir / f"{DB_NAME}{suffix}").unlink(missing_ok=True)

    def _prepare(self) -> None:
        db = self.index_dir / DB_NAME
        meta = _meta(self._conn)
        self.committed: dict | None = None
        self.generation = 0
        if "manifest" in meta or "generation" in meta:
            try:
                self.committed, self.generation = _committed(meta, db)
            except StoreError:
                if not self.rebuild:
                    raise
                # --rebuild is the way out of a damaged manifest: start over, never reusing a file name
                self.committed = None
                self.generation = self._max_owned_generation()
        strict = not self.rebuild  # --rebuild is the way out of damaged counters: it starts them over
        committed_epoch = self._meta_int(meta, "epoch", 0, strict)
        self.segments: list[_SegmentSpec] | None = None  # None: layout 1 (or nothing committed)
        if self.committed is not None and meta.get("segments") is not None:
            self.segments = _live_segments(meta, self.generation, db)
        (max_id,) = self._conn.execute("SELECT MAX(id) FROM chunks").fetchone()
        self.next_row_id = max(self._meta_int(meta, "next_row_id", 1, strict), int(max_id or 0) + 1)
        if self.committed is not None and not self.rebuild:
            old = self.committed["encoder"]
            if old["fingerprint"] != self.encoder.fingerprint or int(old["dim"]) != self.encoder.dim:
                raise StoreError(
                    f"{self.index_dir}: built with encoder {old['spec']} (dim {old['dim']}, fingerprint "
                    f"{old['fingerprint']}), not {self.encoder.spec} (dim {self.encoder.dim}, fingerprint "
                    f"{self.encoder.fingerprint}); pass --model {old['spec']} or --rebuild")
            self.epoch = committed_epoch
        else:
            work_epoch = self._meta_int(meta, "work_epoch", 0, strict)
            # A killed run (a --rebuild or a model switch included) left vectors in its epoch: the next run
            # with the same encoder continues it instead of embedding everything again.
            resumable = work_epoch > committed_epoch and meta.get("work_fingerprint") == self.encoder.fingerprint
            self.epoch = work_epoch if resumable else max(committed_epoch, work_epoch) + 1
        # a full pass (first run, rebuild, new chunking) re-reads every file; vectors are still reused by
        # content hash whenever they are in this run's epoch
        self.full = (self.committed is None or self.rebuild
                     or self.committed.get("chunking") != self.chunking)
        with self._transaction():
            self._delete_epochs_except({committed_epoch, self.epoch})
            # what this run was started with, so that a re-run after an interrupted first run reuses it
            self._set("work_settings", json.dumps({"encoder": asdict(self.encoder), "chunking": self.chunking,
                                                   "index": {"config": asdict(self.index_config)}}, sort_keys=True))
            self._set("work_epoch", self.epoch)
            self._set("work_fingerprint", self.encoder.fingerprint)
            # Staged files (extracted by a killed run) hold chunks cut with one chunking for one epoch's
            # vectors: any other run starts its staging over.
            stage_key = json.dumps({"epoch": self.epoch, "fingerprint": self.encoder.fingerprint,
                                    "chunking": self.chunking}, sort_keys=True)
            if meta.get("stage_key") != stage_key:
                self._conn.execute("DELETE FROM staged_files")
                self._conn.execute("DELETE FROM staged_chunks")
                self._set("stage_key", stage_key)
            self._set("schema_version", SCHEMA_VERSION)
            if self.committed is not None:
                self._claim_legacy_generation()
        # Leftovers of killed runs (temp files, unused segments) go only when the committed state checks out:
        # a damaged database could otherwise name the wrong files as live.
        intact = self._live_state_intact()
        if not intact and self.committed is not None and not self.rebuild:
            raise _corrupt(db, "the index files it names are missing, replaced or miscounted")
        self._collect_garbage(temp_only=not intact)

    def _meta_int(self, meta: dict[str, str], key: str, default: int, strict: bool) -> int:
        """A counter of the meta table: a non-negative 63-bit integer, else a one-line error (or, when
        ``strict`` is off, the default)."""
        value = _int_or(meta.get(key), -1) if key in meta else default
        if 0 <= value < 2**62:
            return value
        if strict:
            raise _corrupt(self.index_dir / DB_NAME, f"the recorded {key} is {str(meta.get(key))[:40]!r}, "
                                                     "expected a non-negative integer")
        return default

    def _max_owned_generation(self) -> int:
        (g,) = self._conn.execute("SELECT MAX(generation) FROM owned_files").fetchone()
        return max(int(g or 0), 0)

    def _claim_legacy_generation(self) -> None:
        """An index written before ``owned_files`` existed names its live files by convention only
        (``vectors-<G>.*`` for the committed G): record them, so that they are deleted once retired."""
        for path in _generation_paths(self.index_dir, self.generation):
            if path.exists():
                self._conn.execute("INSERT OR IGNORE INTO owned_files(name, generation) VALUES (?, ?)",
                                   (path.name, self.generation))

    def _own(self, names: Iterable[tuple[str, int]]) -> None:
        """Record files as the store's before creating them (committed before the first byte is written)."""
        with self._transaction():
            self._conn.executemany("INSERT OR REPLACE INTO owned_files(name, generation) VALUES (?, ?)", list(names))

    def _live_state_intact(self) -> bool:
        """Whether every file the committed state names exists with its recorded size and sampled digest,
        and the segments hold the committed number of chunks."""
        if self.committed is None:
            return False
        digests = _digests(self._conn, sorted(self._live_names()))
        try:
            for name in self._live_names():
                path = self.index_dir / name
                if not path.is_file():
                    return False
                _check_digest(path, digests.get(name))
        except (StoreError, OSError):
            return False
        if self.segments is not None:
            (n_tomb,) = self._conn.execute("SELECT COUNT(*) FROM tombstones").fetchone()
            if sum(s.n for s in self.segments) - n_tomb != self.committed.get("counts", {}).get("chunks"):
                return False
        return True

    def _collect_garbage(self, wait_s: float = 0.5, temp_only: bool = False) -> None:
        """Delete owned files that belong to no live generation, under the exclusive readers' lock; when
        readers hold it past ``wait_s`` the files stay for a later run (they are still recorded).
        ``temp_only``: only temporary files (the live state is not trusted)."""
        live = self._live_names()
        rows = [(n,) for (n, g) in self._conn.execute("SELECT name, generation FROM owned_files")
                if n not in live and (g == _TEMP_GENERATION or not temp_only)]
        if not rows:
            return
        try:
            fd = os.open(self.index_dir / READERS_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            logger.warning("%s: cannot open (%s); retired files stay until the next run",
                           self.index_dir / READERS_LOCK_NAME, exc.strerror)
            return
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    if locks.try_exclusive(fd):
                        break
                    busy = True
                except OSError as exc:
                    busy = exc
                if busy is not True or time.monotonic() > deadline:
                    logger.info("readers are loading the index; %d retired files stay until the next run (%s)",
                                len(rows), "busy" if busy is True else busy)
                    return
                time.sleep(0.005)
            gone = []
            for (name,) in rows:
                if not _OWNED_NAME.match(name):  # a damaged or hostile table never names a path of ours
                    logger.warning("%s: not a name the store creates; left alone", name)
                    gone.append((name,))
                    continue
                try:
                    (self.index_dir / name).unlink(missing_ok=True)
                    gone.append((name,))
                except OSError as exc:
                    logger.warning("%s: cannot delete (%s)", self.index_dir / name, exc.strerror)
        finally:
            os.close(fd)
        with self._transaction():
            self._conn.executemany("DELETE FROM owned_files WHERE name=?", gone)

    def _live_names(self) -> set[str]:
        if self.committed is None:
            return set()
        if self.segments is None:
            return {p.name for p in _generation_paths(self.index_dir, self.generation)}
        return {s.name for s in self.segments}

    def _delete_epochs_except(self, keep: set[int]) -> None:
        """Drop the vectors of every epoch but ``keep``, as primary-key ranges: ``epoch NOT IN (...)`` or
        ``epoch != ?`` makes SQLite scan the whole table (4 GB of vectors at 1M x 1024), on every open and
        every commit."""
        bounds = sorted(keep)
        self._conn.execute("DELETE FROM vectors WHERE epoch < ?", (bounds[0],))
        for lo, hi in zip(bounds, bounds[1:]):
            self._conn.execute("DELETE FROM vectors WHERE epoch > ? AND epoch < ?", (lo, hi))
        self._conn.execute("DELETE FROM vectors WHERE epoch > ?", (bounds[-1],))

    def _set(self, key: str, value: object) -> None:
        self._conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, str(value)))

    def _rollback(self) -> None:
        """Roll back if a transaction is still open; never hides the error that got us here."""
        try:
            if self._conn is not None and self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            logger.debug("rollback failed: %s", exc)

    def _transaction(self):
        writer = self

        class _Tx:
            def __enter__(self_inner):
                writer._conn.execute("BEGIN IMMEDIATE")

            def __exit__(self_inner, exc_type, exc, tb):
                if exc_type is None:
                    writer._conn.execute("COMMIT")
                else:
                    writer._rollback()
                return False

        return _Tx()

    # --- planning -----------------------------------------------------------------------------------------
    @_database_errors
    def known_files(self) -> dict[str, tuple[int, int]]:
        """``path -> (size, mtime_ns)`` of the files in the committed index (empty on a full pass)."""
        if self.full:
            return {}
        return {p: (s, m) for p, s, m in self._conn.execute("SELECT path, size, mtime_ns FROM files")}

    @_database_errors
    def file_states(self) -> dict[str, FileState]:
        """``path -> FileState`` of the files in the committed index (empty on a full pass)."""
        if self.full:
            return {}
        return {p: FileState(s, m, h, r) for p, s, m, h, r in
                self._conn.execute("SELECT path, size, mtime_ns, sha256, read_ns FROM files")}

    @_database_errors
    def staged_files(self) -> dict[str, FileState]:
        """``path -> FileState`` of the files an unfinished run of these settings already extracted and
        staged (:meth:`stage`); a resumed run takes those that did not change since instead of reading them."""
        return {p: FileState(s, m, h, r) for p, s, m, h, r in
                self._conn.execute("SELECT path, size, mtime_ns, sha256, read_ns FROM staged_files")}

    @_database_errors
    def staged_chunk_count(self, paths: Iterable[str]) -> int:
        total = 0
        for path in paths:
            (n,) = self._conn.execute("SELECT n_chunks FROM staged_files WHERE path=?", (path,)).fetchone() or (0,)
            total += int(n)
        return total

    @_database_errors
    def remembered_skips(self) -> dict[str, SkippedFile]:
        """The files an earlier run found unindexable by their bytes (see :class:`SkippedFile`); empty on
        ``--rebuild``, which reads everything again."""
        if self.rebuild:
            return {}
        return {p: SkippedFile(p, FileState(s, m, h, r), why) for p, s, m, h, r, why in self._conn.execute(
            "SELECT path, size, mtime_ns, sha256, read_ns, reason FROM skipped_files")}

    @_database_errors
    def stage(self, files: Sequence[FileRecord] = (), hashes: Sequence[str] = (), vectors: np.ndarray | None = None,
              skipped: Sequence[SkippedFile] = ()) -> None:
        """Keep the work of a run so far, in one committed transaction: extracted files with their chunks
        (applied by :meth:`commit` with ``staged=True``), embedded vectors (as :meth:`add_vectors`) and files
        found unindexable. A killed run loses nothing staged; the next run with the same settings resumes."""
        rows = self._vector_rows(hashes, vectors) if len(hashes) else []
        with self._transaction():
            if rows:
                self._conn.executemany("INSERT OR REPLACE INTO vectors(epoch, content_hash, vector) VALUES (?, ?, ?)",
                                       rows)
            for f in files:
                self._conn.execute("DELETE FROM staged_chunks WHERE path=?", (f.path,))
                self._conn.execute("INSERT OR REPLACE INTO staged_files(path, size, mtime_ns, n_chunks, sha256, "
                                   "read_ns) VALUES (?, ?, ?, ?, ?, ?)",
                                   (f.path, f.size, f.mtime_ns, len(f.chunks), f.sha256, f.read_ns))
                self._conn.executemany(
                    "INSERT INTO staged_chunks(path, position, chunk_id, start, end, content_hash, text) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(c.path, c.position, c.chunk_id, c.start, c.end, c.content_hash, c.text) for c in f.chunks])
            self._conn.executemany(
                "INSERT OR REPLACE INTO skipped_files(path, size, mtime_ns, sha256, read_ns, reason) "
                "VALUES (?, ?, ?, ?, ?, ?)", [(k.path, *k.state, k.reason) for k in skipped])

    @_database_errors
    def unstage(self, paths: Iterable[str]) -> None:
        """Drop staged files (changed again since they were staged, or no longer wanted)."""
        paths = sorted(set(paths))
        if not paths:
            return
        with self._transaction():
            for path in paths:
                self._conn.execute("DELETE FROM staged_chunks WHERE path=?", (path,))
                self._conn.execute("DELETE FROM staged_files WHERE path=?", (path,))

    @_database_errors
    def staged_missing_vectors(self) -> dict[str, str]:
        """``content hash -> text`` of staged chunks that have no vector in this run's epoch yet."""
        return dict(self._conn.execute(
            "SELECT s.content_hash, MIN(s.text) FROM staged_chunks s WHERE NOT EXISTS (SELECT 1 FROM vectors v "
            "WHERE v.epoch=? AND v.content_hash=s.content_hash) GROUP BY s.content_hash", (self.epoch,)))

    @_database_errors
    def missing_vectors(self, hashes: Iterable[str]) -> set[str]:
        """The content hashes among ``hashes`` that have no vector in this run's epoch yet."""
        wanted = set(hashes)
        have: set[str] = set()
        items = list(wanted)
        for start in range(0, len(items), 500):
            part = items[start:start + 500]
            marks = ",".join("?" * len(part))
            have.update(h for (h,) in self._conn.execute(
                f"SELECT content_hash FROM vectors WHERE epoch=? AND content_hash IN ({marks})", [self.epoch, *part]))
        return wanted - have

    @_database_errors
    def add_vectors(self, hashes: Sequence[str], vectors: np.ndarray) -> None:
        """Store one embedded batch, normalised, in its own committed transaction."""
        rows = self._vector_rows(hashes, vectors)
        with self._transaction():
            self._conn.executemany("INSERT OR REPLACE INTO vectors(epoch, content_hash, vector) VALUES (?, ?, ?)", rows)

    def _vector_rows(self, hashes: Sequence[str], vectors: np.ndarray | None) -> list[tuple[int, str, bytes]]:
        vecs = np.asarray(vectors, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape != (len(hashes), self.encoder.dim):
            raise StoreError(f"got vectors of shape {vecs.shape} for {len(hashes)} chunks; the index expects "
                             f"dimension {self.encoder.dim}")
        if not np.isfinite(vecs).all():
            raise StoreError("the encoder produced NaN or infinite values; check the model and its dtype")
        vecs = normalize_rows(vecs)
        return [(self.epoch, h, v.tobytes()) for h, v in zip(hashes, vecs)]

    # --- the switch ---------------------------------------------------------------------------------------
    @_database_errors
    def commit(self, updated: Sequence[FileRecord], present: Iterable[str], *, staged: bool = False,
               restamp: Sequence[tuple[str, str, int]] = (), skipped_paths: Iterable[str] | None = None) -> CommitResult:
        """Make the new state the committed one, atomically.

        ``updated``: files that are new or changed (all files on a full pass), with all their chunks.
        ``staged``: the files staged with :meth:`stage` are new or changed too (and leave the staging).
        ``present``: every file that belongs in the index now (updated and unchanged); other files of the
        committed index are removed. Every chunk's vector must have been added (:meth:`add_vectors`).
        ``restamp``: ``(path, sha256, read_ns)`` of unchanged files whose content was hashed now (their
        new read time). ``skipped_paths``: the files this run skipped by their content; other remembered
        skips are forgotten (None: leave them).

        An incremental commit writes only the changed rows' vectors (a delta segment) and marks the removed
        rows deleted (tombstones); past ``COMPACT_RATIO`` of the base it rebuilds the base instead. Once
        the switch is committed this returns normally: clean-up afterwards (the manifest copy, retired
        files) only logs its failures, since the new index is in place either way.
        """
        t0 = time.perf_counter()
        present = set(present)
        skipped_paths = None if skipped_paths is None else set(skipped_paths)
        conn = self._conn
        config_same = self.committed is not None and _same_config(self.committed, self.index_config)
        n_staged = conn.execute("SELECT COUNT(*) FROM staged_files").fetchone()[0] if staged else 0
        if not self.full and not updated and not n_staged and config_same:
            old_files = {p for (p,) in conn.execute("SELECT path FROM files")}
            if old_files == present:  # nothing changed: keep the committed generation as it is
                with self._transaction():
                    self._record_file_facts(restamp, skipped_paths)
                counts = self.committed.get("counts", {})
                return CommitResult(generation=self.generation, files=int(counts.get("files", len(present))),
                                    chunks=int(counts.get("chunks", 0)), chunks_removed=0, files_removed=0,
                                    index_kind=self.committed.get("index", {}).get("kind", "flat"),
                                    manifest=self.committed)
        new_generation = max(self.generation, self._max_owned_generation()) + 1
        base_path = self.index_dir / f"seg-{new_generation}-base.faiss"
        delta_path = self.index_dir / f"seg-{new_generation}-delta.faiss"
        self._own([(base_path.name, new_generation), (delta_path.name, new_generation),
                   (f".{base_path.name}.tmp", _TEMP_GENERATION), (f".{delta_path.name}.tmp", _TEMP_GENERATION)])
        # The switch must be durable before retired files are deleted: sync this one commit (batches stay
        # at NORMAL), so even a power cut cannot leave the database naming deleted files.
        conn.execute("PRAGMA synchronous=FULL")
        committing = False
        written: list[Path] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            old_files = {p for (p,) in conn.execute("SELECT path FROM files")}
            src = "staged" if staged else "temp.commit"
            self._load_source(src, updated)
            chunks_removed, removed_rows, inserted = self._replace_rows(src, present, old_files)
            self._record_file_facts(restamp, skipped_paths)
            conn.execute(f"DELETE FROM {src}_files")
            conn.execute(f"DELETE FROM {src}_chunks")
            specs, kind = self._write_segments(config_same, removed_rows, inserted, base_path, delta_path, written)
            fsync_dir(self.index_dir)
            for path in written:
                size, sample = _sample_digest(path)
                conn.execute("UPDATE owned_files SET size=?, sha256=?, sample=? WHERE name=?",
                             (size, _full_digest(path), sample, path.name))
            (n_tomb,) = conn.execute("SELECT COUNT(*) FROM tombstones").fetchone()
            n_chunks = sum(s.n for s in specs) - n_tomb
            n_files = conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
            manifest = self._manifest(new_generation, kind, n_files, n_chunks, len(specs), n_tomb)
            self._set("manifest", json.dumps(manifest, sort_keys=True))
            self._set("segments", json.dumps([s.as_dict() for s in specs]))
            self._set("next_row_id", self.next_row_id)
            self._set("generation", new_generation)
            self._set("epoch", self.epoch)
            committing = True
            conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            if not committing:  # the switch never ran: the new files are nobody's
                for path in written:
                    try:
                        path.unlink(missing_ok=True)
                    except OSError:
                        pass
            # else the COMMIT itself failed: whether it reached the disk is unknown, so the files stay
            # (recorded in owned_files); the next writer keeps or deletes them by what the database names
            raise
        finally:
            try:
                conn.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.Error as exc:
                logger.debug("cannot restore synchronous=NORMAL: %s", exc)
        self.generation = new_generation
        self.committed = manifest
        self.segments = specs
        self._after_commit(manifest)
        return CommitResult(generation=new_generation, files=n_files, chunks=n_chunks, chunks_removed=chunks_removed,
                            files_removed=len(old_files - present), index_kind=kind,
                            seconds_build=time.perf_counter() - t0, manifest=manifest)

    def _write_segments(self, config_same: bool, removed_rows: list[int], inserted: list[tuple[int, str]],
                        base_path: Path, delta_path: Path, written: list[Path]) -> tuple[list[_SegmentSpec], str]:
        """Inside the commit's transaction: the live segment list after this commit, writing what is new."""
        conn = self._conn
        specs = self.segments
        base = next((s for s in specs or () if s.kind == "base"), None)
        incremental = not self.full and config_same and base is not None
        if self.committed is not None and specs is None and not self.rebuild:
            logger.warning("%s: upgrading the index to format %d (base + delta segments); this commit rebuilds "
                           "the FAISS index once, older ragen versions cannot read it afterwards",
                           self.index_dir, FORMAT_VERSION)
        if incremental:
            conn.executemany("INSERT OR REPLACE INTO tombstones(row_id, segment) VALUES (?, ?)",
                             [(rid, _segment_of(specs, rid, self.index_dir)) for rid in removed_rows])
            (n_tomb,) = conn.execute("SELECT COUNT(*) FROM tombstones").fetchone()
            deltas = [s for s in specs if s.kind == "delta"]
            if sum(s.n for s in deltas) + len(inserted) + n_tomb > COMPACT_RATIO * max(base.n, 1):
                incremental = False  # compaction: the base is rebuilt from the database
        if not incremental:
            conn.execute("DELETE FROM tombstones")
            index, kind, n, lo, hi = self._build_base()
            self._keep_centroids(index)
            _write_faiss_file(to_cpu(index), base_path)
            del index
            written.append(base_path)
            return [_SegmentSpec(base_path.name, "base", n, lo, hi)], kind
        kind = self.committed.get("index", {}).get("kind", "flat")
        new_ids, new_vectors = self._vectors_of(inserted)
        keep = [s for s in specs if s.kind == "delta"]
        if len(keep) + 1 > MAX_DELTAS:  # merge every delta (and this one) into one, dropping deleted rows
            parts = [self._read_delta(s) for s in keep] + [(new_ids, new_vectors)]
            conn.executemany("DELETE FROM tombstones WHERE segment=?", [(s.name,) for s in keep])
            new_ids = np.concatenate([p[0] for p in parts])
            new_vectors = np.concatenate([p[1] for p in parts])
            keep = []
        out = [base, *keep]
        if len(new_ids):
            import faiss

            delta = faiss.IndexIDMap(faiss.IndexFlatIP(self.encoder.dim))
            delta.add_with_ids(new_vectors, new_ids)
            _write_faiss_file(delta, delta_path)
            written.append(delta_path)
            out.append(_SegmentSpec(delta_path.name, "delta", len(new_ids), int(new_ids.min()), int(new_ids.max())))
        return out, kind

    def _trained_index(self, n: int) -> bytes | None:
        """The trained empty IVF-PQ index of this epoch (a compaction reuses it: no k-means, no PQ training)."""
        if resolve_kind(n, self.index_config) != "ivfpq" or self.rebuild:
            return None
        row = self._conn.execute("SELECT data FROM trained_index WHERE epoch=? AND kind='ivfpq'",
                                 (self.epoch,)).fetchone()
        return bytes(row[0]) if row else None

    def _trained_centroids(self, n: int) -> np.ndarray | None:
        """The IVF quantizer of this epoch's vectors, when one was trained and the settings still ask for
        its number of lists (a compaction reuses it instead of running k-means again)."""
        if resolve_kind(n, self.index_config) != "ivf" or self.rebuild:
            return None
        row = self._conn.execute("SELECT nlist, dim, centroids FROM ivf_quantizer WHERE epoch=?",
                                 (self.epoch,)).fetchone()
        if row is None or row[1] != self.encoder.dim or len(row[2]) != 4 * row[0] * row[1] or (
                self.index_config.ivf_nlist is not None and self.index_config.ivf_nlist != row[0]) or (
                self.index_config.ivf_nlist is None and row[0] < ivf_lists(n, self.index_config) // 2):
            return None  # (the corpus outgrew its lists: train again, on a sample, for the new size)
        return np.frombuffer(row[2], dtype=np.float32).reshape(row[0], row[1])

    def _keep_centroids(self, index) -> None:
        import faiss

        inner = faiss.downcast_index(index)
        self._conn.execute("DELETE FROM ivf_quantizer WHERE epoch != ?", (self.epoch,))
        self._conn.execute("DELETE FROM trained_index WHERE epoch != ?", (self.epoch,))
        trained, self._trained_bytes = getattr(self, "_trained_bytes", None), None
        if trained is not None:
            self._conn.execute("INSERT OR REPLACE INTO trained_index(epoch, kind, data) VALUES (?, 'ivfpq', ?)",
                               (self.epoch, trained))
        elif isinstance(inner, faiss.IndexIVF):
            centroids = inner.quantizer.reconstruct_n(0, inner.nlist)
            self._conn.execute("INSERT OR REPLACE INTO ivf_quantizer(epoch, nlist, dim, centroids) VALUES (?, ?, ?, ?)",
                               (self.epoch, inner.nlist, inner.d, np.ascontiguousarray(centroids, np.float32).tobytes()))

    def _vectors_of(self, rows: list[tuple[int, str]]) -> tuple[np.ndarray, np.ndarray]:
        """``(row ids, vectors)`` of the given ``(row id, content hash)`` rows, read by hash."""
        dim = self.encoder.dim
        wanted = sorted({h for _, h in rows})
        found: dict[str, bytes] = {}
        for start in range(0, len(wanted), 500):
            part = wanted[start:start + 500]
            marks = ",".join("?" * len(part))
            found.update(self._conn.execute(
                f"SELECT content_hash, vector FROM vectors WHERE epoch=? AND content_hash IN ({marks})",
                [self.epoch, *part]))
        missing = [h for h in wanted if h not in found or len(found[h]) != 4 * dim]
        if missing:
            raise StoreError(f"{self.index_dir}: {len(missing)} chunks have no vector; every chunk must be "
                             "embedded before commit")
        ids = np.fromiter((r for r, _ in rows), dtype=np.int64, count=len(rows))
        vectors = np.frombuffer(b"".join(found[h] for _, h in rows), dtype=np.float32).reshape(len(rows), dim)
        return ids, vectors

    def _read_delta(self, spec: _SegmentSpec) -> tuple[np.ndarray, np.ndarray]:
        """The live rows of a delta segment (its deleted rows dropped)."""
        import faiss

        index = faiss.read_index(str(self.index_dir / spec.name))
        ids = faiss.vector_to_array(index.id_map).astype(np.int64)
        vectors = faiss.downcast_index(index.index).reconstruct_n(0, index.ntotal)
        removed = np.array([r for (r,) in self._conn.execute("SELECT row_id FROM tombstones WHERE segment=?",
                                                             (spec.name,))], dtype=np.int64)
        keep = ~np.isin(ids, removed)
        return ids[keep], vectors[keep]

    def _replace_rows(self, src: str, present: set[str],
                      old_files: set[str]) -> tuple[int, list[int], list[tuple[int, str]]]:
        """Inside the commit's transaction: drop the rows of changed and deleted files (all rows on a full
        pass), insert the new files' rows (tables ``{src}_files``/``{src}_chunks``) under new row ids (never
        reused), drop vectors no chunk refers to. All in SQL, so a full pass never holds the corpus in
        memory. Returns the number of chunks removed (an old chunk whose text is gone from its file), the
        removed row ids and (incremental commits only) the inserted ``(row id, content hash)`` rows."""
        conn = self._conn
        removed_rows: list[int] = []
        removed_hashes: set[str] = set()
        if self.full:
            (chunks_removed,) = conn.execute(
                f"SELECT COUNT(*) FROM chunks c WHERE NOT EXISTS (SELECT 1 FROM {src}_chunks s "
                "WHERE s.content_hash = c.content_hash AND s.path = c.path)").fetchone()
            conn.execute("DELETE FROM chunks")
            conn.execute("DELETE FROM files")
        else:
            chunks_removed = 0
            changed = {p for (p,) in conn.execute(f"SELECT path FROM {src}_files")}
            for path in sorted((old_files - present) | changed):
                keep = {h for (h,) in conn.execute(f"SELECT content_hash FROM {src}_chunks WHERE path=?", (path,))}
                for row_id, h in conn.execute("SELECT id, content_hash FROM chunks WHERE path=?", (path,)).fetchall():
                    chunks_removed += h not in keep
                    removed_rows.append(row_id)
                    removed_hashes.add(h)
                conn.execute("DELETE FROM chunks WHERE path=?", (path,))
                conn.execute("DELETE FROM files WHERE path=?", (path,))
        conn.execute(f"INSERT INTO files(path, size, mtime_ns, n_chunks, sha256, read_ns) "
                     f"SELECT path, size, mtime_ns, n_chunks, sha256, read_ns FROM {src}_files")
        first = self.next_row_id
        cur = conn.execute(
            f"INSERT INTO chunks(id, chunk_id, path, position, start, end, content_hash, text) "
            f"SELECT ? + ROW_NUMBER() OVER (ORDER BY f.rowid, c.position) - 1, c.chunk_id, c.path, c.position, "
            f"c.start, c.end, c.content_hash, c.text FROM {src}_chunks c JOIN {src}_files f ON f.path = c.path",
            (first,))  # row ids in the order the files were given (staged), then by position
        self.next_row_id = first + max(cur.rowcount, 0)
        inserted = [] if self.full else [(int(r), h) for r, h in conn.execute(
            "SELECT id, content_hash FROM chunks WHERE id >= ? ORDER BY id", (first,))]
        # vectors no chunk refers to any more (deleted or edited text, the previous epoch of a rebuild)
        self._delete_epochs_except({self.epoch})
        if self.full:
            conn.execute("DELETE FROM vectors WHERE epoch = ? AND content_hash NOT IN "
                         "(SELECT content_hash FROM chunks)", (self.epoch,))
        else:  # only the texts this commit removed can have lost their last chunk: cost follows the change
            conn.executemany("DELETE FROM vectors WHERE epoch = ? AND content_hash = ? AND NOT EXISTS "
                             "(SELECT 1 FROM chunks WHERE content_hash = ?)",
                             [(self.epoch, h, h) for h in sorted(removed_hashes)])
        return chunks_removed, removed_rows, inserted

    def _load_source(self, src: str, updated: Sequence[FileRecord]) -> None:
        """Inside the commit's transaction: put the in-memory ``updated`` files into the tables the commit
        reads (``staged_*`` itself, or the connection's temporary ``commit_*`` tables)."""
        conn = self._conn
        if src == "temp.commit":
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS commit_files AS SELECT * FROM staged_files WHERE 0")
            conn.execute("CREATE TEMP TABLE IF NOT EXISTS commit_chunks AS SELECT * FROM staged_chunks WHERE 0")
            conn.execute("CREATE INDEX IF NOT EXISTS temp.commit_chunks_path ON commit_chunks(path, position)")
            conn.execute("CREATE INDEX IF NOT EXISTS temp.commit_chunks_hash ON commit_chunks(content_hash)")
            conn.execute("DELETE FROM temp.commit_files")
            conn.execute("DELETE FROM temp.commit_chunks")
        for f in updated:
            conn.execute(f"DELETE FROM {src}_chunks WHERE path=?", (f.path,))
            conn.execute(f"INSERT OR REPLACE INTO {src}_files(path, size, mtime_ns, n_chunks, sha256, read_ns) "
                         "VALUES (?, ?, ?, ?, ?, ?)", (f.path, f.size, f.mtime_ns, len(f.chunks), f.sha256, f.read_ns))
            conn.executemany(f"INSERT INTO {src}_chunks(path, position, chunk_id, start, end, content_hash, text) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)",
                             [(c.path, c.position, c.chunk_id, c.start, c.end, c.content_hash, c.text)
                              for c in f.chunks])

    def _record_file_facts(self, restamp: Sequence[tuple[str, str, int]], skipped_paths: set[str] | None) -> None:
        """Inside a transaction: new read times of files found unchanged by their hash, and the remembered
        skips reduced to the files this run still skipped."""
        self._conn.executemany("UPDATE files SET sha256=?, read_ns=? WHERE path=?",
                               [(h, r, p) for p, h, r in restamp])
        if skipped_paths is not None:
            gone = [(p,) for (p,) in self._conn.execute("SELECT path FROM skipped_files") if p not in skipped_paths]
            self._conn.executemany("DELETE FROM skipped_files WHERE path=?", gone)

    def _after_commit(self, manifest: dict) -> None:
        """Housekeeping once the switch is durable: failures are logged, never reported as a failed commit."""
        manifest_path = self.index_dir / MANIFEST_NAME
        data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        try:
            self._own([(f".{MANIFEST_NAME}.tmp", _TEMP_GENERATION)])
            _write_owned(manifest_path, lambda tmp: tmp.write_bytes(data))
            fsync_dir(self.index_dir)
        except (OSError, sqlite3.Error) as exc:
            logger.warning("%s: cannot update this copy of the committed manifest (%s); the index itself is "
                           "committed", manifest_path, getattr(exc, "strerror", None) or exc)
        try:
            self._collect_garbage()
        except (OSError, sqlite3.Error) as exc:
            logger.warning("%s: retired files stay until the next run (%s)", self.index_dir, exc)

    def _build_base(self):
        """The base segment over every chunk, streamed: one scan of the chunk rows, then the epoch's vectors
        in key order, added to faiss batch by batch (never one lookup per row, never a second copy of all
        vectors in memory). Returns ``(index, kind, n, lowest row id, highest row id)``."""
        conn = self._conn
        dim = self.encoder.dim
        rows_of: dict[str, object] = {}  # content hash -> row id, or a list of them for repeated text
        n, lo, hi = 0, None, None
        for row_id, h in conn.execute("SELECT id, content_hash FROM chunks"):
            had = rows_of.get(h)
            rows_of[h] = row_id if had is None else (had + [row_id] if isinstance(had, list) else [had, row_id])
            n += 1
            lo = row_id if lo is None or row_id < lo else lo
            hi = row_id if hi is None or row_id > hi else hi
        centroids = self._trained_centroids(n)
        trained = self._trained_index(n)
        sample = None
        kind = resolve_kind(n, self.index_config)
        m = min(len(rows_of), _train_sample_size(n, kind, self.index_config)) \
            if centroids is None and trained is None else 0
        if m:  # IVF trains on a sample of the distinct vectors, read by hash
            chosen = sorted(rows_of)
            if len(chosen) > m:
                picks = np.random.default_rng(0).choice(len(chosen), m, replace=False)
                chosen = [chosen[i] for i in np.sort(picks)]
            sample = self._vectors_of([(0, h) for h in chosen])[1]
        index, kind = empty_faiss_index(n, dim, self.index_config, sample=sample, centroids=centroids, trained=trained,
                                        with_ids=True)
        del sample
        self._trained_bytes = serialize_trained(index)  # while empty: the training only, kept for compactions
        reserve(index, n)
        added = 0
        width = 4 * dim
        cursor = conn.execute("SELECT content_hash, vector FROM vectors WHERE epoch=?", (self.epoch,))
        while batch := cursor.fetchmany(4096):
            blobs, ids = [], []
            for h, blob in batch:
                target = rows_of.get(h)
                if target is None or len(blob) != width:
                    continue
                for row_id in (target if isinstance(target, list) else (target,)):
                    blobs.append(blob)
                    ids.append(row_id)
            if ids:  # one copy per batch of rows, not one numpy call per row
                index.add_with_ids(np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(-1, dim),
                                   np.asarray(ids, dtype=np.int64))
                added += len(ids)
        if added != n:
            raise StoreError(f"{self.index_dir}: {n - added} chunks have no vector; every chunk must be embedded "
                             "before commit")
        return index, kind, n, lo or 0, hi or 0

    def _manifest(self, generation: int, kind: str, n_files: int, n_chunks: int, n_segments: int = 1,
                  n_deleted: int = 0) -> dict:
        from .. import __version__

        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        created = (self.committed or {}).get("created_at", now) if not self.rebuild else now
        (n_vectors,) = self._conn.execute("SELECT COUNT(DISTINCT content_hash) FROM chunks").fetchone()
        return {
            "format_version": FORMAT_VERSION,
            "ragen_version": __version__,
            "created_at": created,
            "updated_at": now,
            "generation": generation,
            "encoder": asdict(self.encoder),
            "normalization": "l2",
            "metric": "inner_product",
            "chunking": self.chunking,
            "index": {"kind": kind, "config": asdict(self.index_config), "segments": n_segments,
                      "deleted_rows": n_deleted,
                      "bytes_per_vector": bytes_per_vector(kind, self.encoder.dim, self.index_config),
                      **({"pq_m": pq_subquantizers(self.encoder.dim, self.index_config)} if kind == "ivfpq" else {})},
            "counts": {"files": n_files, "chunks": n_chunks, "unique_vectors": n_vectors},
            "source": self.source,
        }

    # --- lifetime -----------------------------------------------------------------------------------------
    def close(self) -> None:
        conn = getattr(self, "_conn", None)
        if conn is not None:
            conn.close()
            self._conn = None
        self._release()

    def _release(self) -> None:
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the lock
            self._lock_fd = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _same_config(manifest: dict, config: IndexConfig) -> bool:
    """Whether the committed index was built with ``config`` (settings added later take their defaults, so
    an index written before them is not rebuilt for it)."""
    recorded = manifest.get("index", {}).get("config")
    try:
        return isinstance(recorded, dict) and IndexConfig.from_dict(recorded) == config
    except (StoreError, TypeError):
        return False


def _segment_of(specs: list[_SegmentSpec], row_id: int, index_dir: Path) -> str:
    for s in specs:
        if s.lo <= row_id <= s.hi:
            return s.name
    raise _corrupt(index_dir / DB_NAME, f"chunk row {row_id} belongs to no segment of the committed index")


def _int_or(value: object, default: int) -> int:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


def _acquire_lock(directory: Path) -> int:
    path = directory / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(f"{path}: cannot open the write lock ({exc.strerror}); writing an index needs write "
                         f"access to {directory}") from None
    try:
        taken = locks.try_exclusive(fd)
    except BaseException:
        os.close(fd)
        raise
    if not taken:
        try:
            holder = locks.read_pid(fd)
        finally:
            os.close(fd)
        raise StoreError(f"index {directory} is being written by another process (pid {holder}); "
                         "wait for it to finish") from None
    locks.write_pid(fd)
    return fd


def check_unlocked(index_dir: str | Path) -> None:
    """Raise the writer's :class:`StoreError` now if another process is writing ``index_dir``, or if it is
    a folder the writer would refuse (neither empty nor an index); lets the CLI fail before spending a
    minute loading a model (the writer still checks and takes the lock for real)."""
    directory = Path(index_dir).expanduser()
    _check_index_folder(directory)
    if index_is_locked(directory):
        holder = locks.read_pid_file(directory / LOCK_NAME)
        raise StoreError(f"index {directory} is being written by another process (pid {holder}); "
                         "wait for it to finish")


def index_is_locked(index_dir: str | Path) -> bool:
    """True while some process holds the write lock of ``index_dir``."""
    path = Path(index_dir).expanduser() / LOCK_NAME
    return path.exists() and locks.is_locked(path)
