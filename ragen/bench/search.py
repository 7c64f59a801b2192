"""Exact top-k inner-product search over a corpus too large to score in one matrix.

The document matrix may be a read-only ``np.memmap`` (a cached ``.npy``): it is read ``block_size`` rows
at a time and each block's scores are merged into a running top-k, so memory stays at
``O(n_queries * (k + block_size))`` whatever the corpus size. Ordering is exact and deterministic:
score descending, then document index ascending, independent of the block size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..errors import RagenError

NEG_INF = np.float32(-np.inf)


def _select_topk(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top-k of ``scores`` (n, m) with ties broken by smaller id; returns sorted (n, k') arrays."""
    n, m = scores.shape
    if m > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (n, k), unordered, ties at the edge arbitrary
        cand_s = np.take_along_axis(scores, part, axis=1)
        cand_i = np.take_along_axis(ids, part, axis=1)
        kth = cand_s.min(axis=1, keepdims=True)  # (n, 1)
        # Rows where more documents share the k-th score than made it in: decide those ties by id.
        tied = (scores >= kth).sum(axis=1) > k
        for row in np.flatnonzero(tied):
            order = np.lexsort((ids[row], -scores[row]))[:k]
            cand_s[row], cand_i[row] = scores[row, order], ids[row, order]
    else:
        cand_s, cand_i = scores, ids
    order = np.lexsort((cand_i, -cand_s), axis=-1)  # (n, k'): score desc, id asc
    return np.take_along_axis(cand_s, order, axis=1), np.take_along_axis(cand_i, order, axis=1)


def topk_inner_product(
    queries: np.ndarray,
    docs: np.ndarray,
    k: int,
    *,
    exclude: Sequence[Sequence[int]] | None = None,
    active: np.ndarray | None = None,
    block_size: int = 16384,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: ``(scores, indices)``, both ``(n_queries, k)``, best first.

    ``exclude[q]`` lists document indices query ``q`` must never see (not ranked, never occupying a rank);
    ``active`` (bool, ``(n_docs,)``) restricts the whole search to a subset of the rows. Where fewer than
    ``k`` documents are eligible, the tail is padded with index ``-1`` and score ``-inf``.
    ``progress`` is called with the number of document rows finished after each block.
    """
    if queries.ndim != 2 or docs.ndim != 2 or queries.shape[1] != docs.shape[1]:
        raise RagenError(f"query vectors {queries.shape} and document vectors {docs.shape} do not match in width")
    if k < 1:
        raise RagenError(f"k must be >= 1, got {k}")
    n_q, n_docs = queries.shape[0], docs.shape[0]
    if exclude is not None and len(exclude) != n_q:
        raise RagenError(f"exclude has {len(exclude)} entries for {n_q} queries")
    if active is not None and active.shape != (n_docs,):
        raise RagenError(f"active mask has shape {active.shape}, expected ({n_docs},)")
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if not np.all(np.isfinite(q)):
        raise RagenError("query vectors contain NaN or inf; the encoder produced invalid embeddings")
    best_s = np.full((n_q, 0), NEG_INF, dtype=np.float32)
    best_i = np.full((n_q, 0), -1, dtype=np.int64)
    excl_rows: list[np.ndarray] = []
    excl_cols: list[np.ndarray] = []
    if exclude is not None:
        for row, cols in enumerate(exclude):
            if len(cols):
                c = np.asarray(cols, dtype=np.int64)
                excl_rows.append(np.full(len(c), row, dtype=np.int64))
                excl_cols.append(c)
    ex_r = np.concatenate(excl_rows) if excl_rows else np.zeros(0, dtype=np.int64)
    ex_c = np.concatenate(excl_cols) if excl_cols else np.zeros(0, dtype=np.int64)

    for start in range(0, n_docs, block_size):
        stop = min(start + block_size, n_docs)
        block = np.asarray(docs[start:stop], dtype=np.float32)  # (b, dim), read from disk when memmapped
        if not np.all(np.isfinite(block)):
            raise RagenError(f"document vectors {start}..{stop - 1} contain NaN or inf; the encoder produced "
                             "invalid embeddings (or a cached vector file is corrupt)")
        scores = q @ block.T  # (n_q, b)
        if active is not None:
            scores[:, ~active[start:stop]] = NEG_INF
        if ex_c.size:
            sel = (ex_c >= start) & (ex_c < stop)
            scores[ex_r[sel], ex_c[sel] - start] = NEG_INF
        ids = np.broadcast_to(np.arange(start, stop, dtype=np.int64), scores.shape)
        best_s, best_i = _select_topk(np.concatenate([best_s, scores], axis=1),
                                      np.concatenate([best_i, ids], axis=1), k)
        if progress is not None:
            progress(stop - start)
    best_i = np.where(np.isneginf(best_s), -1, best_i)
    if best_s.shape[1] < k:  # corpus smaller than k
        pad = k - best_s.shape[1]
        best_s = np.concatenate([best_s, np.full((n_q, pad), NEG_INF, dtype=np.float32)], axis=1)
        best_i = np.concatenate([best_i, np.full((n_q, pad), -1, dtype=np.int64)], axis=1)
    return best_s, best_i


def topk_from_scores(scores: np.ndarray, k: int, *, exclude: Sequence[int] = (), active: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of one query's full score vector (e.g. BM25), same ordering and padding as above."""
    s = np.asarray(scores, dtype=np.float32).copy()
    if active is not None:
        s[~active] = NEG_INF
    if len(exclude):
        s[np.asarray(exclude, dtype=np.int64)] = NEG_INF
    best_s, best_i = _select_topk(s[None, :], np.arange(len(s), dtype=np.int64)[None, :], min(k, len(s)))
    best_s, best_i = best_s[0], best_i[0]
    best_i = np.where(np.isneginf(best_s), -1, best_i)
    if len(best_s) < k:
        best_s = np.concatenate([best_s, np.full(k - len(best_s), NEG_INF, dtype=np.float32)])
        best_i = np.concatenate([best_i, np.full(k - len(best_i), -1, dtype=np.int64)])
    return best_s, best_i


__all__ = ["topk_inner_product", "topk_from_scores"]
