"""The on-disk store: exact and approximate search, atomic generations, locking, corruption (ragen.store)."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from ragen.errors import StoreError
from ragen.store import (EncoderInfo, FileRecord, IndexConfig, Store, StoreWriter, build_faiss_index,
                         gpu_available, index_is_locked, normalize_rows, read_manifest)
from ragen.types import Chunk

DIM = 16
ENC = EncoderInfo(spec="synthetic", fingerprint="fp-synthetic", dim=DIM)
CHUNKING = {"method": "chars/1", "chunk_size": 1000, "chunk_overlap": 200}


def _records(n_files: int, per_file: int, tag: str = "") -> list[FileRecord]:
    out = []
    for f in range(n_files):
        path = f"file{f}.txt"
        chunks = tuple(Chunk(chunk_id=f"{path}#{p}", path=path, position=p, text=f"text {tag}{f}-{p}", start=p * 10,
                             end=p * 10 + 9, content_hash=f"h{tag}{f}-{p}") for p in range(per_file))
        out.append(FileRecord(path, 100 + f, 1_000 + f, chunks))
    return out


def _vector_for(h: str) -> np.ndarray:
    rng = np.random.default_rng(abs(hash(h)) % (2**32))
    return rng.standard_normal(DIM).astype(np.float32)


def _write(index_dir, records, *, encoder=ENC, config=IndexConfig(), rebuild=False, present=None):
    with StoreWriter(index_dir, encoder=encoder, chunking=CHUNKING, index_config=config, rebuild=rebuild) as w:
        hashes = sorted(w.missing_vectors(c.content_hash for r in records for c in r.chunks))
        if hashes:
            w.add_vectors(hashes, np.stack([_vector_for(h) for h in hashes]))
        return w.commit(records, present if present is not None else [r.path for r in records])


def test_flat_search_is_exact_and_returns_metadata(tmp_path):
    records = _records(5, 4)
    result = _write(tmp_path / "idx", records)
    assert (result.files, result.chunks, result.generation) == (5, 20, 1)
    with Store.open(tmp_path / "idx", device="cpu") as store:
        assert store.count == 20 and store.dim == DIM and store.fingerprint == "fp-synthetic"
        chunks = [c for r in records for c in r.chunks]
        matrix = normalize_rows(np.stack([_vector_for(c.content_hash) for c in chunks]))
        q = np.random.default_rng(1).standard_normal(DIM).astype(np.float32)
        hits = store.hits(q, k=5)
        expected = np.argsort(-(matrix @ (q / np.linalg.norm(q))))[:5]
        assert [h.chunk_id for h in hits] == [chunks[i].chunk_id for i in expected]
        assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
        np.testing.assert_allclose([h.score for h in hits], (matrix @ (q / np.linalg.norm(q)))[expected], atol=1e-5)
        top = chunks[expected[0]]
        assert (hits[0].text, hits[0].path, hits[0].start, hits[0].end) == (top.text, top.path, top.start, top.end)
        assert len(store.hits(q, k=100)) == 20  # k larger than the index: everything, once


def test_manifest_records_encoder_chunking_counts(tmp_path):
    enc = EncoderInfo(spec="ckpt", fingerprint="abc", dim=DIM, query_instruction="Q: ", document_instruction="D: ")
    _write(tmp_path / "idx", _records(2, 3), encoder=enc)
    on_disk = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert on_disk == read_manifest(tmp_path / "idx")
    assert on_disk["encoder"] == {"spec": "ckpt", "fingerprint": "abc", "dim": DIM, "query_instruction": "Q: ",
                                  "document_instruction": "D: ", "base_model": None}
    assert on_disk["chunking"] == CHUNKING and on_disk["normalization"] == "l2"
    assert on_disk["counts"] == {"files": 2, "chunks": 6, "unique_vectors": 6}
    assert on_disk["format_version"] == 2 and on_disk["ragen_version"] and on_disk["created_at"]
    assert on_disk["index"]["segments"] == 1 and on_disk["index"]["deleted_rows"] == 0
    assert not any(p.suffix in (".pkl", ".pickle") for p in (tmp_path / "idx").iterdir())
    assert (tmp_path / "idx" / "seg-1-base.faiss").exists()


def test_incremental_commit_replaces_changed_and_removes_deleted(tmp_path):
    _write(tmp_path / "idx", _records(3, 2))
    changed = _records(1, 3, tag="v2")  # file0 now has 3 new chunks
    result = _write(tmp_path / "idx", changed, present=["file0.txt", "file1.txt"])  # file2 deleted
    assert result.files_removed == 1 and result.chunks_removed == 2 + 2
    assert result.chunks == 3 + 2 and result.generation == 2
    with Store.open(tmp_path / "idx", device="cpu") as store:
        paths = {p: n for p, _, _, n in store.files()}
        assert paths == {"file0.txt": 3, "file1.txt": 2}
        found = store.chunks(range(1, 100))
        assert sorted(c.text for c in found.values()) == sorted(
            ["text v20-0", "text v20-1", "text v20-2", "text 1-0", "text 1-1"])
    assert not (tmp_path / "idx" / "seg-1-base.faiss").exists()  # compacted (tiny index): the old base is gone
    con = sqlite3.connect(tmp_path / "idx" / "chunks.sqlite")
    assert con.execute("SELECT COUNT(*) FROM vectors").fetchone()[0] == 5  # orphaned vectors dropped


def test_unchanged_commit_keeps_the_generation(tmp_path):
    _write(tmp_path / "idx", _records(2, 2))
    with StoreWriter(tmp_path / "idx", encoder=ENC, chunking=CHUNKING) as w:
        result = w.commit([], ["file0.txt", "file1.txt"])
    assert result.generation == 1 and result.chunks == 4


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_index_recall_against_exact(kind):
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((50, 32))
    data = normalize_rows((centers[rng.integers(0, 50, 2000)] + 0.3 * rng.standard_normal((2000, 32))).astype(np.float32))
    queries = normalize_rows((centers[rng.integers(0, 50, 200)] + 0.3 * rng.standard_normal((200, 32))).astype(np.float32))
    exact, _ = build_faiss_index(data, IndexConfig("flat"))
    approx, built = build_faiss_index(data, IndexConfig(kind))
    assert built == kind
    _, true_ids = exact.search(queries, 10)
    _, got = approx.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(true_ids, got)])
    assert recall >= 0.9, recall


def test_ivf_on_tiny_sets_falls_back_to_flat():
    data = normalize_rows(np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32))
    _, kind = build_faiss_index(data, IndexConfig("ivf"))
    assert kind == "flat"


def test_approximate_index_type_round_trips_through_disk(tmp_path):
    _write(tmp_path / "idx", _records(40, 5), config=IndexConfig("hnsw", hnsw_ef_search=64))
    with Store.open(tmp_path / "idx", device="cpu") as store:
        assert store.manifest["index"]["kind"] == "hnsw"
        q = _vector_for("h3-1")
        assert store.hits(q, k=1)[0].chunk_id == "file3.txt#1"


def test_unknown_index_type():
    with pytest.raises(StoreError, match="unknown index type 'annoy'"):
        IndexConfig("annoy")


@pytest.mark.gpu
def test_gpu_search_matches_cpu_exact_search(tmp_path):
    if not gpu_available():
        pytest.skip("faiss has no GPU support here")
    import faiss

    records = _records(50, 20)
    _write(tmp_path / "idx", records)
    chunks = [c for r in records for c in r.chunks]
    matrix = normalize_rows(np.stack([_vector_for(c.content_hash) for c in chunks]))
    cpu = faiss.IndexFlatIP(DIM)
    cpu.add(matrix)
    queries = normalize_rows(np.random.default_rng(2).standard_normal((64, DIM)).astype(np.float32))
    with Store.open(tmp_path / "idx", device="cuda") as store:
        assert store.on_gpu
        scores, ids = store.search(queries, 10)
    ref_scores, ref_pos = cpu.search(queries, 10)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-4)
    by_rowid = {}
    with Store.open(tmp_path / "idx", device="cpu") as store:
        for rowid, c in store.chunks(range(1, 2000)).items():
            by_rowid[rowid] = c.chunk_id
    assert [[by_rowid[i] for i in row] for row in ids[:, :3]] == [[chunks[j].chunk_id for j in row] for row in ref_pos[:, :3]]


def test_cuda_device_without_gpu_is_a_clear_error(tmp_path):
    import torch

    if gpu_available() or torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _write(tmp_path / "idx", _records(1, 2))
    with pytest.raises(StoreError, match="neither torch nor faiss sees a GPU; use --device cpu"):
        Store.open(tmp_path / "idx", device="cuda")


# ---------------------------------------------------------------------------------------------- safety
def test_second_writer_is_refused_with_the_holders_pid(tmp_path):
    import os

    with StoreWriter(tmp_path / "idx", encoder=ENC, chunking=CHUNKING):
        assert index_is_locked(tmp_path / "idx")
        with pytest.raises(StoreError, match=rf"being written by another process \(pid {os.getpid()}\)"):
            StoreWriter(tmp_path / "idx", encoder=ENC, chunking=CHUNKING)
    assert not index_is_locked(tmp_path / "idx")
    StoreWriter(tmp_path / "idx", encoder=ENC, chunking=CHUNKING).close()  # released: usable again


def test_uncommitted_writes_leave_the_previous_index_intact(tmp_path):
    _write(tmp_path / "idx", _records(2, 2))
    w = StoreWriter(tmp_path / "idx", encoder=ENC, chunking=CHUNKING, rebuild=True)
    new = _records(3, 3, tag="new")
    hashes = [c.content_hash for r in new for c in r.chunks]
    w.add_vectors(hashes[:4], np.stack([_vector_for(h) for h in hashes[:4]]))
    # like a kill -9 here: the writer never commits
    with Store.open(tmp_path / "idx", device="cpu") as store:
        assert store.count == 4 and store.generation == 1
        assert store.hits(_vector_for("h1-0"), 1)[0].chunk_id == "file1.txt#0"
    w.close()
    with StoreWriter(tmp_path / "idx", encoder=ENC, chunking=CHUNKING, rebuild=False) as w2:
        # a normal run after an abandoned rebuild keeps working on the committed vectors
        assert w2.missing_vectors(["h0-0", "hnew0-0"]) == {"hnew0-0"}


def test_encoder_mismatch_is_refused_unless_rebuilding(tmp_path):
    _write(tmp_path / "idx", _records(1, 2))
    other = EncoderInfo(spec="other", fingerprint="fp-other", dim=DIM)
    with pytest.raises(StoreError, match="built with encoder synthetic.*pass --model synthetic or --rebuild"):
        StoreWriter(tmp_path / "idx", encoder=other, chunking=CHUNKING)
    result = _write(tmp_path / "idx", _records(1, 2), encoder=other, rebuild=True)
    assert result.manifest["encoder"]["fingerprint"] == "fp-other"


def test_wrong_vector_shape_and_nan_are_refused(tmp_path):
    with StoreWriter(tmp_path / "idx", encoder=ENC, chunking=CHUNKING) as w:
        with pytest.raises(StoreError, match="expects dimension 16"):
            w.add_vectors(["a"], np.zeros((1, 8), np.float32))
        with pytest.raises(StoreError, match="NaN"):
            w.add_vectors(["a"], np.full((1, DIM), np.nan, np.float32))


def test_missing_and_incomplete_index(tmp_path):
    with pytest.raises(StoreError, match="no ragen index here"):
        Store.open(tmp_path / "none")
    w = StoreWriter(tmp_path / "idx", encoder=ENC, chunking=CHUNKING)
    w.close()
    with pytest.raises(StoreError, match="incomplete.*run `ragen index` again"):
        Store.open(tmp_path / "idx")


@pytest.mark.parametrize("target,damage,message", [
    ("seg-1-base.faiss", "truncate", "seg-1-base.faiss: is 4830 bytes, but 14490 were recorded"),
    ("seg-1-base.faiss", "delete", "seg-1-base.faiss: missing"),
    ("seg-1-base.faiss", "garbage", "seg-1-base.faiss: is 400 bytes"),
    ("chunks.sqlite", "garbage", "chunks.sqlite: not a readable ragen index database"),
    ("chunks.sqlite", "truncate", "chunks.sqlite: not a readable ragen index database"),
    ("manifest.json", "truncate", "manifest.json: not valid JSON"),
])
def test_corrupt_files_name_the_file_and_suggest_rebuild(tmp_path, target, damage, message):
    _write(tmp_path / "idx", _records(20, 10))
    path = tmp_path / "idx" / target
    for extra in ("chunks.sqlite-wal", "chunks.sqlite-shm"):
        (tmp_path / "idx" / extra).unlink(missing_ok=True)
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    else:
        path.write_bytes(b"this is not the file you are looking for" * 10)
    with pytest.raises(StoreError) as info:
        Store.open(tmp_path / "idx", device="cpu")
    assert message in str(info.value) and "--rebuild" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_killed_rebuild_resumes_without_re_embedding(tmp_path):
    _write(tmp_path / "idx", _records(2, 2))
    new = _records(3, 3, tag="new")
    hashes = [c.content_hash for r in new for c in r.chunks]
    w = StoreWriter(tmp_path / "idx", encoder=ENC, chunking=CHUNKING, rebuild=True)
    w.add_vectors(hashes[:4], np.stack([_vector_for(h) for h in hashes[:4]]))
    w.close()  # killed before commit
    with StoreWriter(tmp_path / "idx", encoder=ENC, chunking=CHUNKING, rebuild=True) as again:
        assert again.missing_vectors(hashes) == set(hashes[4:])  # the first four survived the kill


def test_leftover_files_of_killed_writes_are_removed_and_nothing_else(tmp_path):
    """A commit killed between writing its files and the switch leaves recorded names: the next writer
    deletes exactly those, and keeps every file it did not create (even ones named like its own)."""
    import subprocess
    import sys
    from pathlib import Path

    idx = tmp_path / "idx"
    _write(idx, _records(1, 2))
    script = f"""
import os, sys, numpy as np
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
import ragen.store.writer as s
from tests.test_store import _records, _write
def killed(path):
    (path.parent / ("." + path.name + ".tmp")).write_bytes(b"partial")
    os._exit(9)  # like kill -9 after the FAISS file is written, before the switch
s._full_digest = killed
_write({str(idx)!r}, _records(2, 2, tag="x"))
"""
    assert subprocess.run([sys.executable, "-c", script], timeout=120).returncode == 9
    assert (idx / "seg-2-base.faiss").exists() and (idx / ".seg-2-base.faiss.tmp").exists()
    mine = [idx / "vectors-notes.md", idx / ".draft.tmp", idx / "vectors-9.faiss", idx / "seg-9-base.faiss",
            idx / ".manifest.json.x.tmp"]
    for j in mine:
        j.write_bytes(b"user data")
    with Store.open(idx, device="cpu") as store:  # the killed commit never switched
        assert store.generation == 1 and store.count == 2
    StoreWriter(idx, encoder=ENC, chunking=CHUNKING).close()
    assert not (idx / "seg-2-base.faiss").exists() and not (idx / ".seg-2-base.faiss.tmp").exists()
    assert all(j.read_bytes() == b"user data" for j in mine)
    assert (idx / "seg-1-base.faiss").exists()
    _write(idx, _records(2, 2, tag="y"))  # a later commit retires generation 1 and still keeps the user's files
    assert not (idx / "seg-1-base.faiss").exists()
    assert all(j.read_bytes() == b"user data" for j in mine)


def test_long_lived_reader_never_mixes_generations(tmp_path):
    """Row ids are reused when files change; a reader opened before an update must not return the new
    generation's text for the old FAISS ids (it reloads instead)."""
    _write(tmp_path / "idx", _records(2, 2))
    with Store.open(tmp_path / "idx", device="cpu") as store:
        assert store.hits(_vector_for("h1-1"), 1)[0].text.endswith("1-1")
        _write(tmp_path / "idx", _records(2, 2, tag="new"))  # every chunk replaced, ids reused
        hit = store.hits(_vector_for("hnew1-1"), 1)[0]
        assert store.generation == 2
        assert hit.chunk_id == "file1.txt#1" and "new" in hit.text and hit.score > 0.99


def test_database_failures_while_writing_are_store_errors(tmp_path, monkeypatch):
    _write(tmp_path / "idx", _records(1, 2))
    with StoreWriter(tmp_path / "idx", encoder=ENC, chunking=CHUNKING) as w:
        w._conn.close()  # any sqlite failure (disk full, damaged file) surfaces like this
        with pytest.raises(StoreError, match="chunks.sqlite: .*previous index is unchanged"):
            w.missing_vectors(["x"])
