"""Read-write access to a ragen index for the framework vector stores (LlamaIndex and LangChain).

A framework store writes the index ``ragen index`` writes (``chunks.sqlite`` + FAISS generations), through
the store's public writer: every change is one :meth:`StoreWriter.commit`, atomic and crash-safe like a
``ragen index`` run, and ``ragen query``, :class:`~ragen.retriever.Retriever` and both framework
retrievers see it. The unit of replacement is the store's "file": a framework document (LlamaIndex
``ref_doc_id``, LangChain ``metadata["path"]``/``["source"]`` or the text's id) is a path, its nodes are that
path's chunks, and the node id is the chunk id.

What the store does not keep: arbitrary metadata and framework node records (relationships, exclusions).
They go into this module's own SQLite file beside the index, ``framework_nodes.sqlite`` (table ``nodes``:
``chunk_id``, ``content_hash``, ``metadata`` JSON, ``node`` JSON), written before each commit and pruned
after it; a row counts only while its ``(chunk_id, content_hash)`` matches a committed chunk, so a run killed
between the two writes never attaches stale metadata to a chunk.

Sharing with ``ragen index``. A later ``ragen index FOLDER`` run on the same directory reconciles only the
files of its folder scan: documents this module wrote (recognised by their rows in ``framework_nodes.sqlite``,
:func:`ragen.retriever.framework_documents`) are neither removed nor re-read, and a run that re-commits every
file (new chunking, ``--rebuild``) carries them over with their chunks and vectors. A scanned file whose path
is a framework document's is skipped and counted. A ``ragen index`` run with another model is refused while
framework documents are in the index (their vectors cannot be recomputed from the text).

Limits. Each commit rebuilds the FAISS index of the whole store (as every ``ragen index`` run does), so
add in batches, not node by node.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError
from ..retriever import FRAMEWORK_NODES_DB, RecordedEncoder
from ..store import DB_NAME, EncoderInfo, FileRecord, IndexConfig, Store, StoreWriter, read_manifest
from ..types import Chunk

logger = logging.getLogger(__name__)

NODES_DB = FRAMEWORK_NODES_DB
FRAMEWORK_CHUNKING = {"source": "framework"}  # recorded when a framework store creates the index

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    chunk_id TEXT PRIMARY KEY, content_hash TEXT NOT NULL, metadata TEXT NOT NULL, node TEXT
);
"""


@dataclass(frozen=True)
class NodeRecord:
    """One framework node to store: ``path`` groups nodes into the store's replaceable unit."""

    chunk_id: str
    path: str
    text: str
    vector: np.ndarray
    metadata: dict = field(default_factory=dict)
    node: dict | None = None  # framework-specific record (LlamaIndex: relationships, exclusions)
    start: int | None = None
    end: int | None = None


@dataclass(frozen=True)
class StoredNode:
    """A chunk of the index with what the framework stored about it (empty for ``ragen index`` chunks)."""

    chunk_id: str
    path: str
    text: str
    start: int
    end: int
    metadata: dict
    node: dict | None
    score: float = 0.0

    @property
    def fields(self) -> dict:
        """What filters see: the store's own columns, then the node's metadata (which cannot shadow them)."""
        return {**self.metadata, "path": self.path, "chunk_id": self.chunk_id, "start": self.start, "end": self.end}


def _hash(text: str, vector: np.ndarray) -> str:
    """Vectors are stored by content hash; a framework vector may embed metadata too, so hash both (never
    the bare sha256 of the text that ``ragen index`` uses, whose vector it would overwrite)."""
    h = hashlib.sha256(b"framework-node/1\x00")
    h.update(text.encode("utf-8", errors="surrogatepass"))
    h.update(b"\x00")
    h.update(np.ascontiguousarray(vector, dtype=np.float32).tobytes())
    return h.hexdigest()


class IndexStore:
    """One ragen index directory opened for framework reads and writes (thread-safe; one writer per
    process at a time, and the store's lock keeps other processes out while a commit runs)."""

    def __init__(self, index_dir: str | Path, *, encoder: EncoderInfo | None = None,
                 index_config: IndexConfig | None = None) -> None:
        self.index_dir = Path(index_dir).expanduser()
        self._lock = threading.RLock()
        self._reader: Store | None = None
        self._index_config = index_config
        if (self.index_dir / DB_NAME).is_file():
            # the whole recorded entry (load options, resolved hub commits), so a framework commit keeps it
            recorded = RecordedEncoder.from_manifest(read_manifest(self.index_dir)["encoder"])
            if encoder is not None and (encoder.fingerprint != recorded.fingerprint or encoder.dim != recorded.dim):
                raise StoreError(f"{self.index_dir}: built with encoder {recorded.spec} (dim {recorded.dim}, "
                                 f"fingerprint {recorded.fingerprint}), but the embedding model is {encoder.spec} "
                                 f"(dim {encoder.dim}, fingerprint {encoder.fingerprint}); use {recorded.spec}")
            self.encoder = recorded
        elif encoder is None:
            raise StoreError(f"{self.index_dir}: no ragen index here yet; pass the embedding model "
                             "(embed_model= / embedding=) so the new index records which encoder made its vectors")
        else:
            self.encoder = encoder

    @property
    def exists(self) -> bool:
        return (self.index_dir / DB_NAME).is_file()

    @property
    def dim(self) -> int:
        return int(self.encoder.dim)

    # --- reading ------------------------------------------------------------------------------------------
    def _store(self) -> Store | None:
        if not self.exists:
            return None
        if self._reader is None:
            self._reader = Store.open(self.index_dir)
        return self._reader

    def _connect_nodes(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.index_dir / NODES_DB), isolation_level=None, timeout=30.0,
                               check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(_SCHEMA)
        return conn

    def _node_rows(self, pairs: Iterable[tuple[str, str]]) -> dict[str, tuple[dict, dict | None]]:
        """``chunk_id -> (metadata, node)`` for the (chunk_id, content_hash) pairs that have a row."""
        pairs = list(pairs)
        if not pairs or not (self.index_dir / NODES_DB).is_file():
            return {}
        wanted = dict(pairs)
        out: dict[str, tuple[dict, dict | None]] = {}
        conn = self._connect_nodes()
        try:
            ids = list(wanted)
            for start in range(0, len(ids), 500):
                part = ids[start:start + 500]
                marks = ",".join("?" * len(part))
                for chunk_id, content_hash, meta, node in conn.execute(
                        f"SELECT chunk_id, content_hash, metadata, node FROM nodes WHERE chunk_id IN ({marks})", part):
                    if wanted.get(chunk_id) == content_hash:
                        out[chunk_id] = (json.loads(meta), json.loads(node) if node else None)
        finally:
            conn.close()
        return out

    def _chunks(self, where: str = "", args: Sequence[Any] = ()) -> list[Chunk]:
        """Committed chunk rows (read-only SQL on the store's ``chunks`` table: the store has no listing API)."""
        if not self.exists:
            return []
        conn = sqlite3.connect(f"file:{self.index_dir / DB_NAME}?mode=ro", uri=True, timeout=30.0)
        try:
            rows = conn.execute("SELECT chunk_id, path, position, text, start, end, content_hash FROM chunks "
                                f"{where} ORDER BY path, position", tuple(args)).fetchall()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.index_dir / DB_NAME}: cannot read chunk rows ({exc})") from None
        finally:
            conn.close()
        return [Chunk(*row) for row in rows]

    def _stored(self, chunks: Sequence[Chunk], scores: Sequence[float] | None = None) -> list[StoredNode]:
        extra = self._node_rows((c.chunk_id, c.content_hash) for c in chunks)
        out = []
        for i, c in enumerate(chunks):
            meta, node = extra.get(c.chunk_id, ({}, None))
            out.append(StoredNode(chunk_id=c.chunk_id, path=c.path, text=c.text, start=c.start, end=c.end,
                                  metadata=meta, node=node, score=0.0 if scores is None else float(scores[i])))
        return out

    def get(self, chunk_ids: Iterable[str] | None = None,
            keep: Callable[[StoredNode], bool] | None = None) -> list[StoredNode]:
        """Stored nodes by id, in the order asked (all, by path, when ``chunk_ids`` is None), that pass ``keep``."""
        with self._lock:
            if chunk_ids is None:
                chunks = self._chunks()
            else:
                order = {cid: i for i, cid in enumerate(dict.fromkeys(chunk_ids))}
                chunks = sorted(self._chunks_in("chunk_id", order), key=lambda c: order[c.chunk_id])
            nodes = self._stored(chunks)
        return [n for n in nodes if keep is None or keep(n)]

    def search(self, vector: np.ndarray, k: int, keep: Callable[[StoredNode], bool] | None = None) -> list[StoredNode]:
        """The ``k`` nearest stored nodes that pass ``keep`` (the pool grows until ``k`` pass or all searched)."""
        with self._lock:
            store = self._store()
            if store is None:
                return []
            v = np.asarray(vector, dtype=np.float32)
            if v.ndim != 1 or v.shape[0] != self.dim:
                raise StoreError(f"query vector has shape {v.shape}; this index expects ({self.dim},)")
            total = store.count
            fetch = min(total, k if keep is None else max(4 * k, 64))
            while True:
                hits = store.hits(v, max(fetch, 1)) if total else []
                total = store.count  # hits() reloads when another process committed meanwhile
                by_id = {c.chunk_id: c for c in self._chunks_in("chunk_id", [h.chunk_id for h in hits])}
                found = [h for h in hits if h.chunk_id in by_id]
                nodes = self._stored([by_id[h.chunk_id] for h in found], [h.score for h in found])
                kept = [n for n in nodes if keep is None or keep(n)]
                if len(kept) >= k or fetch >= total:
                    return kept[:k]
                fetch = min(total, fetch * 4)

    # --- writing ------------------------------------------------------------------------------------------
    def _writer(self) -> StoreWriter:
        chunking = dict(FRAMEWORK_CHUNKING)
        config = self._index_config
        if self.exists:
            manifest = read_manifest(self.index_dir)
            chunking = dict(manifest.get("chunking") or {})  # the recorded one: a different one means a full pass
            if config is None:  # the index type the index was asked to be (its "kind" may be a fallback)
                config = IndexConfig.from_dict(manifest.get("index", {}).get("config", {}))
        return StoreWriter(self.index_dir, encoder=self.encoder, chunking=chunking,
                           index_config=config or IndexConfig())

    def write(self, add: Sequence[NodeRecord] = (), delete_ids: Iterable[str] = (),
              delete_paths: Iterable[str] = (), clear: bool = False) -> None:
        """One atomic change: remove ``delete_ids`` chunks and ``delete_paths`` documents (everything with
        ``clear``), then add ``add`` (a node whose id exists replaces it)."""
        add = list(add)
        for rec in add:
            vec = np.asarray(rec.vector, dtype=np.float32)
            if vec.ndim != 1 or vec.shape[0] != self.dim:
                raise StoreError(f"the embedding of node {rec.chunk_id!r} has dimension {vec.size}, but the index "
                                 f"{self.index_dir} holds vectors of dimension {self.dim} ({self.encoder.spec})")
        ids = [rec.chunk_id for rec in add]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise StoreError(f"node id {dup!r} occurs twice in one add")
        with self._lock:
            writer = self._writer()
            try:
                all_paths = set(self._file_paths())
                drop_ids = set(delete_ids) | set(ids)
                drop_paths = set(all_paths) if clear else set(delete_paths) & all_paths
                # only the documents this change touches are read and re-committed; chunk ids are unique
                # across the index, so a re-added id leaves the document it was in
                touched = {c.path for c in self._chunks_in("chunk_id", drop_ids)} if not clear else set()
                touched |= drop_paths | {rec.path for rec in add}
                kept: dict[str, list[Chunk]] = {p: [] for p in touched}
                for c in self._chunks_in("path", touched - drop_paths):
                    if c.chunk_id not in drop_ids:
                        kept[c.path].append(c)
                hashes = [_hash(rec.text, rec.vector) for rec in add]
                for rec, h in zip(add, hashes):
                    kept[rec.path].append(Chunk(rec.chunk_id, rec.path, 0, rec.text,
                                                0 if rec.start is None else int(rec.start),
                                                len(rec.text) if rec.end is None else int(rec.end), h))
                now = time.time_ns()
                updated = []
                for path, chunks in sorted(kept.items()):
                    if not chunks:
                        continue  # a document with no chunks left is removed
                    chunks = [Chunk(c.chunk_id, c.path, i, c.text, c.start, c.end, c.content_hash)
                              for i, c in enumerate(chunks)]
                    size = sum(len(c.text.encode("utf-8", errors="surrogatepass")) for c in chunks)
                    updated.append(FileRecord(path, size, now, tuple(chunks)))
                present = (all_paths - touched) | {f.path for f in updated}
                if add:
                    self._put_node_rows(add, hashes)
                    writer.add_vectors(hashes, np.stack([np.asarray(r.vector, dtype=np.float32) for r in add]))
                writer.commit(updated, present)
            finally:
                writer.close()
            self._prune_node_rows()
            self._reload()

    def _chunks_in(self, column: str, values: Iterable[str]) -> list[Chunk]:
        values = sorted(set(values))
        out: list[Chunk] = []
        for start in range(0, len(values), 500):
            part = values[start:start + 500]
            out += self._chunks(f"WHERE {column} IN ({','.join('?' * len(part))})", part)
        return out

    def _file_paths(self) -> list[str]:
        if not self.exists:
            return []
        conn = sqlite3.connect(f"file:{self.index_dir / DB_NAME}?mode=ro", uri=True, timeout=30.0)
        try:
            return [p for (p,) in conn.execute("SELECT path FROM files")]
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.index_dir / DB_NAME}: cannot read file rows ({exc})") from None
        finally:
            conn.close()

    def _put_node_rows(self, add: Sequence[NodeRecord], hashes: Sequence[str]) -> None:
        conn = self._connect_nodes()
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT OR REPLACE INTO nodes(chunk_id, content_hash, metadata, node) VALUES (?, ?, ?, ?)",
                             [(r.chunk_id, h, json.dumps(r.metadata, sort_keys=True, default=str),
                               json.dumps(r.node, sort_keys=True, default=str) if r.node is not None else None)
                              for r, h in zip(add, hashes)])
            conn.execute("COMMIT")
        finally:
            conn.close()

    def _prune_node_rows(self) -> None:
        """Drop metadata rows whose chunk is gone or was replaced (after the commit that removed it)."""
        if not (self.index_dir / NODES_DB).is_file():
            return
        conn = self._connect_nodes()
        try:
            rows = conn.execute("SELECT chunk_id, content_hash FROM nodes").fetchall()
            live = {(c.chunk_id, c.content_hash) for c in self._chunks_in("chunk_id", [cid for cid, _ in rows])}
            stale = [cid for cid, h in rows if (cid, h) not in live]
            if stale:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("DELETE FROM nodes WHERE chunk_id=?", [(cid,) for cid in stale])
                conn.execute("COMMIT")
        finally:
            conn.close()

    def _reload(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def close(self) -> None:
        with self._lock:
            self._reload()


__all__ = ["IndexStore", "NodeRecord", "StoredNode", "NODES_DB"]
