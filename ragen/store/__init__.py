"""The on-disk index: FAISS vectors, chunk metadata in SQLite, a JSON manifest. Vectors and ids only.

Modules: :mod:`.schema` (tables, connections, manifest validation and formats), :mod:`.segments` (owned
files, digests, atomic writes, the readers' lock, loading segments), :mod:`.faiss_index` (building and
searching FAISS indexes: flat, HNSW, IVF, IVF-PQ, ``auto`` by size; CPU, faiss-gpu, or torch on a GPU),
:mod:`.locks` (the file locks: ``flock`` on POSIX, filelock elsewhere), :mod:`.reader` (:class:`Store`) and
:mod:`.writer` (:class:`StoreWriter`, the commit protocol below, the write lock).

Layout of an index directory (format 2)::

    chunks.sqlite           chunk text/path/offsets/hash, file sizes and mtimes, the vectors (float32
                            BLOBs, by content hash), the committed state (generation, manifest, the live
                            segment list), tombstones (deleted row ids), the IVF quantizer (or the
                            trained empty IVF-PQ index, ``trained_index``), and the
                            ``owned_files`` table: every file of the folder the store created, with its
                            size and digests
    seg-<G>-base.faiss      the base segment: every chunk at the last compaction (written at generation G)
    seg-<G>-delta.faiss     a delta segment: the chunks added by the commit of generation G (id-mapped flat)
    manifest.json           a human-readable copy of the committed manifest
    write.lock              locked (exclusive, :mod:`.locks`) by the one process allowed to write; its pid inside
    readers.lock            locked shared by readers while they load a generation (in turn where only
                            exclusive locks exist)

Every FAISS segment returns chunk row ids itself; row ids are never reused. A search runs over every live
segment with its tombstoned ids filtered inside faiss, and merges the best ``k``. Format 1 (one
``vectors-<G>.faiss`` + ``vectors-<G>.ids.npy`` per generation) still opens; its next write upgrades it.

Commits. A first run, ``--rebuild`` or new chunking writes a base segment from all vectors (read in bulk).
Otherwise a commit costs the change: the removed rows become tombstones, the added rows one small delta
segment. Past ``MAX_DELTAS`` deltas they are merged into one; once deltas + tombstones pass
``COMPACT_RATIO`` of the base, the base is rebuilt (IVF keeps its trained quantizer, IVF-PQ its trained
codebooks: no k-means again; ``auto`` re-chooses the kind for the new size, training on a bounded sample).

Staging. While a run reads and embeds (:mod:`ragen.ingest`), embedded vectors are committed batch by
batch and the files read so far, with their chunks, are staged (``staged_files``/``staged_chunks``) window
by window, none of it visible to readers. A killed run loses at most the batch in flight and the files read
since the last window; the next run with the same encoder, epoch and chunking (``stage_key`` in ``meta``)
takes the staged files that did not change instead of reading them again, and embeds only what is
missing (matched by content hash). Files found unindexable by their bytes are kept in ``skipped_files``
and not read again until they change. Each file row records the SHA-256 of its bytes and when they were
read, so a file whose mtime lies within the filesystem's resolution of that read is compared by hash, not
trusted by its stat (:func:`ragen.corpus.stat_verdict`).

Crash safety. A commit then

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

from .faiss_index import GPU_MAX_K, INDEX_KINDS, IndexConfig, build_faiss_index, gpu_available, normalize_rows, to_cpu, to_gpu
from .reader import Store, read_build_settings, read_manifest
from .schema import DB_NAME, FORMAT_VERSION, LOCK_NAME, MANIFEST_NAME, READERS_LOCK_NAME, EncoderInfo
from .writer import (COMPACT_RATIO, MAX_DELTAS, CommitResult, FileRecord, FileState, SkippedFile, StoreWriter,
                     check_unlocked, index_is_locked)

__all__ = ["Store", "StoreWriter", "IndexConfig", "EncoderInfo", "FileRecord", "FileState", "SkippedFile", "CommitResult", "FORMAT_VERSION",
           "INDEX_KINDS", "GPU_MAX_K", "COMPACT_RATIO", "MAX_DELTAS", "DB_NAME", "MANIFEST_NAME", "LOCK_NAME",
           "READERS_LOCK_NAME", "build_faiss_index", "gpu_available", "normalize_rows", "read_build_settings", "read_manifest",
           "index_is_locked", "check_unlocked", "to_cpu", "to_gpu"]
