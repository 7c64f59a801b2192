"""The on-disk index: FAISS vectors, chunk metadata in SQLite, a JSON manifest. Vectors and ids only.

Layout of an index directory::

    chunks.sqlite           chunk text/path/offsets/hash, file sizes and mtimes, the vectors (float32
                            BLOBs, by content hash), and the committed state (generation, manifest)
    vectors-<G>.faiss       the FAISS index of generation G (derived from the vectors in the database)
    vectors-<G>.ids.npy     chunk row id of each FAISS position (int64, no pickle)
    manifest.json           a human-readable copy of the committed manifest
    write.lock              ``flock``-ed by the one process allowed to write

Crash safety. Embedded vectors are committed batch by batch, so a killed run loses at most the batch
in flight and the next run embeds only what is missing (matched by content hash). A run ends by writing
a new generation's FAISS and id files atomically (temp + fsync + rename) and then switching to them in
one SQLite transaction that also replaces the changed chunk rows: that commit is the atomic switch.
Readers load the generation the database names, so the previous index stays loadable at every moment.
SQLite runs in WAL mode: readers see the last committed state while a writer works.

The store never imports an encoder: it records the encoder's spec/fingerprint/dim as given and refuses
vectors of another width. Vectors are L2-normalised on the way in and queries on the way to search, so
inner product is cosine similarity.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ._io import atomic_path, atomic_save_npy, atomic_write_bytes, fsync_dir
from .errors import StoreError
from .types import Chunk, Hit

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DB_NAME = "chunks.sqlite"
MANIFEST_NAME = "manifest.json"
LOCK_NAME = "write.lock"
INDEX_KINDS = ("flat", "hnsw", "ivf")
GPU_MAX_K = 2048  # faiss GPU k-selection limit


# ----------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexConfig:
    """Which FAISS index to build. ``flat`` is exact; ``hnsw`` and ``ivf`` trade recall for speed.

    ``ivf_nlist=None`` picks ``4 * sqrt(n)`` lists (at least 39 training points per list, as faiss
    wants); an IVF index over too few vectors for two lists is built flat instead.
    """

    kind: str = "flat"
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 128
    ivf_nlist: int | None = None
    ivf_nprobe: int = 32

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise StoreError(f"unknown index type {self.kind!r}; expected one of: {', '.join(INDEX_KINDS)}")
        for name in ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ivf_nprobe"):
            if getattr(self, name) < 1:
                raise StoreError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ivf_nlist is not None and self.ivf_nlist < 1:
            raise StoreError(f"ivf_nlist must be >= 1, got {self.ivf_nlist}")

    @classmethod
    def from_dict(cls, data: dict) -> IndexConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class EncoderInfo:
    """What the store records about the encoder that produced its vectors."""

    spec: str
    fingerprint: str
    dim: int
    query_instruction: str | None = None
    document_instruction: str | None = None
    base_model: str | None = None  # the backbone an LLM2Vec-Gen spec was loaded with (offline overrides)


@dataclass(frozen=True)
class FileRecord:
    """A file's new state, handed to :meth:`StoreWriter.commit`: its stat and all of its chunks."""

    path: str
    size: int
    mtime_ns: int
    chunks: tuple[Chunk, ...]


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


# ----------------------------------------------------------------------------------------------------------
# small helpers: atomic files, GPU
# ----------------------------------------------------------------------------------------------------------
def _atomic_write_faiss(index, path: Path) -> None:
    import faiss

    try:
        with atomic_path(path) as tmp:
            faiss.write_index(index, str(tmp))
    except RuntimeError as exc:  # faiss reports I/O failures (disk full) as RuntimeError
        raise StoreError(f"{path}: cannot write the FAISS index ({str(exc).splitlines()[0][:160]})") from None


_GPU_RESOURCES = None


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and getattr(faiss, "get_num_gpus", lambda: 0)() > 0


def _gpu_resources():
    """One ``StandardGpuResources`` per process: it owns scratch memory and streams, so share it."""
    global _GPU_RESOURCES
    if _GPU_RESOURCES is None:
        import faiss

        _GPU_RESOURCES = faiss.StandardGpuResources()
    return _GPU_RESOURCES


def _resolve_search_device(device: str | None, kind: str) -> int | None:
    """GPU number to search on, or None for CPU. HNSW has no faiss GPU implementation: always CPU."""
    if device is None or device == "auto":
        return 0 if kind != "hnsw" and gpu_available() else None
    if device == "cpu":
        return None
    if device.startswith("cuda"):
        if not gpu_available():
            raise StoreError(f"device {device!r} was requested but faiss has no GPU support or sees no GPU "
                             "(install faiss-gpu, or use --device cpu)")
        if kind == "hnsw":
            logger.info("HNSW indexes search on the CPU (faiss has no GPU HNSW)")
            return None
        _, _, num = device.partition(":")
        return int(num) if num.isdigit() else 0
    raise StoreError(f"unknown device {device!r}; expected cpu, cuda or cuda:N")


def to_gpu(index, gpu: int):
    import faiss

    return faiss.index_cpu_to_gpu(_gpu_resources(), gpu, index)


def to_cpu(index):
    """A CPU copy of a GPU index (what gets written to disk); CPU indexes pass through."""
    import faiss

    return faiss.index_gpu_to_cpu(index) if "Gpu" in type(index).__name__ else index


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def build_faiss_index(vectors: np.ndarray, config: IndexConfig, *, seed: int = 0):
    """A CPU FAISS index over (already normalised) ``vectors`` for inner-product search; returns
    ``(index, kind)`` where ``kind`` is what was actually built (IVF falls back to flat on tiny sets)."""
    import faiss

    n, dim = vectors.shape
    kind = config.kind
    if kind == "ivf":
        nlist = config.ivf_nlist or int(4 * math.sqrt(max(n, 1)))
        nlist = min(nlist, n // 39)
        if nlist < 2:
            logger.info("IVF needs at least 78 vectors; %d vectors are indexed flat (exact)", n)
            kind = "flat"
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.hnsw_ef_construction
        index.hnsw.efSearch = config.hnsw_ef_search
    else:
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = vectors
        if n > 256 * nlist:  # faiss would subsample anyway; doing it here keeps it deterministic and quiet
            rng = np.random.default_rng(seed)
            sample = vectors[np.sort(rng.choice(n, 256 * nlist, replace=False))]
        index.train(sample)  # faiss's Python wrapper keeps `quantizer` referenced by `index`
        index.nprobe = min(config.ivf_nprobe, nlist)
    if n:
        index.add(vectors)
    return index, kind


def _apply_search_params(index, config: IndexConfig) -> None:
    import faiss

    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = config.hnsw_ef_search
    elif isinstance(inner, faiss.IndexIVF):
        inner.nprobe = min(config.ivf_nprobe, inner.nlist)


# ----------------------------------------------------------------------------------------------------------
# the database
# ----------------------------------------------------------------------------------------------------------
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, n_chunks INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    chunk_id TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL,
    position INTEGER NOT NULL,
    start INTEGER NOT NULL,
    end INTEGER NOT NULL,
    content_hash TEXT NOT NULL,
    text TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_path ON chunks(path);
CREATE TABLE IF NOT EXISTS vectors (
    epoch INTEGER NOT NULL, content_hash TEXT NOT NULL, vector BLOB NOT NULL,
    PRIMARY KEY (epoch, content_hash)
) WITHOUT ROWID;
"""


def _connect(db: Path) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN ... COMMIT), so each is exactly what we say.
    conn = sqlite3.connect(str(db), isolation_level=None, timeout=30.0, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a commit survives a killed process; a power cut may lose the last commits but
    # never corrupts the database. Syncing the WAL on every batch would cost more than the embedding.
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _corrupt(path: Path, what: str) -> StoreError:
    return StoreError(f"{path}: {what}; rebuild the index with `ragen index PATH --index {path.parent} --rebuild`")


def _meta(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT key, value FROM meta").fetchall())


# ----------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------
class Store:
    """A committed index opened for search. Build one with :class:`StoreWriter`; open it with :meth:`open`."""

    def __init__(self, index_dir: Path, conn: sqlite3.Connection, manifest: dict, generation: int, index,
                 ids: np.ndarray, gpu: int | None) -> None:
        self.index_dir = index_dir
        self._conn = conn
        self.manifest = manifest
        self.generation = generation
        self._cpu_index = index
        self._ids = ids
        self._gpu = gpu
        self._index = to_gpu(index, gpu) if gpu is not None else index

    # --- opening ------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, index_dir: str | Path, *, device: str | None = None) -> Store:
        """Open the committed generation of ``index_dir``; ``device``: ``None``/``auto`` (GPU when faiss
        has one), ``cpu`` or ``cuda[:N]``. Raises :class:`StoreError` for a missing, incomplete,
        corrupt or newer-format index."""
        directory = Path(index_dir).expanduser()
        db = directory / DB_NAME
        if not directory.is_dir() or not db.is_file():
            raise StoreError(f"{directory}: no ragen index here (expected {DB_NAME}); "
                             f"build one with `ragen index PATH --index {directory}`")
        _check_manifest_file(directory / MANIFEST_NAME)
        for attempt in range(3):  # a writer may switch generations between reading the name and the files
            conn = None
            try:
                conn = _connect(db)
                meta = _meta(conn)
                manifest, generation = _committed(meta, db)
                index, ids = _load_generation(directory, generation, manifest)
                # The manifest's count was committed together with the generation (one meta read), so a
                # writer committing meanwhile cannot make a healthy index look corrupt.
                n_chunks = int(manifest.get("counts", {}).get("chunks", len(ids)))
            except sqlite3.DatabaseError as exc:
                if conn is not None:
                    conn.close()
                raise _corrupt(db, f"not a readable ragen index database ({exc})") from None
            except _GenerationGone:
                conn.close()
                if attempt == 2:
                    raise
                time.sleep(0.05)
                continue
            if n_chunks != len(ids):
                conn.close()
                raise _corrupt(db, f"holds {n_chunks} chunks but the FAISS index of generation {generation} "
                                   f"has {len(ids)}")
            kind = manifest.get("index", {}).get("kind", "flat")
            _apply_search_params(index, IndexConfig.from_dict(manifest.get("index", {}).get("config", {})))
            return cls(directory, conn, manifest, generation, index, ids, _resolve_search_device(device, kind))
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
        return int(len(self._ids))

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
        index = self._index if (self._gpu is None or k <= GPU_MAX_K) else self._cpu_index
        scores, pos = index.search(normalize_rows(q), k)  # (n, k) each
        ids = np.where(pos >= 0, self._ids[np.clip(pos, 0, None)], -1)
        return scores, ids

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
        except sqlite3.DatabaseError as exc:
            raise _corrupt(self.index_dir / DB_NAME, f"cannot read chunk metadata ({exc})") from None
        return rows

    def hits(self, query: np.ndarray, k: int = 10) -> list[Hit]:
        """The top ``k`` chunks for one ``(dim,)`` query vector, as :class:`~ragen.types.Hit` (rank 1-based)."""
        q = np.asarray(query, np.float32).reshape(1, -1)
        for _ in range(5):
            scores, ids = self.search(q, k)
            # Read the committed generation and the chunk rows in one read transaction (one WAL snapshot):
            # row ids are reused across generations, so rows read under a newer generation than the FAISS
            # index in memory could be other chunks' text.
            self._conn.execute("BEGIN")
            try:
                current = self._committed_generation()
                found = self.chunks(ids[0]) if current in (None, self.generation) else None
            finally:
                self._conn.execute("COMMIT")
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
        return None if row is None else int(row[0])

    def _reload(self) -> None:
        fresh = Store.open(self.index_dir, device="cpu" if self._gpu is None else f"cuda:{self._gpu}")
        self._conn.close()
        self.__dict__.update(fresh.__dict__)

    # --- inspection ---------------------------------------------------------------------------------------
    def files(self) -> list[tuple[str, int, int, int]]:
        """``(path, size, mtime_ns, n_chunks)`` of every indexed file, by path."""
        return self._conn.execute("SELECT path, size, mtime_ns, n_chunks FROM files ORDER BY path").fetchall()

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.index_dir.iterdir() if p.is_file())


class _GenerationGone(StoreError):
    pass


def _check_manifest_file(path: Path) -> None:
    if not path.exists():
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _corrupt(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "format_version" not in data:
        raise _corrupt(path, "not a ragen manifest (no format_version)")
    if int(data["format_version"]) > FORMAT_VERSION:
        raise StoreError(f"{path}: index format {data['format_version']} is newer than this ragen "
                         f"understands ({FORMAT_VERSION}); upgrade ragen")


def _committed(meta: dict[str, str], db: Path) -> tuple[dict, int]:
    if "generation" not in meta or "manifest" not in meta:
        raise StoreError(f"{db.parent}: the index is incomplete (its first `ragen index` run did not finish); "
                         "run `ragen index` again to resume")
    try:
        manifest = json.loads(meta["manifest"])
        generation = int(meta["generation"])
    except (json.JSONDecodeError, ValueError) as exc:
        raise _corrupt(db, f"committed manifest is unreadable ({exc})") from None
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise StoreError(f"{db.parent}: index format {manifest['format_version']} is newer than this ragen "
                         f"understands ({FORMAT_VERSION}); upgrade ragen")
    return manifest, generation


def _generation_paths(directory: Path, generation: int) -> tuple[Path, Path]:
    return directory / f"vectors-{generation}.faiss", directory / f"vectors-{generation}.ids.npy"


def _load_generation(directory: Path, generation: int, manifest: dict):
    import faiss

    faiss_path, ids_path = _generation_paths(directory, generation)
    if not faiss_path.exists() or not ids_path.exists():
        # either a writer just replaced this generation (retry) or the file was deleted (corrupt)
        db_now = _connect(directory / DB_NAME)
        try:
            current = int(_meta(db_now).get("generation", generation))
        finally:
            db_now.close()
        if current != generation:
            raise _GenerationGone(f"generation {generation} was replaced")
        missing = faiss_path if not faiss_path.exists() else ids_path
        raise _corrupt(missing, "missing")
    try:
        index = faiss.read_index(str(faiss_path))
    except RuntimeError as exc:
        raise _corrupt(faiss_path, f"not a readable FAISS index ({str(exc).splitlines()[0][:120]})") from None
    try:
        ids = np.load(ids_path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise _corrupt(ids_path, f"not a readable id array ({exc})") from None
    dim = int(manifest["encoder"]["dim"])
    if ids.ndim != 1 or ids.dtype != np.int64 or len(ids) != index.ntotal or index.d != dim:
        raise _corrupt(faiss_path, f"does not match its id file or the manifest (ntotal {index.ntotal}, "
                                   f"{len(ids)} ids, dim {index.d} vs {dim})")
    return index, ids


# ----------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------
def _database_errors(method):
    """Database failures while writing (disk full, a lock held past the timeout, a damaged file) become a
    one-line :class:`StoreError` naming the index; the previous committed index is untouched either way."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.index_dir / DB_NAME}: {exc}; the previous index is unchanged") from None

    return wrapper


class StoreWriter:
    """Exclusive writer of one index directory (``flock`` on ``write.lock``).

    Use as a context manager. Typical run: :meth:`needs_reading` / :meth:`missing_vectors` to plan,
    :meth:`add_vectors` per embedded batch (each a committed transaction), :meth:`commit` once at the end.

    Vectors live in *epochs*: a normal run adds to the committed epoch, so unchanged chunks keep their
    vectors; ``rebuild`` (and a first run) fills a fresh epoch, so the previous index stays intact and
    loadable until the final commit switches to the new one.
    """

    def __init__(self, index_dir: str | Path, *, encoder: EncoderInfo, chunking: dict,
                 index_config: IndexConfig = IndexConfig(), rebuild: bool = False, source: str | None = None) -> None:
        self.index_dir = Path(index_dir).expanduser()
        self.encoder = encoder
        self.chunking = dict(chunking)
        self.index_config = index_config
        self.rebuild = rebuild
        self.source = source
        self.created = not self.index_dir.exists()
        if self.index_dir.exists() and not self.index_dir.is_dir():
            raise StoreError(f"{self.index_dir}: exists and is not a directory; pass another --index")
        self.index_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _acquire_lock(self.index_dir)
        try:
            self._conn = _connect(self.index_dir / DB_NAME)
            self._conn.executescript(_SCHEMA)
            self._prepare()
        except sqlite3.DatabaseError as exc:
            self._release()
            raise _corrupt(self.index_dir / DB_NAME, f"not a usable ragen index database ({exc})") from None
        except BaseException:
            self._release()
            raise

    # --- setup --------------------------------------------------------------------------------------------
    def _prepare(self) -> None:
        meta = _meta(self._conn)
        self.committed: dict | None = json.loads(meta["manifest"]) if "manifest" in meta else None
        self.generation = int(meta.get("generation", 0))
        committed_epoch = int(meta.get("epoch", 0))
        if self.committed is not None and not self.rebuild:
            if int(self.committed.get("format_version", 0)) > FORMAT_VERSION:
                raise StoreError(f"{self.index_dir}: index format {self.committed['format_version']} is newer "
                                 f"than this ragen understands ({FORMAT_VERSION}); upgrade ragen")
            old = self.committed["encoder"]
            if old["fingerprint"] != self.encoder.fingerprint or int(old["dim"]) != self.encoder.dim:
                raise StoreError(
                    f"{self.index_dir}: built with encoder {old['spec']} (dim {old['dim']}, fingerprint "
                    f"{old['fingerprint']}), not {self.encoder.spec} (dim {self.encoder.dim}, fingerprint "
                    f"{self.encoder.fingerprint}); pass --model {old['spec']} or --rebuild")
            self.epoch = committed_epoch
        else:
            work_epoch = int(meta.get("work_epoch", 0))
            # A killed run (a --rebuild or a model switch included) left vectors in its epoch: the next run
            # with the same encoder continues it instead of embedding everything again.
            resumable = work_epoch > committed_epoch and meta.get("work_fingerprint") == self.encoder.fingerprint
            self.epoch = work_epoch if resumable else max(committed_epoch, work_epoch) + 1
        # a full pass (first run, rebuild, new chunking) re-reads every file; vectors are still reused by
        # content hash whenever they are in this run's epoch
        self.full = (self.committed is None or self.rebuild
                     or self.committed.get("chunking") != self.chunking)
        # what this run was started with, so that a re-run after an interrupted first run reuses it
        self._set("work_settings", json.dumps({"encoder": asdict(self.encoder), "chunking": self.chunking,
                                               "index": {"config": asdict(self.index_config)}}, sort_keys=True))
        with self._transaction():
            self._conn.execute("DELETE FROM vectors WHERE epoch NOT IN (?, ?)", (committed_epoch, self.epoch))
            self._set("work_epoch", self.epoch)
            self._set("work_fingerprint", self.encoder.fingerprint)
        for stale in self.index_dir.iterdir():  # leftovers of killed runs: temp files, unused generations
            if stale.name.startswith(".") and stale.name.endswith(".tmp") or (
                    stale.name.startswith("vectors-") and not stale.name.startswith(f"vectors-{self.generation}.")):
                stale.unlink(missing_ok=True)

    def _set(self, key: str, value: object) -> None:
        self._conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, str(value)))

    def _transaction(self):
        conn = self._conn

        class _Tx:
            def __enter__(self_inner):
                conn.execute("BEGIN IMMEDIATE")

            def __exit__(self_inner, exc_type, exc, tb):
                conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
                return False

        return _Tx()

    # --- planning -----------------------------------------------------------------------------------------
    def known_files(self) -> dict[str, tuple[int, int]]:
        """``path -> (size, mtime_ns)`` of the files in the committed index (empty on a full pass)."""
        if self.full:
            return {}
        return {p: (s, m) for p, s, m in self._conn.execute("SELECT path, size, mtime_ns FROM files")}

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
        vecs = np.asarray(vectors, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape != (len(hashes), self.encoder.dim):
            raise StoreError(f"got vectors of shape {vecs.shape} for {len(hashes)} chunks; the index expects "
                             f"dimension {self.encoder.dim}")
        if not np.isfinite(vecs).all():
            raise StoreError("the encoder produced NaN or infinite values; check the model and its dtype")
        vecs = normalize_rows(vecs)
        with self._transaction():
            self._conn.executemany("INSERT OR REPLACE INTO vectors(epoch, content_hash, vector) VALUES (?, ?, ?)",
                                   [(self.epoch, h, v.tobytes()) for h, v in zip(hashes, vecs)])

    # --- the switch ---------------------------------------------------------------------------------------
    @_database_errors
    def commit(self, updated: Sequence[FileRecord], present: Iterable[str]) -> CommitResult:
        """Make the new state the committed one, atomically.

        ``updated``: files that are new or changed (all files on a full pass), with all their chunks.
        ``present``: every file that belongs in the index now (updated and unchanged); other files of the
        committed index are removed. Every chunk's vector must have been added (:meth:`add_vectors`).
        """
        t0 = time.perf_counter()
        present = set(present)
        conn = self._conn
        if not self.full and not updated and self.committed is not None \
                and self.committed.get("index", {}).get("config") == asdict(self.index_config):
            old_files = {p for (p,) in conn.execute("SELECT path FROM files")}
            if old_files == present:  # nothing changed: keep the committed generation as it is
                counts = self.committed.get("counts", {})
                return CommitResult(generation=self.generation, files=int(counts.get("files", len(present))),
                                    chunks=int(counts.get("chunks", 0)), chunks_removed=0, files_removed=0,
                                    index_kind=self.committed["index"]["kind"], manifest=self.committed)
        new_generation = self.generation + 1
        faiss_path, ids_path = _generation_paths(self.index_dir, new_generation)
        # The switch must be durable before the old generation's files are deleted: sync this one commit
        # (batches stay at NORMAL), so even a power cut cannot leave the database naming deleted files.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            old_files = {p for (p,) in conn.execute("SELECT path FROM files")}
            if self.full:
                drop_files = old_files
            else:
                drop_files = (old_files - present) | {f.path for f in updated}
            new_hashes_by_path = {f.path: {c.content_hash for c in f.chunks} for f in updated}
            chunks_removed = 0
            for path in sorted(drop_files):
                keep = new_hashes_by_path.get(path, set())
                for (h,) in conn.execute("SELECT content_hash FROM chunks WHERE path=?", (path,)).fetchall():
                    chunks_removed += h not in keep
                conn.execute("DELETE FROM chunks WHERE path=?", (path,))
                conn.execute("DELETE FROM files WHERE path=?", (path,))
            for f in updated:
                conn.execute("INSERT INTO files(path, size, mtime_ns, n_chunks) VALUES (?, ?, ?, ?)",
                             (f.path, f.size, f.mtime_ns, len(f.chunks)))
                conn.executemany(
                    "INSERT INTO chunks(chunk_id, path, position, start, end, content_hash, text) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(c.chunk_id, c.path, c.position, c.start, c.end, c.content_hash, c.text) for c in f.chunks])
            ids, vectors = self._gather_vectors()
            index, kind = build_faiss_index(vectors, self.index_config)
            _atomic_write_faiss(to_cpu(index), faiss_path)
            atomic_save_npy(ids_path, ids)
            fsync_dir(self.index_dir)
            # vectors no chunk refers to any more (deleted or edited text, the previous epoch of a rebuild)
            conn.execute("DELETE FROM vectors WHERE epoch != ?", (self.epoch,))
            conn.execute("DELETE FROM vectors WHERE epoch = ? AND content_hash NOT IN "
                         "(SELECT content_hash FROM chunks)", (self.epoch,))
            n_files = conn.execute("SELECT COUNT(*) FROM files").fetchone()[0]
            manifest = self._manifest(new_generation, kind, n_files, len(ids))
            self._set("manifest", json.dumps(manifest, sort_keys=True))
            self._set("generation", new_generation)
            self._set("epoch", self.epoch)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            faiss_path.unlink(missing_ok=True)
            ids_path.unlink(missing_ok=True)
            raise
        finally:
            conn.execute("PRAGMA synchronous=NORMAL")
        old_gen = self.generation
        self.generation = new_generation
        self.committed = manifest
        for old in _generation_paths(self.index_dir, old_gen):
            old.unlink(missing_ok=True)
        atomic_write_bytes(self.index_dir / MANIFEST_NAME,
                           (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
        return CommitResult(generation=new_generation, files=n_files, chunks=len(ids), chunks_removed=chunks_removed,
                            files_removed=len(old_files - present), index_kind=kind,
                            seconds_build=time.perf_counter() - t0, manifest=manifest)

    def _gather_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        (n,) = self._conn.execute("SELECT COUNT(*) FROM chunks").fetchone()
        ids = np.empty(n, dtype=np.int64)
        vectors = np.empty((n, self.encoder.dim), dtype=np.float32)
        i = 0
        for row_id, blob in self._conn.execute(
                "SELECT c.id, v.vector FROM chunks c JOIN vectors v ON v.epoch=? AND v.content_hash=c.content_hash "
                "ORDER BY c.id", (self.epoch,)):
            ids[i] = row_id
            vectors[i] = np.frombuffer(blob, dtype=np.float32)  # (dim,)
            i += 1
        if i != n:
            raise StoreError(f"{self.index_dir}: {n - i} chunks have no vector; every chunk must be embedded "
                             "before commit")
        return ids, vectors

    def _manifest(self, generation: int, kind: str, n_files: int, n_chunks: int) -> dict:
        from . import __version__

        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        created = (self.committed or {}).get("created_at", now) if not self.rebuild else now
        (n_vectors,) = self._conn.execute("SELECT COUNT(*) FROM vectors WHERE epoch=?", (self.epoch,)).fetchone()
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
            "index": {"kind": kind, "config": asdict(self.index_config)},
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
            os.close(fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _acquire_lock(directory: Path) -> int:
    import fcntl

    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise
        try:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)
        raise StoreError(f"index {directory} is being written by another process (pid {holder}); "
                         "wait for it to finish") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def check_unlocked(index_dir: str | Path) -> None:
    """Raise the writer's :class:`StoreError` now if another process is writing ``index_dir`` (lets the
    CLI fail before spending a minute loading a model; the writer still takes the lock for real)."""
    directory = Path(index_dir).expanduser()
    if index_is_locked(directory):
        try:
            holder = (directory / LOCK_NAME).read_text().strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise StoreError(f"index {directory} is being written by another process (pid {holder}); "
                         "wait for it to finish")


def index_is_locked(index_dir: str | Path) -> bool:
    """True while some process holds the write lock of ``index_dir``."""
    import fcntl

    path = Path(index_dir) / LOCK_NAME
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def read_build_settings(index_dir: str | Path) -> dict | None:
    """How the index in ``index_dir`` was built (the committed manifest), else what an interrupted first
    run was started with (``encoder``, ``chunking``, ``index``; ``"committed": False``), else None (no
    index, or an unreadable one: the writer reports that properly)."""
    directory = Path(index_dir).expanduser()
    db = directory / DB_NAME
    if not db.is_file():
        return None
    try:
        conn = _connect(db)
        try:
            meta = _meta(conn)
        finally:
            conn.close()
    except sqlite3.DatabaseError:
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
        conn = _connect(db)
        try:
            return _committed(_meta(conn), db)[0]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise _corrupt(db, f"not a readable ragen index database ({exc})") from None


__all__ = ["Store", "StoreWriter", "IndexConfig", "EncoderInfo", "FileRecord", "CommitResult", "FORMAT_VERSION",
           "INDEX_KINDS", "build_faiss_index", "gpu_available", "normalize_rows", "read_manifest", "index_is_locked", "check_unlocked",
           "to_cpu", "to_gpu"]
