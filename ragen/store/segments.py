"""Segment files: the files the store owns (names recorded before they exist, digests), writing them
atomically, the readers' lock, the live segment list and tombstones, loading a segment."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import StoreError
from .schema import (DB_NAME, LOCK_NAME, MANIFEST_NAME, READERS_LOCK_NAME, _connect_reader, _corrupt,
                     _tables)

logger = logging.getLogger(__name__)


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
    from . import locks

    try:
        fd = os.open(directory / READERS_LOCK_NAME, os.O_RDONLY if locks.HAVE_FLOCK else os.O_RDWR)
    except OSError:
        yield
        return
    try:
        try:
            locks.lock_shared(fd)  # the writer holds it exclusively only while unlinking files
        except OSError as exc:
            logger.debug("%s: reading unlocked (%s)", directory / READERS_LOCK_NAME, exc)
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
    except (ValueError, RecursionError):
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

