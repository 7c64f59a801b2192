"""Schema and migrations: the SQLite tables, connections (read-write for the writer, read-only for
readers), one-line database errors, and the validation of committed manifests (formats 1 and 2)."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote


from ..errors import StoreError
from .faiss_index import BUILT_KINDS, IndexConfig

logger = logging.getLogger(__name__)


FORMAT_VERSION = 2  # 1: one FAISS + id file per generation; 2: base + delta segments, tombstones


DB_NAME = "chunks.sqlite"


MANIFEST_NAME = "manifest.json"


LOCK_NAME = "write.lock"


READERS_LOCK_NAME = "readers.lock"


SCHEMA_VERSION = 3  # 1: no owned_files table (files named by convention); 2: owned files and digests;
# 3: files.sha256/read_ns (content hash and read time of each source file), staged_* (work of an unfinished
# run: extracted files with their chunks) and skipped_files (files whose bytes cannot be indexed)


@dataclass(frozen=True)
class EncoderInfo:
    """What the store records about the encoder that produced its vectors."""

    spec: str
    fingerprint: str
    dim: int
    query_instruction: str | None = None
    document_instruction: str | None = None
    base_model: str | None = None  # the backbone an LLM2Vec-Gen spec was loaded with (offline overrides)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, n_chunks INTEGER NOT NULL,
    sha256 TEXT, read_ns INTEGER
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
CREATE TABLE IF NOT EXISTS trained_index (epoch INTEGER PRIMARY KEY, kind TEXT NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS staged_files (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, n_chunks INTEGER NOT NULL,
    sha256 TEXT, read_ns INTEGER
);
CREATE TABLE IF NOT EXISTS staged_chunks (
    path TEXT NOT NULL, position INTEGER NOT NULL, chunk_id TEXT NOT NULL, start INTEGER NOT NULL,
    end INTEGER NOT NULL, content_hash TEXT NOT NULL, text TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS staged_chunks_path ON staged_chunks(path, position);
CREATE INDEX IF NOT EXISTS staged_chunks_hash ON staged_chunks(content_hash);
CREATE TABLE IF NOT EXISTS skipped_files (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT, read_ns INTEGER,
    reason TEXT NOT NULL
);
"""


_MIGRATIONS = (  # columns added since a table was first created: (table, column, declaration)
    ("files", "sha256", "TEXT"),
    ("files", "read_ns", "INTEGER"),
)


def _migrate(conn: sqlite3.Connection) -> None:
    """Add the columns newer versions record to an existing database (older ragen ignores them)."""
    for table, column, decl in _MIGRATIONS:
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if have and column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")


_TABLES = ("meta", "files", "chunks", "vectors")


_TEMP_GENERATION = -1  # owned_files rows of temporary files: never part of a generation


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
    if index.get("kind", "flat") not in BUILT_KINDS:
        raise _corrupt(where, f"the manifest's index kind is {index.get('kind')!r}, expected one of "
                              f"{', '.join(BUILT_KINDS)}")
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
    except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, a 5,000-digit number
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
        raise _corrupt(db, f"the committed generation is {str(meta.get('generation'))[:40]!r}, expected an "
                           "integer") from None
    if not 0 <= generation < 2**62:
        raise _corrupt(db, f"the committed generation is {str(generation)[:40]}, expected a non-negative integer")
    return generation


def _committed(meta: dict[str, str], db: Path) -> tuple[dict, int]:
    if "generation" not in meta or "manifest" not in meta:
        raise StoreError(f"{db.parent}: the index is incomplete (its first `ragen index` run did not finish); "
                         "run `ragen index` again to resume")
    try:
        manifest = json.loads(meta["manifest"])
    except (ValueError, RecursionError) as exc:
        raise _corrupt(db, f"committed manifest is unreadable ({str(exc)[:120]})") from None
    return _validate_manifest(manifest, db), _parse_generation(meta, db)


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

