"""The on-disk index: FAISS vectors, chunk metadata in SQLite, a JSON manifest. Vectors and ids only.

Layout of an index directory (format 2)::

    chunks.sqlite           chunk text/path/offsets/hash, file sizes and mtimes, the vectors (float32
                            BLOBs, by content hash), the committed state (generation, manifest, the live
                            segment list), tombstones (deleted row ids), the IVF quantizer, and the
                            ``owned_files`` table: every file of the folder the store created, with its
                            size and digests
    seg-<G>-base.faiss      the base segment: every chunk at the last compaction (written at generation G)
    seg-<G>-delta.faiss     a delta segment: the chunks added by the commit of generation G (id-mapped flat)
    manifest.json           a human-readable copy of the committed manifest
    write.lock              ``flock``-ed (exclusive) by the one process allowed to write
    readers.lock            ``flock``-ed shared by readers while they load a generation

Every FAISS segment returns chunk row ids itself; row ids are never reused. A search runs over every live
segment with its tombstoned ids filtered inside faiss, and merges the best ``k``. Format 1 (one
``vectors-<G>.faiss`` + ``vectors-<G>.ids.npy`` per generation) still opens; its next write upgrades it.

Commits. A first run, ``--rebuild`` or new chunking writes a base segment from all vectors (read in bulk).
Otherwise a commit costs the change: the removed rows become tombstones, the added rows one small delta
segment. Past ``MAX_DELTAS`` deltas they are merged into one; once deltas + tombstones pass
``COMPACT_RATIO`` of the base, the base is rebuilt (IVF keeps its trained quantizer: no k-means again).

Crash safety. Embedded vectors are committed batch by batch, so a killed run loses at most the batch in
flight and the next run embeds only what is missing (matched by content hash). A commit then

1. records the names of the files it is about to create in ``owned_files`` (its own committed
   transaction), so that a killed run's leftovers are known to be the store's and nothing else is;
2. writes its new segment (temp name + fsync + rename) and records its digests;
3. switches in one SQLite transaction that replaces the changed chunk rows, the tombstones and the live
   segment list and bumps the generation: that commit is the atomic switch (synced, even at NORMAL);
4. deletes files no live segment list names, but only while holding ``readers.lock`` exclusively, so a
   reader that already chose a generation always finds its files; when readers keep the lock busy the
   deletion waits for a later commit.

``kill -9`` at any step leaves the previous generation loadable, and the next run deletes the leftovers
and resumes. The store never deletes a file that ``owned_files`` does not name (and only names it could
have created), and refuses to write into a folder that is neither empty nor a ragen index. Readers check
each segment against its recorded size and sampled digest (``Store.verify`` checks the full SHA-256), so a
swapped file is reported rather than searched. SQLite runs in WAL mode: readers see the last committed
state while a writer works; a reader that cannot write the folder opens the database read-only.

The store never imports an encoder: it records the encoder's spec/fingerprint/dim as given and refuses
vectors of another width. Vectors are L2-normalised on the way in and queries on the way to search, so
inner product is cosine similarity.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np

from ._io import fsync_dir
from .errors import StoreError
from .types import Chunk, Hit

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 1: one FAISS + id file per generation; 2: base + delta segments, tombstones
DB_NAME = "chunks.sqlite"
MANIFEST_NAME = "manifest.json"
LOCK_NAME = "write.lock"
READERS_LOCK_NAME = "readers.lock"
SCHEMA_VERSION = 2  # 1: no owned_files table (files named by convention); 2: owned files and digests
COMPACT_RATIO = 0.25  # rebuild the base once deltas + deleted rows exceed this fraction of it
MAX_DELTAS = 8  # merge the delta segments into one past this many
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
        if not isinstance(self.kind, str) or self.kind not in INDEX_KINDS:
            raise StoreError(f"unknown index type {self.kind!r}; expected one of: {', '.join(INDEX_KINDS)}")
        for name in ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ivf_nprobe", "ivf_nlist"):
            value = getattr(self, name)
            if value is None and name == "ivf_nlist":
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise StoreError(f"{name} must be an integer, got {value!r}")
        for name in ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ivf_nprobe"):
            if getattr(self, name) < 1:
                raise StoreError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ivf_nlist is not None and self.ivf_nlist < 1:
            raise StoreError(f"ivf_nlist must be >= 1, got {self.ivf_nlist}")

    @classmethod
    def from_dict(cls, data: dict) -> IndexConfig:
        if not isinstance(data, dict):
            raise StoreError(f"index settings must be a JSON object, got {type(data).__name__}")
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
# small helpers: GPU, normalisation, index construction
# ----------------------------------------------------------------------------------------------------------
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


def _to_device(seg, gpu: int):
    """``(GPU index, position -> row id array or None)`` for a loaded segment. faiss moves id-mapped
    wrappers to the GPU unevenly across versions, so the inner index goes and the ids are mapped here."""
    import faiss

    inner = faiss.downcast_index(seg.index)
    if isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return to_gpu(faiss.downcast_index(inner.index), gpu), faiss.vector_to_array(inner.id_map).astype(np.int64)
    return to_gpu(seg.index, gpu), seg.ids


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


def build_faiss_index(vectors: np.ndarray, config: IndexConfig, *, seed: int = 0, ids: np.ndarray | None = None,
                      centroids: np.ndarray | None = None):
    """A CPU FAISS index over (already normalised) ``vectors`` for inner-product search; returns
    ``(index, kind)`` where ``kind`` is what was actually built (IVF falls back to flat on tiny sets).
    With ``ids`` the index returns those ids instead of positions (IVF natively, others id-mapped).
    ``centroids``: an IVF quantizer trained before (kept across compactions: no k-means again)."""
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
    elif centroids is not None and len(centroids) >= 2 and n >= 39 * len(centroids):
        quantizer = faiss.IndexFlatIP(dim)
        quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
        index = faiss.IndexIVFFlat(quantizer, dim, len(centroids), faiss.METRIC_INNER_PRODUCT)
        index.nprobe = min(config.ivf_nprobe, len(centroids))
    else:
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = vectors
        if n > 256 * nlist:  # faiss would subsample anyway; doing it here keeps it deterministic and quiet
            rng = np.random.default_rng(seed)
            sample = vectors[np.sort(rng.choice(n, 256 * nlist, replace=False))]
        index.train(sample)  # faiss's Python wrapper keeps `quantizer` referenced by `index`
        index.nprobe = min(config.ivf_nprobe, nlist)
    if ids is not None and kind != "ivf":
        index = faiss.IndexIDMap2(index)
    if n:
        if ids is not None:
            index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
        else:
            index.add(vectors)
    return index, kind


def _apply_search_params(index, config: IndexConfig) -> None:
    import faiss

    inner = faiss.downcast_index(index)
    if isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        inner = faiss.downcast_index(inner.index)
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
CREATE INDEX IF NOT EXISTS chunks_hash ON chunks(content_hash);
CREATE TABLE IF NOT EXISTS vectors (
    epoch INTEGER NOT NULL, content_hash TEXT NOT NULL, vector BLOB NOT NULL,
    PRIMARY KEY (epoch, content_hash)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS owned_files (
    name TEXT PRIMARY KEY, generation INTEGER NOT NULL, size INTEGER, sha256 TEXT, sample TEXT
);
CREATE TABLE IF NOT EXISTS tombstones (row_id INTEGER PRIMARY KEY, segment TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ivf_quantizer (
    epoch INTEGER PRIMARY KEY, nlist INTEGER NOT NULL, dim INTEGER NOT NULL, centroids BLOB NOT NULL
);
"""
_TABLES = ("meta", "files", "chunks", "vectors")
_TEMP_GENERATION = -1  # owned_files rows of temporary files: never part of a generation

# sqlite3 primary result codes (``exc.sqlite_errorcode & 0xff``)
_SQLITE_PERM, _SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_READONLY, _SQLITE_IOERR = 3, 5, 6, 8, 10
_SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 11, 13, 14, 26


def _connect(db: Path) -> sqlite3.Connection:
    """A read-write connection (the writer's)."""
    # isolation_level=None: transactions are explicit (BEGIN ... COMMIT), so each is exactly what we say.
    conn = sqlite3.connect(str(db), isolation_level=None, timeout=30.0, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a commit survives a killed process; a power cut may lose the last commits but
    # never corrupts the database. Syncing the WAL on every batch would cost more than the embedding.
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _connect_reader(db: Path) -> sqlite3.Connection:
    """A read-only connection: readers never need to write the folder. Where the folder is not writable
    and no writer is active (no ``-wal``/``-shm`` to share), SQLite cannot set up WAL reading, so the
    database is opened as immutable: nobody can be changing a database in a folder nobody may write."""
    uri = f"file:{quote(str(db.resolve()))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30.0, check_same_thread=False)
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError as exc:
        conn.close()
        if _code(exc) not in (_SQLITE_CANTOPEN, _SQLITE_READONLY, _SQLITE_PERM) or os.access(db.parent, os.W_OK):
            raise
    conn = sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None, check_same_thread=False)
    conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    return conn


def _code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _corrupt(path: Path, what: str) -> StoreError:
    return StoreError(f"{path}: {what}; rebuild the index with `ragen index PATH --index {path.parent} --rebuild`")


def _db_error(db: Path, exc: sqlite3.Error, *, writing: bool) -> StoreError:
    """One line for a database failure; rebuild advice only where the file itself is damaged."""
    code = _code(exc)
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    tail = "; the previous index is unchanged" if writing else ""
    if code == _SQLITE_FULL or "disk is full" in text:
        return StoreError(f"{db}: the disk is full ({text}); free some space and run again{tail}")
    if code == _SQLITE_IOERR or "disk I/O error" in text:
        return StoreError(f"{db}: I/O error ({text}); check the disk{tail}")
    if code in (_SQLITE_READONLY, _SQLITE_PERM, _SQLITE_CANTOPEN) or "readonly" in text:
        return StoreError(f"{db}: cannot {'write' if writing else 'open'} the database ({text}); check the "
                          f"permissions of {db.parent}{tail}")
    if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return StoreError(f"{db}: the database is busy ({text}); try again{tail}")
    if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or "no such table" in text or "malformed" in text \
            or "not a database" in text:
        return _corrupt(db, f"not a readable ragen index database ({text})")
    return StoreError(f"{db}: {text}{tail}")


def _meta(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT key, value FROM meta").fetchall())


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


# ----------------------------------------------------------------------------------------------------------
# files the store owns: names, digests, the readers' lock
# ----------------------------------------------------------------------------------------------------------
_SAMPLE_BLOCK = 4096
_SAMPLES = 16


def _sample_digest(path: Path) -> tuple[int, str]:
    """``(size, digest)``: SHA-256 of the size and 16 evenly spaced 4 KiB blocks (first and last
    included); enough to tell a file from another index's file of the same shape, read in microseconds."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h = hashlib.sha256(str(size).encode())
        last = max(size - _SAMPLE_BLOCK, 0)
        for off in sorted({(i * last) // (_SAMPLES - 1) for i in range(_SAMPLES)}):
            h.update(os.pread(f.fileno(), _SAMPLE_BLOCK, off))
    return size, h.hexdigest()


def _full_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class _Digest:
    name: str
    size: int | None
    sha256: str | None
    sample: str | None


def _digests(conn: sqlite3.Connection, names: list[str]) -> dict[str, _Digest]:
    if "owned_files" not in _tables(conn) or not names:
        return {}  # an index written before digests were recorded
    marks = ",".join("?" * len(names))
    return {n: _Digest(n, s, h, p) for n, s, h, p in conn.execute(
        f"SELECT name, size, sha256, sample FROM owned_files WHERE name IN ({marks})", names)}


@contextmanager
def _readers_lock(directory: Path) -> Iterator[None]:
    """Hold ``readers.lock`` shared while a generation is chosen and loaded: the writer deletes retired
    generations only under the exclusive lock, so the files a reader chose stay there until it has them.
    An index without the lock file (older ragen) or a filesystem without ``flock`` reads unlocked: the
    reader then retries when the generation it chose disappears."""
    import fcntl

    try:
        fd = os.open(directory / READERS_LOCK_NAME, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # the writer holds it exclusively only while unlinking files
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _write_owned(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``.<name>.tmp`` (a name recorded in ``owned_files`` beforehand): fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _write_faiss_file(index, path: Path) -> None:
    import faiss

    def write(tmp: Path) -> None:
        try:
            faiss.write_index(index, str(tmp))
        except RuntimeError as exc:  # faiss reports I/O failures (disk full) as RuntimeError
            raise StoreError(f"{path}: cannot write the FAISS index ({str(exc).splitlines()[0][:160]}); "
                             "the previous index is unchanged") from None

    _write_owned(path, write)


def _write_npy_file(array: np.ndarray, path: Path) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array), allow_pickle=False)

    _write_owned(path, write)


def _check_index_folder(directory: Path) -> None:
    """Refuse an ``--index`` folder that is neither empty (or new) nor a ragen index: the writer creates
    and deletes files there, and a user's folder is not its to touch."""
    if not directory.exists():
        return
    if not directory.is_dir():
        raise StoreError(f"{directory}: exists and is not a directory; pass another --index")
    db = directory / DB_NAME
    try:
        names = sorted(p.name for p in directory.iterdir())
    except OSError as exc:
        raise StoreError(f"{directory}: cannot list the index folder ({exc.strerror})") from None
    if DB_NAME not in names:
        foreign = [n for n in names if n not in (LOCK_NAME, READERS_LOCK_NAME)]
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise StoreError(f"{directory}: not empty and not a ragen index (no {DB_NAME}; it holds {shown}); "
                             "pass a new or empty folder as --index")
        return
    if not db.is_file():
        raise StoreError(f"{db}: is not a file; pass a new or empty folder as --index")
    try:
        conn = _connect_reader(db)
        try:
            tables = _tables(conn)
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        if not (directory / MANIFEST_NAME).exists():
            raise StoreError(f"{db}: not a readable database and no {MANIFEST_NAME} beside it, so not a ragen "
                             "index; pass a new or empty folder as --index") from None
        return  # a damaged index: the writer reports it (and --rebuild replaces the database)
    if tables and "meta" not in tables:
        raise StoreError(f"{db}: an SQLite database that is not a ragen index; pass a new or empty folder "
                         "as --index")


# ----------------------------------------------------------------------------------------------------------
# manifests
# ----------------------------------------------------------------------------------------------------------
def _check_format_version(value: object, where: Path) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _corrupt(where, f"manifest format_version is {value!r}, expected an integer")
    if value > FORMAT_VERSION:
        raise StoreError(f"{where}: index format {value} is newer than this ragen understands ({FORMAT_VERSION}); "
                         "upgrade ragen")
    return value


def _validate_manifest(manifest: object, where: Path) -> dict:
    """The committed manifest, checked field by field: every value the store and the CLI read has the
    type they expect, or one line names the file."""
    if not isinstance(manifest, dict):
        raise _corrupt(where, f"the committed manifest is a JSON {type(manifest).__name__}, expected an object")
    _check_format_version(manifest.get("format_version"), where)
    enc = manifest.get("encoder")
    if not isinstance(enc, dict):
        raise _corrupt(where, "the committed manifest has no encoder object")
    for key in ("spec", "fingerprint"):
        if not isinstance(enc.get(key), str):
            raise _corrupt(where, f"the manifest's encoder.{key} is {enc.get(key)!r}, expected a string")
    dim = enc.get("dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise _corrupt(where, f"the manifest's encoder.dim is {dim!r}, expected a positive integer")
    for key in ("query_instruction", "document_instruction", "base_model"):
        if enc.get(key) is not None and not isinstance(enc.get(key), str):
            raise _corrupt(where, f"the manifest's encoder.{key} is {enc.get(key)!r}, expected a string or null")
    for key in ("index", "counts", "chunking"):
        if not isinstance(manifest.get(key, {}), dict):
            raise _corrupt(where, f"the manifest's {key} is {manifest.get(key)!r}, expected an object")
    index = manifest.get("index", {})
    if index.get("kind", "flat") not in INDEX_KINDS:
        raise _corrupt(where, f"the manifest's index kind is {index.get('kind')!r}, expected one of "
                              f"{', '.join(INDEX_KINDS)}")
    try:
        IndexConfig.from_dict(index.get("config", {}))
    except (StoreError, TypeError) as exc:
        raise _corrupt(where, f"the manifest's index settings are invalid ({exc})") from None
    for key, value in manifest.get("counts", {}).items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _corrupt(where, f"the manifest's counts.{key} is {value!r}, expected a count")
    return manifest


def _check_manifest_file(path: Path) -> None:
    if not path.exists():
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise _corrupt(path, f"not valid JSON ({str(exc)[:120]})") from None
    except OSError as exc:
        raise StoreError(f"{path}: cannot read ({exc.strerror})") from None
    if not isinstance(data, dict) or "format_version" not in data:
        raise _corrupt(path, "not a ragen manifest (no format_version)")
    _check_format_version(data["format_version"], path)


def _parse_generation(meta: dict[str, str], db: Path) -> int:
    try:
        generation = int(meta["generation"])
    except (ValueError, KeyError):
        raise _corrupt(db, f"the committed generation is {meta.get('generation')!r}, expected an integer") from None
    if generation < 0:
        raise _corrupt(db, f"the committed generation is {generation}, expected >= 0")
    return generation


def _committed(meta: dict[str, str], db: Path) -> tuple[dict, int]:
    if "generation" not in meta or "manifest" not in meta:
        raise StoreError(f"{db.parent}: the index is incomplete (its first `ragen index` run did not finish); "
                         "run `ragen index` again to resume")
    try:
        manifest = json.loads(meta["manifest"])
    except (json.JSONDecodeError, RecursionError) as exc:
        raise _corrupt(db, f"committed manifest is unreadable ({str(exc)[:120]})") from None
    return _validate_manifest(manifest, db), _parse_generation(meta, db)


def _generation_paths(directory: Path, generation: int) -> tuple[Path, Path]:
    return directory / f"vectors-{generation}.faiss", directory / f"vectors-{generation}.ids.npy"


def _check_digest(path: Path, digest: _Digest | None) -> None:
    if digest is None or digest.size is None or digest.sample is None:
        return  # recorded by an older ragen, or claimed from one: nothing to compare with
    size, sample = _sample_digest(path)
    if size != digest.size:
        raise _corrupt(path, f"is {size} bytes, but {digest.size} were recorded for it (replaced or truncated)")
    if sample != digest.sample:
        raise _corrupt(path, "does not match the digest recorded for it (replaced or damaged)")


_OWNED_NAME = re.compile(r"^\.?(vectors-\d+\.(faiss|ids\.npy)|seg-\d+-(base|delta)\.faiss|manifest\.json)(\.tmp)?$")
_SEGMENT_NAME = re.compile(r"^seg-\d+-(base|delta)\.faiss$")


@dataclass(frozen=True)
class _SegmentSpec:
    """One FAISS file of the live index. ``base``: every row id up to ``hi`` at its last compaction;
    ``delta``: the rows ``lo..hi`` added since; ``legacy``: a layout-1 generation (positions mapped to row
    ids by ``ids_name``)."""

    name: str
    kind: str
    n: int
    lo: int
    hi: int
    ids_name: str | None = None

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "n": self.n, "lo": self.lo, "hi": self.hi}


def _live_segments(meta: dict[str, str], generation: int, db: Path) -> list[_SegmentSpec]:
    raw = meta.get("segments")
    if raw is None:  # layout 1: one FAISS file and one id file per generation
        faiss_path, ids_path = _generation_paths(db.parent, generation)
        return [_SegmentSpec(faiss_path.name, "legacy", -1, 0, 0, ids_path.name)]
    try:
        items = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise _corrupt(db, "the committed segment list is not valid JSON") from None
    if not isinstance(items, list):
        raise _corrupt(db, f"the committed segment list is a JSON {type(items).__name__}, expected a list")
    specs = []
    for item in items:
        ok = isinstance(item, dict) and isinstance(item.get("name"), str) and _SEGMENT_NAME.match(item["name"]) \
            and item.get("kind") in ("base", "delta") and all(
                isinstance(item.get(k), int) and not isinstance(item.get(k), bool) and item[k] >= 0 for k in ("n", "lo", "hi"))
        if not ok:
            raise _corrupt(db, f"the committed segment list holds {str(item)[:80]!r}, expected a segment record")
        specs.append(_SegmentSpec(item["name"], item["kind"], item["n"], item["lo"], item["hi"]))
    return specs


def _tombstones(conn: sqlite3.Connection) -> dict[str, np.ndarray]:
    """Row ids deleted since their segment was written, by segment (filtered out at search time)."""
    if "tombstones" not in _tables(conn):
        return {}
    by_segment: dict[str, list[int]] = {}
    for row_id, segment in conn.execute("SELECT row_id, segment FROM tombstones"):
        by_segment.setdefault(segment, []).append(row_id)
    return {s: np.asarray(sorted(ids), dtype=np.int64) for s, ids in by_segment.items()}


def _load_segment(directory: Path, spec: _SegmentSpec, digests: dict[str, _Digest], dim: int):
    """``(cpu index, position -> row id array or None)``; the index returns row ids itself unless legacy."""
    import faiss

    path = directory / spec.name
    paths = [path] + ([directory / spec.ids_name] if spec.ids_name else [])
    for p in paths:
        if not p.exists():
            raise _corrupt(p, "missing")
        _check_digest(p, digests.get(p.name))
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise _corrupt(path, f"not a readable FAISS index ({str(exc).splitlines()[0][:120]})") from None
    ids = None
    if spec.ids_name:
        ids_path = directory / spec.ids_name
        try:
            ids = np.load(ids_path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise _corrupt(ids_path, f"not a readable id array ({exc})") from None
        if ids.ndim != 1 or ids.dtype != np.int64 or len(ids) != index.ntotal:
            raise _corrupt(path, f"does not match its id file (ntotal {index.ntotal}, {len(ids)} ids)")
    elif index.ntotal != spec.n:
        raise _corrupt(path, f"holds {index.ntotal} vectors, but {spec.n} were recorded for it")
    if index.d != dim:
        raise _corrupt(path, f"has dimension {index.d}, but the manifest says {dim}")
    return index, ids


def _search_params(index, config: IndexConfig, removed: np.ndarray | None):
    """faiss search parameters that skip ``removed`` row ids (None when nothing is removed)."""
    import faiss

    if removed is None or not len(removed):
        return None
    selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(removed))
    inner = faiss.downcast_index(index)
    if isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexIVF):
        params = faiss.SearchParametersIVF(sel=selector, nprobe=min(config.ivf_nprobe, inner.nlist))
    elif isinstance(inner, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=config.hnsw_ef_search)
    else:
        params = faiss.SearchParameters(sel=selector)
    params._ragen_refs = (selector, removed)  # the C++ objects must outlive the parameters
    return params


@dataclass
class _Loaded:
    spec: _SegmentSpec
    index: object  # CPU
    ids: np.ndarray | None
    params: object | None = None
    device_index: object | None = None  # a GPU copy (id-mapped indexes: the inner index, see device_ids)
    device_ids: np.ndarray | None = None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)


def _current_generation(db: Path) -> int | None:
    try:
        conn = _connect_reader(db)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        finally:
            conn.close()
        return None if row is None else int(row[0])
    except (sqlite3.Error, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------
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
            if gpu is not None and s.device_index is None:
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
                return cls(directory, conn, manifest, generation, segments, gpu, digests)
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
            if seg.params is not None:  # skip deleted rows inside faiss (CPU)
                scores, pos = seg.index.search(q, kk, params=seg.params)
                mapping = seg.ids
            else:
                on_device = seg.device_index is not None and kk <= GPU_MAX_K
                scores, pos = (seg.device_index if on_device else seg.index).search(q, kk)  # (n, kk) each
                mapping = seg.device_ids if on_device else seg.ids
            if mapping is not None:
                pos = np.where(pos >= 0, mapping[np.clip(pos, 0, None)], -1)
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
        fresh = Store.open(self.index_dir, device="cpu" if self._gpu is None else f"cuda:{self._gpu}",
                           _loaded={s.spec.name: s for s in self._segments})
        self._conn.close()
        self.__dict__.update(fresh.__dict__)

    # --- inspection ---------------------------------------------------------------------------------------
    def files(self) -> list[tuple[str, int, int, int]]:
        """``(path, size, mtime_ns, n_chunks)`` of every indexed file, by path."""
        try:
            return self._conn.execute("SELECT path, size, mtime_ns, n_chunks FROM files ORDER BY path").fetchall()
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
        except sqlite3.Error as exc:
            raise _db_error(self.index_dir / DB_NAME, exc, writing=True) from None

    return wrapper


class StoreWriter:
    """Exclusive writer of one index directory (``flock`` on ``write.lock``).

    Use as a context manager. Typical run: :meth:`needs_reading` / :meth:`missing_vectors` to plan,
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
        committed_epoch = _int_or(meta.get("epoch"), 0)
        self.segments: list[_SegmentSpec] | None = None  # None: layout 1 (or nothing committed)
        if self.committed is not None and meta.get("segments") is not None:
            self.segments = _live_segments(meta, self.generation, db)
        (max_id,) = self._conn.execute("SELECT MAX(id) FROM chunks").fetchone()
        self.next_row_id = max(_int_or(meta.get("next_row_id"), 1), int(max_id or 0) + 1)
        if self.committed is not None and not self.rebuild:
            old = self.committed["encoder"]
            if old["fingerprint"] != self.encoder.fingerprint or int(old["dim"]) != self.encoder.dim:
                raise StoreError(
                    f"{self.index_dir}: built with encoder {old['spec']} (dim {old['dim']}, fingerprint "
                    f"{old['fingerprint']}), not {self.encoder.spec} (dim {self.encoder.dim}, fingerprint "
                    f"{self.encoder.fingerprint}); pass --model {old['spec']} or --rebuild")
            self.epoch = committed_epoch
        else:
            work_epoch = _int_or(meta.get("work_epoch"), 0)
            # A killed run (a --rebuild or a model switch included) left vectors in its epoch: the next run
            # with the same encoder continues it instead of embedding everything again.
            resumable = work_epoch > committed_epoch and meta.get("work_fingerprint") == self.encoder.fingerprint
            self.epoch = work_epoch if resumable else max(committed_epoch, work_epoch) + 1
        # a full pass (first run, rebuild, new chunking) re-reads every file; vectors are still reused by
        # content hash whenever they are in this run's epoch
        self.full = (self.committed is None or self.rebuild
                     or self.committed.get("chunking") != self.chunking)
        with self._transaction():
            self._conn.execute("DELETE FROM vectors WHERE epoch NOT IN (?, ?)", (committed_epoch, self.epoch))
            self._set("work_epoch", self.epoch)
            self._set("work_fingerprint", self.encoder.fingerprint)
            self._set("schema_version", SCHEMA_VERSION)
            if self.committed is not None:
                self._claim_legacy_generation()
        self._collect_garbage()  # leftovers of killed runs: temp files, unused generations

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

    def _collect_garbage(self, wait_s: float = 0.5) -> None:
        """Delete owned files that belong to no live generation, under the exclusive readers' lock; when
        readers hold it past ``wait_s`` the files stay for a later run (they are still recorded)."""
        import fcntl

        live = self._live_names()
        rows = [(n,) for (n,) in self._conn.execute("SELECT name FROM owned_files") if n not in live]
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
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                        logger.info("readers are loading the index; %d retired files stay until the next run",
                                    len(rows))
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

        An incremental commit writes only the changed rows' vectors (a delta segment) and marks the removed
        rows deleted (tombstones); past ``COMPACT_RATIO`` of the base it rebuilds the base instead. Once
        the switch is committed this returns normally: clean-up afterwards (the manifest copy, retired
        files) only logs its failures, since the new index is in place either way.
        """
        t0 = time.perf_counter()
        present = set(present)
        conn = self._conn
        config_same = self.committed is not None and \
            self.committed.get("index", {}).get("config") == asdict(self.index_config)
        if not self.full and not updated and config_same:
            old_files = {p for (p,) in conn.execute("SELECT path FROM files")}
            if old_files == present:  # nothing changed: keep the committed generation as it is
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
            chunks_removed, removed_rows, inserted = self._replace_rows(updated, present, old_files)
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
            ids, vectors = self._gather_vectors()
            index, kind = build_faiss_index(vectors, self.index_config, ids=ids, centroids=self._trained_centroids())
            del vectors
            self._keep_centroids(index)
            _write_faiss_file(to_cpu(index), base_path)
            written.append(base_path)
            lo, hi = (int(ids.min()), int(ids.max())) if len(ids) else (0, 0)
            return [_SegmentSpec(base_path.name, "base", len(ids), lo, hi)], kind
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

            delta = faiss.IndexIDMap2(faiss.IndexFlatIP(self.encoder.dim))
            delta.add_with_ids(new_vectors, new_ids)
            _write_faiss_file(delta, delta_path)
            written.append(delta_path)
            out.append(_SegmentSpec(delta_path.name, "delta", len(new_ids), int(new_ids.min()), int(new_ids.max())))
        return out, kind

    def _trained_centroids(self) -> np.ndarray | None:
        """The IVF quantizer of this epoch's vectors, when one was trained and the settings still ask for
        its number of lists (a compaction reuses it instead of running k-means again)."""
        if self.index_config.kind != "ivf" or self.rebuild:
            return None
        row = self._conn.execute("SELECT nlist, dim, centroids FROM ivf_quantizer WHERE epoch=?",
                                 (self.epoch,)).fetchone()
        if row is None or row[1] != self.encoder.dim or len(row[2]) != 4 * row[0] * row[1] or (
                self.index_config.ivf_nlist is not None and self.index_config.ivf_nlist != row[0]):
            return None
        return np.frombuffer(row[2], dtype=np.float32).reshape(row[0], row[1])

    def _keep_centroids(self, index) -> None:
        import faiss

        inner = faiss.downcast_index(index)
        self._conn.execute("DELETE FROM ivf_quantizer WHERE epoch != ?", (self.epoch,))
        if isinstance(inner, faiss.IndexIVF):
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

    def _replace_rows(self, updated: Sequence[FileRecord], present: set[str],
                      old_files: set[str]) -> tuple[int, list[int], list[tuple[int, str]]]:
        """Inside the commit's transaction: drop the rows of changed and deleted files (all rows on a full
        pass), insert the updated files' rows under new row ids (never reused), drop vectors no chunk refers
        to. Returns the number of chunks removed (an old chunk whose text is gone from its file), the
        removed row ids and the inserted ``(row id, content hash)`` rows."""
        conn = self._conn
        new_hashes_by_path = {f.path: {c.content_hash for c in f.chunks} for f in updated}
        chunks_removed = 0
        removed_rows: list[int] = []
        removed_hashes: set[str] = set()
        if self.full:
            for path, h in conn.execute("SELECT path, content_hash FROM chunks"):
                chunks_removed += h not in new_hashes_by_path.get(path, ())
            conn.execute("DELETE FROM chunks")
            conn.execute("DELETE FROM files")
        else:
            for path in sorted((old_files - present) | set(new_hashes_by_path)):
                keep = new_hashes_by_path.get(path, set())
                for row_id, h in conn.execute("SELECT id, content_hash FROM chunks WHERE path=?", (path,)).fetchall():
                    chunks_removed += h not in keep
                    removed_rows.append(row_id)
                    removed_hashes.add(h)
                conn.execute("DELETE FROM chunks WHERE path=?", (path,))
                conn.execute("DELETE FROM files WHERE path=?", (path,))
        inserted: list[tuple[int, str]] = []
        for f in updated:
            conn.execute("INSERT INTO files(path, size, mtime_ns, n_chunks) VALUES (?, ?, ?, ?)",
                         (f.path, f.size, f.mtime_ns, len(f.chunks)))
            rows = []
            for c in f.chunks:
                rows.append((self.next_row_id, c.chunk_id, c.path, c.position, c.start, c.end, c.content_hash, c.text))
                inserted.append((self.next_row_id, c.content_hash))
                self.next_row_id += 1
            conn.executemany("INSERT INTO chunks(id, chunk_id, path, position, start, end, content_hash, text) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        # vectors no chunk refers to any more (deleted or edited text, the previous epoch of a rebuild)
        conn.execute("DELETE FROM vectors WHERE epoch != ?", (self.epoch,))
        if self.full:
            conn.execute("DELETE FROM vectors WHERE epoch = ? AND content_hash NOT IN "
                         "(SELECT content_hash FROM chunks)", (self.epoch,))
        else:  # only the texts this commit removed can have lost their last chunk: cost follows the change
            conn.executemany("DELETE FROM vectors WHERE epoch = ? AND content_hash = ? AND NOT EXISTS "
                             "(SELECT 1 FROM chunks WHERE content_hash = ?)",
                             [(self.epoch, h, h) for h in sorted(removed_hashes)])
        return chunks_removed, removed_rows, inserted

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

    def _gather_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """``(row ids, vectors)`` of every chunk, read in bulk: one scan of the chunk rows and one of the
        epoch's vectors (in key order), never one lookup per row. FAISS position ``i`` holds the vector of
        chunk row ``ids[i]``."""
        conn = self._conn
        row_ids: list[int] = []
        hashes: list[str] = []
        for row_id, h in conn.execute("SELECT id, content_hash FROM chunks"):
            row_ids.append(row_id)
            hashes.append(h)
        n = len(row_ids)
        dim = self.encoder.dim
        slot: dict[str, int] = {}
        for h in hashes:
            slot.setdefault(h, len(slot))
        unique = np.empty((len(slot), dim), dtype=np.float32)
        filled = np.zeros(len(slot), dtype=bool)
        width = 4 * dim
        cursor = conn.execute("SELECT content_hash, vector FROM vectors WHERE epoch=?", (self.epoch,))
        while batch := cursor.fetchmany(4096):
            rows = [(slot[h], blob) for h, blob in batch if h in slot and len(blob) == width]
            if rows:  # one copy per batch of rows, not one numpy call per row
                where = np.fromiter((i for i, _ in rows), dtype=np.int64, count=len(rows))
                unique[where] = np.frombuffer(b"".join(blob for _, blob in rows), dtype=np.float32).reshape(-1, dim)
                filled[where] = True
        if not filled.all():
            raise StoreError(f"{self.index_dir}: {int((~filled).sum())} chunks have no vector; every chunk must be "
                             "embedded before commit")
        ids = np.asarray(row_ids, dtype=np.int64)
        src = np.fromiter((slot[h] for h in hashes), dtype=np.int64, count=n)
        if len(slot) == n:  # every chunk has its own text: order the ids by vector instead of copying vectors
            order = np.empty(n, dtype=np.int64)
            order[src] = np.arange(n, dtype=np.int64)
            return ids[order], unique
        return ids, unique[src]

    def _manifest(self, generation: int, kind: str, n_files: int, n_chunks: int, n_segments: int = 1,
                  n_deleted: int = 0) -> dict:
        from . import __version__

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
                      "deleted_rows": n_deleted},
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
    import fcntl

    path = directory / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(f"{path}: cannot open the write lock ({exc.strerror}); writing an index needs write "
                         f"access to {directory}") from None
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
    """Raise the writer's :class:`StoreError` now if another process is writing ``index_dir``, or if it is
    a folder the writer would refuse (neither empty nor an index); lets the CLI fail before spending a
    minute loading a model (the writer still checks and takes the lock for real)."""
    directory = Path(index_dir).expanduser()
    _check_index_folder(directory)
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

    path = Path(index_dir).expanduser() / LOCK_NAME
    if not path.exists():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


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


__all__ = ["Store", "StoreWriter", "IndexConfig", "EncoderInfo", "FileRecord", "CommitResult", "FORMAT_VERSION",
           "INDEX_KINDS", "build_faiss_index", "gpu_available", "normalize_rows", "read_manifest", "index_is_locked", "check_unlocked",
           "to_cpu", "to_gpu"]
