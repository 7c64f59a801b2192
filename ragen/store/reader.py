"""The reader: :class:`Store` opens the committed generation (under the readers' lock) and searches
its segments; :func:`read_manifest` reads the committed manifest alone."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import StoreError
from ..types import Chunk, Hit
from .faiss_index import GPU_MAX_K, PQ_RERANK, IndexConfig, TorchFlat, check_faiss, is_pq, rerank_exact, _apply_search_params, _resolve_search_device, _search_params, _to_device, normalize_rows
from .schema import DB_NAME, MANIFEST_NAME, EncoderInfo, _check_manifest_file, _committed, _connect_reader, _corrupt, _current_generation, _db_error, _meta
from .segments import _digests, _full_digest, _Digest, _live_segments, _Loaded, _load_segment, _readers_lock, _tombstones

logger = logging.getLogger(__name__)


class Store:
    """A committed index opened for search. Build one with :class:`StoreWriter`; open it with :meth:`open`."""

    def __init__(self, index_dir: Path, conn: sqlite3.Connection, manifest: dict, generation: int,
                 segments: list[_Loaded], gpu: int | None, digests: dict[str, _Digest] | None = None) -> None:
        self.index_dir = index_dir
        self._conn = conn
        self.manifest = manifest
        self.generation = generation
        self._segments = segments
        self._gpu = gpu
        self._digests = digests or {}
        self._count = sum(s.ntotal - (0 if s.params is None else len(s.params._ragen_refs[1])) for s in segments)
        for s in segments:
            if isinstance(gpu, str):  # torch, no faiss-gpu: a reused segment keeps its tensor, not its mask
                removed = None if s.params is None else s.params._ragen_refs[1]
                if isinstance(s.device_index, TorchFlat):
                    s.device_index = s.device_index.with_removed(removed)
                else:
                    s.device_index = TorchFlat.from_index(s.index, s.ids, removed, gpu[len("torch:"):])
                s.device_ids = None
            elif gpu is not None and s.device_index is None:
                s.device_index, s.device_ids = _to_device(s, gpu)

    # --- opening ------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, index_dir: str | Path, *, device: str | None = None, _loaded: dict | None = None) -> Store:
        """Open the committed generation of ``index_dir``; ``device``: ``None``/``auto`` (GPU when faiss
        has one), ``cpu`` or ``cuda[:N]``. Raises :class:`StoreError` for a missing, incomplete,
        corrupt or newer-format index. Needs read access only."""
        directory = Path(index_dir).expanduser()
        db = directory / DB_NAME
        if not directory.is_dir() or not db.is_file():
            raise StoreError(f"{directory}: no ragen index here (expected {DB_NAME}); "
                             f"build one with `ragen index PATH --index {directory}`")
        _check_manifest_file(directory / MANIFEST_NAME)
        check_faiss()
        reuse = _loaded or {}  # segment files are immutable: a reload keeps the ones it already has
        for attempt in range(5):
            conn = None
            try:
                with _readers_lock(directory):  # the chosen generation's files stay until they are loaded
                    conn = _connect_reader(db)
                    conn.execute("BEGIN")  # one snapshot: generation, manifest, segments, tombstones, digests
                    try:
                        meta = _meta(conn)
                        manifest, generation = _committed(meta, db)
                        specs = _live_segments(meta, generation, db)
                        removed = _tombstones(conn) if meta.get("segments") is not None else {}
                        digests = _digests(conn, [n for s in specs for n in (s.name, s.ids_name) if n])
                    finally:
                        conn.execute("COMMIT")
                    config = IndexConfig.from_dict(manifest.get("index", {}).get("config", {}))
                    dim = int(manifest["encoder"]["dim"])
                    try:
                        segments = []
                        for spec in specs:
                            old = reuse.get(spec.name)
                            if old is not None and old.spec == spec:
                                index, ids = old.index, old.ids
                            else:
                                index, ids = _load_segment(directory, spec, digests, dim)
                                _apply_search_params(index, config)
                            same = old is not None and old.spec == spec
                            segments.append(_Loaded(spec, index, ids, _search_params(index, config, removed.get(spec.name)),
                                                    old.device_index if same else None, old.device_ids if same else None))
                    except StoreError:
                        # only a reader without the lock can see a writer retire its files: choose again
                        if attempt < 4 and _current_generation(db) not in (None, generation):
                            conn.close()
                            time.sleep(0.01)
                            continue
                        raise
            except sqlite3.Error as exc:
                if conn is not None:
                    conn.close()
                raise _db_error(db, exc, writing=False) from None
            except BaseException:
                if conn is not None:
                    conn.close()
                raise
            # The manifest's count was committed together with the generation (one meta read), so a
            # writer committing meanwhile cannot make a healthy index look corrupt.
            live = sum(s.ntotal for s in segments) - sum(len(r) for r in removed.values())
            n_chunks = int(manifest.get("counts", {}).get("chunks", live))
            if n_chunks != live:
                conn.close()
                raise _corrupt(db, f"holds {n_chunks} chunks but the FAISS index of generation {generation} "
                                   f"has {live}")
            kind = manifest.get("index", {}).get("kind", "flat")
            try:
                gpu = _resolve_search_device(device, kind)
                store = cls(directory, conn, manifest, generation, segments, gpu, digests)
                store._device = device  # what a reload asks for again
                return store
            except BaseException:
                conn.close()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- properties ---------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.manifest["encoder"]["dim"])

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["encoder"]["fingerprint"])

    @property
    def spec(self) -> str:
        return str(self.manifest["encoder"]["spec"])

    @property
    def base_model(self) -> str | None:
        """The backbone recorded for the index's LLM2Vec-Gen model (None for other encoders)."""
        value = self.manifest["encoder"].get("base_model")
        return str(value) if value else None

    @property
    def encoder_info(self) -> EncoderInfo:
        known = {f for f in EncoderInfo.__dataclass_fields__}
        return EncoderInfo(**{k: v for k, v in self.manifest["encoder"].items() if k in known})

    @property
    def count(self) -> int:
        return int(self._count)

    @property
    def on_gpu(self) -> bool:
        return self._gpu is not None

    # --- search -------------------------------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)``, each ``(n_queries, k')`` with ``k' = min(k, count)``: inner products of the
        L2-normalised queries with the stored vectors, best first, and the chunk row ids (-1 = none)."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise StoreError(f"query vectors have shape {tuple(np.shape(queries))}; this index expects (n, {self.dim}) "
                             "from the encoder it was built with")
        if k < 1:
            raise StoreError(f"k must be >= 1, got {k}")
        k = min(k, self.count)
        if k == 0:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        q = normalize_rows(q)
        parts = []
        for seg in self._segments:  # each segment's best k, then the best k of those
            kk = min(k, seg.ntotal)
            if kk == 0:
                continue
            if isinstance(seg.device_index, TorchFlat):  # exact, deleted rows masked, row ids mapped
                parts.append(seg.device_index.search(q, kk))
                continue
            pq = is_pq(seg.index)  # compressed codes: k * PQ_RERANK candidates, re-ranked exactly below
            if pq:
                kk = min(kk * PQ_RERANK, seg.ntotal)
            if seg.params is not None:  # skip deleted rows inside faiss (CPU)
                scores, pos = seg.index.search(q, kk, params=seg.params)
                mapping = seg.ids
            else:
                on_device = seg.device_index is not None and kk <= GPU_MAX_K
                scores, pos = (seg.device_index if on_device else seg.index).search(q, kk)  # (n, kk) each
                mapping = seg.device_ids if on_device else seg.ids
            if mapping is not None:
                pos = np.where(pos >= 0, mapping[np.clip(pos, 0, None)], -1)
            if pq:
                scores, pos = rerank_exact(q, pos, self._vectors_of_rows(np.unique(pos[pos >= 0])), min(k, seg.ntotal))
            parts.append((scores, pos))
        if len(parts) == 1:
            scores, ids = parts[0]
        else:
            scores = np.concatenate([p[0] for p in parts], axis=1)
            ids = np.concatenate([p[1] for p in parts], axis=1)
            order = np.argsort(-np.where(ids >= 0, scores, -np.inf), axis=1, kind="stable")[:, :k]
            scores = np.take_along_axis(scores, order, axis=1)
            ids = np.take_along_axis(ids, order, axis=1)
        return scores[:, :k], ids[:, :k]

    def _vectors_of_rows(self, row_ids: np.ndarray) -> dict[int, np.ndarray]:
        """The stored (normalised) vectors of chunk rows, read in bulk from SQLite (for re-ranking)."""
        dim = self.dim
        out: dict[int, np.ndarray] = {}
        wanted = [int(r) for r in row_ids]
        try:
            for start in range(0, len(wanted), 500):
                part = wanted[start:start + 500]
                marks = ",".join("?" * len(part))
                for row_id, blob in self._conn.execute(
                        # CROSS JOIN: chunks first (by row id), then one vector lookup each; with a plain JOIN
                        # the planner may scan every vector of the epoch for each call
                        f"SELECT c.id, v.vector FROM chunks c CROSS JOIN vectors v ON v.content_hash = c.content_hash "
                        f"AND v.epoch = (SELECT CAST(value AS INTEGER) FROM meta WHERE key='epoch') "
                        f"WHERE c.id IN ({marks})", part):
                    if len(blob) == 4 * dim:
                        out[int(row_id)] = np.frombuffer(blob, dtype=np.float32)
        except sqlite3.Error as exc:
            raise _db_error(self.index_dir / DB_NAME, exc, writing=False) from None
        return out

    def chunks(self, ids: Iterable[int]) -> dict[int, Chunk]:
        """Chunk metadata for row ids (missing ids are absent from the result)."""
        wanted = [int(i) for i in ids if int(i) >= 0]
        rows = {}
        try:
            for start in range(0, len(wanted), 500):
                part = wanted[start:start + 500]
                marks = ",".join("?" * len(part))
                for row in self._conn.execute(
                        f"SELECT id, chunk_id, path, position, text, start, end, content_hash FROM chunks "
                        f"WHERE id IN ({marks})", part):
                    rows[row[0]] = Chunk(*row[1:])
        except sqlite3.Error as exc:
            raise _db_error(self.index_dir / DB_NAME, exc, writing=False) from None
        return rows

    def hits(self, query: np.ndarray, k: int = 10) -> list[Hit]:
        """The top ``k`` chunks for one ``(dim,)`` query vector, as :class:`~ragen.types.Hit` (rank 1-based)."""
        q = np.asarray(query, np.float32).reshape(1, -1)
        for _ in range(5):
            scores, ids = self.search(q, k)
            # Read the committed generation and the chunk rows in one read transaction (one WAL snapshot):
            # row ids are reused across generations, so rows read under a newer generation than the FAISS
            # index in memory could be other chunks' text.
            try:
                self._conn.execute("BEGIN")
                try:
                    current = self._committed_generation()
                    found = self.chunks(ids[0]) if current in (None, self.generation) else None
                finally:
                    self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise _db_error(self.index_dir / DB_NAME, exc, writing=False) from None
            if found is not None:
                break
            self._reload()  # a writer committed a new generation: search that one
        else:  # pragma: no cover - five commits during one search
            raise StoreError(f"{self.index_dir}: the index kept changing during the search; try again")
        out = []
        for score, i in zip(scores[0], ids[0]):
            chunk = found.get(int(i))
            if chunk is None:
                continue
            out.append(Hit(rank=len(out) + 1, score=float(score), chunk_id=chunk.chunk_id, path=chunk.path,
                           text=chunk.text, start=chunk.start, end=chunk.end))
        return out

    def _committed_generation(self) -> int | None:
        try:
            row = self._conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        except sqlite3.DatabaseError:
            return None
        try:
            return None if row is None else int(row[0])
        except ValueError:
            return None

    def _reload(self) -> None:
        device = getattr(self, "_device", None)
        if device is None:
            device = "cpu" if self._gpu is None else f"cuda:{self._gpu}" if isinstance(self._gpu, int) else "auto"
        fresh = Store.open(self.index_dir, device=device, _loaded={s.spec.name: s for s in self._segments})
        self._conn.close()
        self.__dict__.update(fresh.__dict__)

    # --- inspection ---------------------------------------------------------------------------------------
    def files(self) -> list[tuple[str, int, int, int]]:
        """``(path, size, mtime_ns, n_chunks)`` of every indexed file, by path."""
        try:
            return self._conn.execute("SELECT path, size, mtime_ns, n_chunks FROM files ORDER BY path").fetchall()
        except sqlite3.Error as exc:
            raise _db_error(self.index_dir / DB_NAME, exc, writing=False) from None

    def file_states(self) -> dict:
        """``path -> FileState`` (size, mtime_ns, sha256, read_ns) of every indexed file."""
        from .writer import FileState

        return {p: FileState(sz, m, h, r) for p, sz, m, h, r in self._rows(
            "SELECT path, size, mtime_ns, sha256, read_ns FROM files", "SELECT path, size, mtime_ns, NULL, NULL FROM files")}

    def remembered_skips(self) -> dict:
        """``path -> SkippedFile``: files an earlier run found unindexable by their bytes."""
        from .writer import FileState, SkippedFile

        return {p: SkippedFile(p, FileState(sz, m, h, r), why) for p, sz, m, h, r, why in self._rows(
            "SELECT path, size, mtime_ns, sha256, read_ns, reason FROM skipped_files", None)}

    def staged_count(self) -> int:
        """Files an unfinished ``ragen index`` run extracted but did not commit yet."""
        rows = self._rows("SELECT COUNT(*) FROM staged_files", None)
        return int(rows[0][0]) if rows else 0

    def _rows(self, sql: str, fallback: str | None) -> list:
        """Rows of a query on a table or column that an index written by an older ragen may lack
        (``fallback``: the query without it; None: no rows)."""
        try:
            return self._conn.execute(sql).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such" not in str(exc):
                raise _db_error(self.index_dir / DB_NAME, exc, writing=False) from None
            return [] if fallback is None else self._conn.execute(fallback).fetchall()
        except sqlite3.Error as exc:
            raise _db_error(self.index_dir / DB_NAME, exc, writing=False) from None

    def disk_bytes(self) -> int:
        total = 0
        for p in self.index_dir.iterdir():
            try:
                if p.is_file():
                    total += p.stat().st_size
            except OSError:  # a retired generation deleted meanwhile
                continue
        return total

    def verify(self) -> dict:
        """Check the loaded generation's files against their full recorded SHA-256 and the database with
        ``PRAGMA quick_check``; returns ``{"files": {name: size}, "database": "ok"}`` or raises
        :class:`StoreError` naming the damaged file."""
        db = self.index_dir / DB_NAME
        try:
            problems = [row[0] for row in self._conn.execute("PRAGMA quick_check").fetchall()]
        except sqlite3.Error as exc:
            raise _db_error(db, exc, writing=False) from None
        if problems != ["ok"]:
            raise _corrupt(db, f"fails SQLite's integrity check ({problems[0][:120]})")
        checked = {}
        names = [n for s in self._segments for n in (s.spec.name, s.spec.ids_name) if n]
        for path in (self.index_dir / n for n in names):
            digest = self._digests.get(path.name)
            if digest is None or digest.sha256 is None:
                raise StoreError(f"{path}: no digest was recorded for it (written by an older ragen); run "
                                 f"`ragen index PATH --index {self.index_dir}` once to record digests")
            try:
                size = path.stat().st_size
                full = _full_digest(path)
            except OSError as exc:
                raise _corrupt(path, f"cannot be read ({exc.strerror})") from None
            if size != digest.size or full != digest.sha256:
                raise _corrupt(path, "does not match the SHA-256 recorded for it (replaced or damaged)")
            checked[path.name] = size
        return {"files": checked, "database": "ok"}


def read_build_settings(index_dir: str | Path) -> dict | None:
    """How the index in ``index_dir`` was built (the committed manifest), else what an interrupted first
    run was started with (``encoder``, ``chunking``, ``index``; ``"committed": False``), else None (no
    index, or an unreadable one: the writer reports that properly)."""
    import json

    db = Path(index_dir).expanduser() / DB_NAME
    if not db.is_file():
        return None
    try:
        conn = _connect_reader(db)
        try:
            meta = _meta(conn)
        finally:
            conn.close()
    except (sqlite3.Error, StoreError):
        return None
    for key, committed in (("manifest", True), ("work_settings", False)):
        try:
            value = json.loads(meta[key]) if key in meta else None
        except ValueError:
            value = None
        if isinstance(value, dict) and isinstance(value.get("encoder"), dict):
            return {**value, "committed": committed}
    return None


def read_manifest(index_dir: str | Path) -> dict:
    """The committed manifest of an index, from its database (authoritative) without loading FAISS."""
    directory = Path(index_dir).expanduser()
    db = directory / DB_NAME
    if not db.is_file():
        raise StoreError(f"{directory}: no ragen index here (expected {DB_NAME}); "
                         f"build one with `ragen index PATH --index {directory}`")
    _check_manifest_file(directory / MANIFEST_NAME)
    try:
        conn = _connect_reader(db)
        try:
            return _committed(_meta(conn), db)[0]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise _db_error(db, exc, writing=False) from None

