"""Index types and search devices (issue 12): torch exact search where faiss has no GPU build, the
size-chosen ``auto`` index type, IVF-PQ with delta segments, tombstones and compaction."""

from __future__ import annotations

import numpy as np
import pytest

from ragen.store import IndexConfig, Store, faiss_index, normalize_rows
from tests.test_store_segments import DIM, commit, live_chunks, record, vec


def _files(n):
    return [f"file{f}.txt" for f in range(n)]


def test_torch_exact_search_equals_faiss_with_deltas_and_tombstones(tmp_path, monkeypatch):
    """`--device cuda` without faiss-gpu: flat segments are searched by torch (pointed at the CPU here),
    deleted rows stay hidden, and results equal faiss's; a later generation's new tombstones apply."""
    idx = tmp_path / "idx"
    commit(idx, [record(f) for f in range(40)], _files(40))
    commit(idx, [record(3, 1)], [p for p in _files(40) if p != "file7.txt"])  # a delta + tombstones
    monkeypatch.setattr(faiss_index, "gpu_available", lambda: False)
    monkeypatch.setattr(faiss_index, "_torch_cuda_available", lambda: True)
    monkeypatch.setattr(faiss_index, "_torch_device_for", lambda device: "cpu")
    queries = normalize_rows(np.random.default_rng(1).standard_normal((7, DIM)).astype(np.float32))
    with Store.open(idx, device="cpu") as cpu, Store.open(idx, device="cuda") as gpu:
        assert not cpu.on_gpu and gpu.on_gpu
        assert all(isinstance(s.device_index, faiss_index.TorchFlat) for s in gpu._segments)
        assert len(gpu._segments) == 2 and gpu.count == cpu.count == 40 * 5 - 5
        want_scores, want_ids = cpu.search(queries, 9)
        got_scores, got_ids = gpu.search(queries, 9)
        np.testing.assert_array_equal(got_ids, want_ids)
        np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
        dead = set(range(7 * 5, 8 * 5)) | set(range(3 * 5, 4 * 5))  # file7 deleted, file3 replaced
        assert not dead & set(got_ids.ravel().tolist())
        commit(idx, [], [p for p in _files(40) if p not in ("file7.txt", "file9.txt")])
        gpu._reload()
        assert all(isinstance(s.device_index, faiss_index.TorchFlat) for s in gpu._segments)
        _, ids = gpu.search(queries, 200)
        assert set(ids.ravel().tolist()) == set(live_chunks(idx))


def test_cuda_for_an_ivf_index_without_faiss_gpu_is_a_clear_error(tmp_path, monkeypatch):
    from ragen.errors import StoreError

    monkeypatch.setattr(faiss_index, "gpu_available", lambda: False)
    monkeypatch.setattr(faiss_index, "_torch_cuda_available", lambda: True)
    with pytest.raises(StoreError, match="ivf index .*pip install faiss-gpu"):
        faiss_index._resolve_search_device("cuda", "ivf")
    assert faiss_index._resolve_search_device("auto", "ivf") is None  # auto: CPU faiss, no error
    monkeypatch.setattr(faiss_index, "_torch_cuda_available", lambda: False)
    assert faiss_index._resolve_search_device("auto", "flat") is None
    with pytest.raises(StoreError, match="neither torch nor faiss sees a GPU"):
        faiss_index._resolve_search_device("cuda:1", "flat")


def test_auto_chooses_by_size_and_trains_on_a_sample():
    auto = IndexConfig("auto")
    assert faiss_index.resolve_kind(50, auto) == "flat"
    assert faiss_index.resolve_kind(faiss_index.AUTO_FLAT_MAX, auto) == "flat"
    assert faiss_index.resolve_kind(faiss_index.AUTO_FLAT_MAX + 1, auto) == "ivf"
    assert faiss_index.resolve_kind(faiss_index.AUTO_IVF_MAX + 1, auto) == "ivfpq"
    assert faiss_index.resolve_kind(5000, IndexConfig("ivfpq")) == "ivf"  # too few vectors for PQ codebooks
    assert faiss_index.resolve_kind(60, IndexConfig("ivfpq")) == "flat"
    for n in (10_000_000, 2_000_000):
        sample = faiss_index.ivf_sample_size(n, auto)
        nlist = faiss_index.ivf_lists(n, auto)
        assert 39 * nlist <= sample <= 600_000 < n  # enough per list, never k-means on all vectors
    assert faiss_index.bytes_per_vector("flat", 1024, auto) == 4104
    assert faiss_index.bytes_per_vector("ivfpq", 1024, auto) == 256 + 8  # dim / 4 bytes of code + the id
    assert faiss_index.pq_subquantizers(1000, IndexConfig("ivfpq", pq_m=64)) == 50  # a divisor of dim


def test_auto_index_is_rechosen_at_each_base_build(tmp_path, monkeypatch):
    monkeypatch.setattr(faiss_index, "AUTO_FLAT_MAX", 300)
    idx = tmp_path / "idx"
    auto = IndexConfig("auto")
    result = commit(idx, [record(f) for f in range(40)], _files(40), auto)
    assert result.index_kind == "flat"
    assert result.manifest["index"]["config"]["kind"] == "auto"
    assert result.manifest["index"]["bytes_per_vector"] == 4 * DIM + 8
    # 40 more files: past the compaction ratio, so the base is rebuilt, now over 400 vectors: IVF
    result = commit(idx, [record(f) for f in range(40, 80)], _files(80), auto)
    assert result.index_kind == "ivf"
    with Store.open(idx, device="cpu") as store:
        assert store.manifest["index"]["kind"] == "ivf" and store.count == 400


def _recall(idx, k=10):
    rows = live_chunks(idx)
    ids = np.array(sorted(rows), dtype=np.int64)
    matrix = normalize_rows(np.stack([vec(rows[i]) for i in ids]))
    queries = normalize_rows(np.random.default_rng(3).standard_normal((30, DIM)).astype(np.float32))
    truth = ids[np.argsort(-(queries @ matrix.T), axis=1)[:, :k]]
    with Store.open(idx, device="cpu") as store:
        scores, got = store.search(queries, k)
    assert set(got.ravel().tolist()) <= set(rows)  # never a deleted or replaced row
    position = {int(r): i for i, r in enumerate(ids)}
    exact = np.take_along_axis(queries @ matrix.T, np.vectorize(position.get)(got), axis=1)
    np.testing.assert_allclose(scores, exact, atol=1e-5)  # IVF-PQ candidates are re-ranked exactly
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    return np.mean([len(set(a) & set(b)) / k for a, b in zip(got, truth)])


@pytest.mark.parametrize("opq", [False, pytest.param(True, marks=pytest.mark.slow)])  # OPQ trains ~30 s
def test_ivfpq_with_deltas_tombstones_and_compaction_without_retraining(tmp_path, monkeypatch, opq):
    import faiss

    idx = tmp_path / "idx"
    config = IndexConfig("ivfpq", pq_m=8, ivf_nlist=16, ivf_nprobe=16, opq=opq)
    files = [record(f, per_file=100) for f in range(110)]  # 11,000 vectors: enough for PQ codebooks
    result = commit(idx, files, _files(110), config)
    assert result.index_kind == "ivfpq"
    assert result.manifest["index"]["bytes_per_vector"] == 8 + 8 and result.manifest["index"]["pq_m"] == 8
    base = idx / "seg-1-base.faiss"
    assert base.stat().st_size < 11_000 * 4 * DIM  # codes, not the float32 vectors
    assert _recall(idx) > 0.9
    trained = [faiss.IndexIVFPQ.train, faiss.OPQMatrix.train, faiss.Clustering.train]

    def refuse(*args, **kwargs):
        raise AssertionError("trained again")

    for cls in (faiss.IndexIVFPQ, faiss.OPQMatrix, faiss.Clustering):
        monkeypatch.setattr(cls, "train", refuse)
    # a one-file update: a flat delta + tombstones, the base untouched
    commit(idx, [record(5, 1, per_file=100)], [p for p in _files(110) if p != "file9.txt"], config)
    assert base.exists() and len(list(idx.glob("seg-*-delta.faiss"))) == 1
    assert _recall(idx) > 0.9
    # past the compaction ratio: the base is rebuilt from the database with the recorded training
    result = commit(idx, [record(f, 2, per_file=100) for f in range(40)], [p for p in _files(110) if p != "file9.txt"],
                    config)
    assert result.index_kind == "ivfpq"
    assert not base.exists() and not list(idx.glob("seg-*-delta.faiss"))
    assert _recall(idx) > 0.9
    with Store.open(idx, device="cpu") as store:
        assert store.count == 110 * 100  # file9 came back with the 40 updated files
    for cls, train in zip((faiss.IndexIVFPQ, faiss.OPQMatrix, faiss.Clustering), trained):
        monkeypatch.setattr(cls, "train", train)


def test_an_ivf_that_outgrew_its_lists_is_trained_again_at_compaction(tmp_path, monkeypatch):
    import faiss

    idx = tmp_path / "idx"
    config = IndexConfig("ivf")
    commit(idx, [record(f) for f in range(80)], _files(80), config)  # 400 vectors: 10 lists
    nlist = faiss.downcast_index(faiss.read_index(str(idx / "seg-1-base.faiss"))).nlist
    trained = []
    real_train = faiss.IndexIVFFlat.train
    monkeypatch.setattr(faiss.IndexIVFFlat, "train", lambda self, x: trained.append(len(x)) or real_train(self, x))
    commit(idx, [record(f) for f in range(80, 90)], _files(90), config)  # small growth: same lists
    assert trained == []
    result = commit(idx, [record(f) for f in range(90, 600)], _files(600), config)  # 3,000 vectors: compaction
    assert result.index_kind == "ivf" and len(trained) == 1
    base = next(idx.glob("seg-*-base.faiss"))
    assert faiss.downcast_index(faiss.read_index(str(base))).nlist >= 2 * nlist
