"""Index types and search devices (issue 12): torch exact search where faiss has no GPU build, the
size-chosen ``auto`` index type, IVF-PQ with delta segments, tombstones and compaction."""

from __future__ import annotations

import numpy as np
import pytest

from ragen.store import IndexConfig, Store, faiss_index, normalize_rows
from tests.test_store_segments import DIM, assert_exact, commit, live_chunks, record, vec


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
