"""Incremental commits (issue 12): base + delta segments, tombstones, delta merges and compaction, for
every index kind; results always equal an exact search over the chunks the database holds; kill -9 in
each phase of a segment write or a compaction leaves the previous state loadable, and the next run resumes."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ragen.store as store_mod
from ragen.store import EncoderInfo, FileRecord, IndexConfig, Store, StoreWriter, normalize_rows
from ragen.types import Chunk

ROOT = Path(__file__).resolve().parents[1]
DIM = 16
ENC = EncoderInfo(spec="synthetic", fingerprint="fp-segments", dim=DIM)
CHUNKING = {"method": "chars/1", "chunk_size": 1000, "chunk_overlap": 200}


def vec(h: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(h.encode()).digest()[:4], "little")
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


def record(f: int, version: int = 0, per_file: int = 5) -> FileRecord:
    path = f"file{f}.txt"
    return FileRecord(path, 100, version, tuple(
        Chunk(f"{path}#{p}", path, p, f"text v{version} {f}-{p}", p, p + 1, f"h{version}-{f}-{p}") for p in range(per_file)))


def commit(idx, updated, present, config=IndexConfig()):
    with StoreWriter(idx, encoder=ENC, chunking=CHUNKING, index_config=config) as w:
        hashes = sorted(w.missing_vectors(c.content_hash for r in updated for c in r.chunks))
        if hashes:
            w.add_vectors(hashes, np.stack([vec(h) for h in hashes]))
        return w.commit(updated, present)


def live_chunks(idx) -> dict[int, str]:
    con = sqlite3.connect(idx / "chunks.sqlite")
    try:
        return dict(con.execute("SELECT id, content_hash FROM chunks"))
    finally:
        con.close()


def assert_exact(idx, n_queries: int = 20, k: int = 8) -> None:
    """Store.search equals brute force over the database's current chunks (ids and scores)."""
    rows = live_chunks(idx)
    ids = np.array(sorted(rows), dtype=np.int64)
    matrix = normalize_rows(np.stack([vec(rows[i]) for i in ids]))
    queries = normalize_rows(np.random.default_rng(5).standard_normal((n_queries, DIM)).astype(np.float32))
    with Store.open(idx, device="cpu") as store:
        assert store.count == len(ids)
        scores, got = store.search(queries, k)
    truth = np.argsort(-(queries @ matrix.T), axis=1)[:, :k]
    np.testing.assert_array_equal(got, ids[truth])
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ matrix.T, truth, axis=1), atol=1e-5)


def segments(idx) -> list[dict]:
    con = sqlite3.connect(idx / "chunks.sqlite")
    try:
        return json.loads(con.execute("SELECT value FROM meta WHERE key='segments'").fetchone()[0])
    finally:
        con.close()


def test_a_one_file_update_writes_a_delta_and_tombstones_not_the_base(tmp_path, monkeypatch):
    idx = tmp_path / "idx"
    n_files = 100
    commit(idx, [record(f) for f in range(n_files)], [f"file{f}.txt" for f in range(n_files)])
    base = idx / "seg-1-base.faiss"
    base_bytes = base.read_bytes()
    gathered = []
    monkeypatch.setattr(StoreWriter, "_build_base", lambda self: gathered.append(1) or (_ for _ in ()).throw(
        AssertionError("an incremental commit must not read every vector")))
    result = commit(idx, [record(3, version=1)], [f"file{f}.txt" for f in range(n_files)])
    assert not gathered and result.chunks == 500 and result.chunks_removed == 5
    assert [s["kind"] for s in segments(idx)] == ["base", "delta"]
    assert base.read_bytes() == base_bytes  # the base was not rewritten
    assert result.manifest["index"]["deleted_rows"] == 5
    monkeypatch.undo()
    assert_exact(idx)
    with Store.open(idx, device="cpu") as store:  # the old text is gone, the new one is found
        hit = store.hits(vec("h1-3-2"), 1)[0]
        assert (hit.chunk_id, hit.text) == ("file3.txt#2", "text v1 3-2")
        assert all(h.text != "text v0 3-2" for h in store.hits(vec("h0-3-2"), 10))
    # a deleted file: tombstones only; the vectors it alone used leave the database
    commit(idx, [], [f"file{f}.txt" for f in range(n_files) if f != 7])
    assert_exact(idx)
    con = sqlite3.connect(idx / "chunks.sqlite")
    assert con.execute("SELECT COUNT(*) FROM vectors WHERE content_hash LIKE 'h0-7-%'").fetchone()[0] == 0


def test_deltas_merge_and_the_base_is_compacted(tmp_path):
    idx = tmp_path / "idx"
    n_files = 200
    present = [f"file{f}.txt" for f in range(n_files)]
    commit(idx, [record(f) for f in range(n_files)], present)
    kinds = []
    for version in range(1, 12):  # one file changes per commit
        commit(idx, [record(version, version=version)], present)
        kinds.append([s["kind"] for s in segments(idx)])
        assert_exact(idx)
    assert max(len(k) for k in kinds) == 1 + store_mod.MAX_DELTAS
    assert ["base", "delta"] in kinds[store_mod.MAX_DELTAS:]  # merged into one delta
    # a big change passes COMPACT_RATIO: one base again, no tombstones
    changed = [record(f, version=50) for f in range(60)]
    result = commit(idx, changed, present)
    assert [s["kind"] for s in segments(idx)] == ["base"] and result.manifest["index"]["deleted_rows"] == 0
    assert_exact(idx)
    files = sorted(p.name for p in idx.iterdir() if p.suffix == ".faiss")
    assert files == [segments(idx)[0]["name"]]  # retired segments were deleted


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_update_incrementally(tmp_path, kind):
    idx = tmp_path / "idx"
    n_files = 400  # 2000 vectors: IVF trains 2 * ... lists
    present = [f"file{f}.txt" for f in range(n_files)]
    config = IndexConfig(kind, ivf_nprobe=64, hnsw_ef_search=256)
    first = commit(idx, [record(f) for f in range(n_files)], present, config)
    assert first.index_kind == kind
    base_before = (idx / "seg-1-base.faiss").read_bytes()
    result = commit(idx, [record(9, version=1)], present[:-1], config)  # one file changed, one deleted
    assert result.index_kind == kind and (idx / "seg-1-base.faiss").read_bytes() == base_before
    with Store.open(idx, device="cpu") as store:
        assert store.count == 2000 - 5
        for p in range(5):
            hit = store.hits(vec(f"h1-9-{p}"), 1)[0]
            assert hit.text == f"text v1 9-{p}" and hit.score > 0.999
            assert all(h.path != f"file{n_files - 1}.txt" for h in store.hits(vec(f"h0-{n_files - 1}-{p}"), 5))
            assert all(h.text != f"text v0 9-{p}" for h in store.hits(vec(f"h0-9-{p}"), 5))


def test_a_long_lived_reader_reloads_only_the_new_segments(tmp_path):
    idx = tmp_path / "idx"
    present = [f"file{f}.txt" for f in range(100)]
    commit(idx, [record(f) for f in range(100)], present)
    with Store.open(idx, device="cpu") as store:
        base = store._segments[0].index
        commit(idx, [record(4, version=1)], present)
        hit = store.hits(vec("h1-4-0"), 1)[0]
        assert store.generation == 2 and hit.text == "text v1 4-0"
        assert store._segments[0].index is base  # the base was not read again


KILL = """
import os, sys
sys.path.insert(0, {root!r})
import ragen.store.writer as s
from tests.test_store_segments import commit, record
phase = {phase!r}
real_write, real_digest = s._write_faiss_file, s._full_digest
def write(index, path):
    if phase == "mid-write":
        (path.parent / ("." + path.name + ".tmp")).write_bytes(b"partial")
        os._exit(9)
    real_write(index, path)
def digest(path):
    if phase == "before-switch":
        os._exit(9)
    return real_digest(path)
s._write_faiss_file, s._full_digest = write, digest
if phase == "in-commit":
    real_set = s.StoreWriter._set
    def set_(self, key, value):
        if key == "generation":
            os._exit(9)
        return real_set(self, key, value)
    s.StoreWriter._set = set_
commit({idx!r}, {updated}, {present!r})
"""


def test_ivf_compaction_keeps_the_trained_quantizer(tmp_path, monkeypatch):
    import faiss

    idx = tmp_path / "idx"
    present = [f"file{f}.txt" for f in range(400)]
    config = IndexConfig("ivf", ivf_nprobe=64)
    commit(idx, [record(f) for f in range(400)], present, config)
    first_raw = faiss.read_index(str(idx / "seg-1-base.faiss"))  # downcast_index does not own what it wraps
    first = faiss.downcast_index(first_raw)
    trained = []
    real_train = faiss.IndexIVFFlat.train
    monkeypatch.setattr(faiss.IndexIVFFlat, "train", lambda self, x: trained.append(len(x)) or real_train(self, x))
    result = commit(idx, [record(f, version=1) for f in range(150)], present, config)  # past COMPACT_RATIO
    assert [s["kind"] for s in segments(idx)] == ["base"] and result.index_kind == "ivf"
    assert trained == []  # no k-means
    second_raw = faiss.read_index(str(idx / segments(idx)[0]["name"]))
    second = faiss.downcast_index(second_raw)
    assert first.nlist == second.nlist >= 2
    np.testing.assert_array_equal(faiss.downcast_index(second.quantizer).reconstruct_n(0, second.nlist),
                                  faiss.downcast_index(first.quantizer).reconstruct_n(0, first.nlist))
    with Store.open(idx, device="cpu") as store:
        assert store.hits(vec("h1-20-3"), 1)[0].text == "text v1 20-3"
    commit(idx, [record(f) for f in range(400)], present, config)  # an --rebuild-free epoch: still reused
    with StoreWriter(idx, encoder=ENC, chunking=CHUNKING, index_config=config, rebuild=True) as w:
        assert w._trained_centroids(2000) is None  # a rebuild trains again (its vectors may differ)


@pytest.mark.slow
@pytest.mark.parametrize("operation", ["delta", "merge", "compaction"])
@pytest.mark.parametrize("phase", ["mid-write", "before-switch", "in-commit"])
def test_kill_9_in_each_phase_keeps_the_previous_state_and_the_next_run_resumes(tmp_path, operation, phase):
    idx = tmp_path / "idx"
    present = [f"file{f}.txt" for f in range(100)]
    commit(idx, [record(f) for f in range(100)], present)
    if operation == "merge":
        for v in range(1, store_mod.MAX_DELTAS + 1):  # the next commit merges the deltas
            commit(idx, [record(v, version=v)], present)
    before = segments(idx)
    with Store.open(idx, device="cpu") as store:
        gen, count = store.generation, store.count
        expected = store.search(normalize_rows(np.ones((1, DIM), np.float32)), 10)
    version = 90
    changed = [record(f, version=version) for f in (range(40) if operation == "compaction" else [42])]
    updated = "[" + ", ".join(f"record({r.path[4:-4]}, version={version})" for r in changed) + "]"
    script = KILL.format(root=str(ROOT), phase=phase, idx=str(idx), updated=updated, present=present)
    assert subprocess.run([sys.executable, "-c", script], timeout=120).returncode == 9
    with Store.open(idx, device="cpu") as store:  # the previous state, intact
        assert (store.generation, store.count) == (gen, count)
        got = store.search(normalize_rows(np.ones((1, DIM), np.float32)), 10)
        np.testing.assert_array_equal(got[1], expected[1])
    assert segments(idx) == before
    result = commit(idx, changed, present)  # the next run resumes: the vectors are already stored
    assert result.generation == gen + 1
    assert_exact(idx)
    live = {s["name"] for s in segments(idx)}
    assert {p.name for p in idx.iterdir() if ".faiss" in p.name} == live  # leftovers of the killed run are gone
    if operation == "compaction":
        assert [s["kind"] for s in segments(idx)] == ["base"]


def test_the_gpu_path_maps_segment_positions_to_row_ids(tmp_path, monkeypatch):
    """Without a GPU here: a CPU stand-in for the device copy checks that id-mapped segments are moved
    as their inner index plus an id array, and that their results equal the CPU search."""
    idx = tmp_path / "idx"
    present = [f"file{f}.txt" for f in range(100)]
    commit(idx, [record(f) for f in range(100)], present)
    commit(idx, [record(5, version=1)], present)  # base + delta + tombstones
    moved = []
    import ragen.store.faiss_index as faiss_mod
    import ragen.store.reader as reader_mod

    monkeypatch.setattr(faiss_mod, "to_gpu", lambda index, gpu: moved.append(type(index).__name__) or index)
    monkeypatch.setattr(reader_mod, "_resolve_search_device", lambda device, kind: 0)
    queries = normalize_rows(np.random.default_rng(3).standard_normal((10, DIM)).astype(np.float32))
    with Store.open(idx, device="cuda") as store:
        assert store.on_gpu and moved == ["IndexFlatIP", "IndexFlatIP"]
        gpu_scores, gpu_ids = store.search(queries, 7)
    monkeypatch.undo()
    with Store.open(idx, device="cpu") as store:
        cpu_scores, cpu_ids = store.search(queries, 7)
    np.testing.assert_array_equal(gpu_ids, cpu_ids)
    np.testing.assert_allclose(gpu_scores, cpu_scores, atol=1e-6)


def test_vectors_of_other_epochs_go_and_the_kept_epochs_stay(tmp_path):
    """Epochs are dropped by primary-key ranges: everything below, between and above the kept ones goes."""
    idx = tmp_path / "idx"
    commit(idx, [record(f) for f in range(3)], [f"file{f}.txt" for f in range(3)])
    con = sqlite3.connect(idx / "chunks.sqlite")
    (epoch,) = con.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
    epoch = int(epoch)
    blob = np.zeros(DIM, np.float32).tobytes()
    con.executemany("INSERT INTO vectors(epoch, content_hash, vector) VALUES (?, ?, ?)",
                    [(e, f"stale-{e}", blob) for e in (epoch - 1, epoch + 1, epoch + 3, epoch + 9)])
    con.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('work_epoch', ?)", (str(epoch + 3),))
    con.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('work_fingerprint', ?)", (ENC.fingerprint,))
    con.commit()
    with StoreWriter(idx, encoder=ENC, chunking=CHUNKING, rebuild=True) as w:  # resumes work epoch epoch+3
        assert w.epoch == epoch + 3
    left = {e for (e,) in con.execute("SELECT DISTINCT epoch FROM vectors")}
    assert left == {epoch, epoch + 3}
    assert con.execute("SELECT COUNT(*) FROM vectors WHERE epoch=?", (epoch,)).fetchone()[0] == 15
    con.close()
    commit(idx, [record(f, 1) for f in range(3)], [f"file{f}.txt" for f in range(3)])  # a commit in the committed epoch drops the rest
    con = sqlite3.connect(idx / "chunks.sqlite")
    assert {e for (e,) in con.execute("SELECT DISTINCT epoch FROM vectors")} == {epoch}
    con.close()
