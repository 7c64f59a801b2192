"""Exact blocked top-k search: equal to a full sort, independent of block size, exclusions honoured."""

from __future__ import annotations

import numpy as np
import pytest

from ragen.bench.search import topk_from_scores, topk_inner_product
from ragen.errors import RagenError


def _brute(q, d, k, exclude=None, active=None):
    s = q @ d.T
    if active is not None:
        s[:, ~active] = -np.inf
    if exclude is not None:
        for row, cols in enumerate(exclude):
            s[row, cols] = -np.inf
    idx = np.stack([np.lexsort((np.arange(d.shape[0]), -row))[:k] for row in s])
    top = np.take_along_axis(s, idx, 1)
    return top, np.where(np.isneginf(top), -1, idx)


@pytest.mark.parametrize("block", [1, 7, 64, 10_000])
def test_matches_full_sort_for_any_block_size(block):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((9, 16)).astype(np.float32)
    d = rng.standard_normal((200, 16)).astype(np.float32)
    s, i = topk_inner_product(q, d, 10, block_size=block)
    bs, bi = _brute(q, d, 10)
    np.testing.assert_array_equal(i, bi)
    np.testing.assert_allclose(s, bs, rtol=1e-5)


def test_ties_go_to_the_lower_index_across_blocks():
    d = np.tile(np.array([[1.0, 0.0]], dtype=np.float32), (12, 1))  # twelve identical documents
    d[3] = [2.0, 0.0]
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    for block in (1, 5, 100):
        _, i = topk_inner_product(q, d, 4, block_size=block)
        assert i.tolist() == [[3, 0, 1, 2]]


def test_exclusions_and_active_mask_never_rank_and_pad_when_short():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((3, 8)).astype(np.float32)
    d = rng.standard_normal((30, 8)).astype(np.float32)
    best = (q @ d.T).argmax(axis=1)
    exclude = [[int(best[0])], [], list(range(25))]
    active = np.ones(30, dtype=bool)
    active[10:12] = False
    s, i = topk_inner_product(q, d, 8, exclude=exclude, active=active, block_size=4)
    bs, bi = _brute(q, d, 8, exclude=exclude, active=active)
    np.testing.assert_array_equal(i, bi)
    assert best[0] not in i[0]
    assert not set(i.ravel()) & {10, 11}
    # query 2 sees only documents 25..29: 5 results, then -1 padding with -inf scores
    assert sorted(i[2, :5].tolist()) == [25, 26, 27, 28, 29]
    assert i[2, 5:].tolist() == [-1, -1, -1] and np.isneginf(s[2, 5:]).all()


def test_k_larger_than_corpus_pads():
    q = np.ones((2, 4), dtype=np.float32)
    d = np.eye(4, dtype=np.float32)[:3]
    s, i = topk_inner_product(q, d, 5)
    assert i.shape == (2, 5) and i[0, 3:].tolist() == [-1, -1]


def test_reads_a_memmapped_npy_block_by_block(tmp_path):
    rng = np.random.default_rng(2)
    d = rng.standard_normal((500, 12)).astype(np.float32)
    np.save(tmp_path / "d.npy", d)
    mm = np.load(tmp_path / "d.npy", mmap_mode="r")
    q = rng.standard_normal((4, 12)).astype(np.float32)
    seen = []
    _, i = topk_inner_product(q, mm, 7, block_size=128, progress=seen.append)
    np.testing.assert_array_equal(i, _brute(q, d, 7)[1])
    assert seen == [128, 128, 128, 116]


def test_bad_inputs_raise_ragen_errors():
    q = np.ones((2, 4), dtype=np.float32)
    with pytest.raises(RagenError, match="width"):
        topk_inner_product(q, np.ones((3, 5), dtype=np.float32), 2)
    with pytest.raises(RagenError, match="NaN"):
        topk_inner_product(np.full((1, 4), np.nan, dtype=np.float32), np.ones((3, 4), dtype=np.float32), 2)
    bad_docs = np.ones((3, 4), dtype=np.float32)
    bad_docs[1, 2] = np.inf
    with pytest.raises(RagenError, match="document vectors"):
        topk_inner_product(q, bad_docs, 2)
    with pytest.raises(RagenError, match="exclude"):
        topk_inner_product(q, np.ones((3, 4), dtype=np.float32), 2, exclude=[[0]])


def test_topk_from_scores_orders_and_excludes():
    scores = np.array([0.5, 2.0, 2.0, 0.0, 1.0])
    s, i = topk_from_scores(scores, 4, exclude=[2])
    assert i.tolist() == [1, 4, 0, 3]
    s, i = topk_from_scores(scores, 7)
    assert i.tolist() == [1, 2, 4, 0, 3, -1, -1]
