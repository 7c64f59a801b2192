"""Retrieval metrics as pure functions over plain dicts and lists.

Conventions (those of trec_eval / pytrec_eval and ranx, against which the tests cross-check):

- ``qrels``: ``{query_id: {doc_id: relevance}}``; a document is relevant when its relevance is > 0.
  Gains are linear in the relevance grade (Järvelin & Kekäläinen nDCG, as in trec_eval's ``ndcg_cut``).
- a *ranking* is the ordered list of document ids retrieved for one query, best first; ``k`` cuts it.
- recall@k and AP@k divide by the number of relevant documents of the query (retrieved or not).
- a query with no relevant document is left out of the mean (trec_eval does the same); a query in qrels
  that is missing from the run counts as an empty ranking (score 0).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

from ..errors import RagenError

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Sequence[str]]

METRIC_NAMES = ("ndcg", "recall", "map", "mrr", "precision", "hit")


def ndcg_at_k(relevance: Mapping[str, int], ranked: Sequence[str], k: int) -> float:
    """nDCG@k with linear gains; 0.0 when the query has no relevant document."""
    gains = sorted((r for r in relevance.values() if r > 0), reverse=True)[:k]
    ideal = sum(g / math.log2(i + 2) for i, g in enumerate(gains))
    if ideal == 0.0:
        return 0.0
    dcg = 0.0
    for i, doc in enumerate(ranked[:k]):
        rel = relevance.get(doc, 0)
        if rel > 0:
            dcg += rel / math.log2(i + 2)
    return dcg / ideal


def _relevant(relevance: Mapping[str, int]) -> set[str]:
    return {d for d, r in relevance.items() if r > 0}


def recall_at_k(relevance: Mapping[str, int], ranked: Sequence[str], k: int) -> float:
    rel = _relevant(relevance)
    if not rel:
        return 0.0
    return len(rel.intersection(ranked[:k])) / len(rel)


def precision_at_k(relevance: Mapping[str, int], ranked: Sequence[str], k: int) -> float:
    """Relevant documents in the top k divided by k (trec_eval's P_k: a short list is not rewarded)."""
    rel = _relevant(relevance)
    return sum(1 for d in ranked[:k] if d in rel) / k


def average_precision(relevance: Mapping[str, int], ranked: Sequence[str], k: int) -> float:
    """AP@k: mean of precision at each relevant rank within the top k, over all relevant documents."""
    rel = _relevant(relevance)
    if not rel:
        return 0.0
    hits, total = 0, 0.0
    for i, doc in enumerate(ranked[:k]):
        if doc in rel:
            hits += 1
            total += hits / (i + 1)
    return total / len(rel)


def reciprocal_rank(relevance: Mapping[str, int], ranked: Sequence[str], k: int) -> float:
    rank = first_hit_rank(ranked[:k], _relevant(relevance))
    return 0.0 if rank is None else 1.0 / rank


def hit_at_k(relevance: Mapping[str, int], ranked: Sequence[str], k: int) -> float:
    """1.0 when any relevant document is in the top k (ranx's ``hit_rate``, BEIR's ``success``)."""
    return 1.0 if first_hit_rank(ranked[:k], _relevant(relevance)) is not None else 0.0


def first_hit_rank(ranked: Sequence[str], targets: Collection[str]) -> int | None:
    """1-based rank of the first document of ``targets`` in ``ranked``; ``None`` if none is there."""
    for i, doc in enumerate(ranked):
        if doc in targets:
            return i + 1
    return None


_FUNCS = {"ndcg": ndcg_at_k, "recall": recall_at_k, "map": average_precision, "mrr": reciprocal_rank,
          "precision": precision_at_k, "hit": hit_at_k}


def parse_metric(name: str) -> tuple[str, int]:
    """``"ndcg@10"`` -> ``("ndcg", 10)``. A bare name (``"map"``) means a cut-off of 1000."""
    base, sep, cut = name.strip().lower().partition("@")
    if base not in _FUNCS:
        raise RagenError(f"unknown metric {name!r}; expected one of {', '.join(METRIC_NAMES)} with an optional @k")
    if not sep:
        return base, 1000
    if not cut.isdigit() or int(cut) < 1:
        raise RagenError(f"metric {name!r}: the cut-off after '@' must be a positive integer")
    return base, int(cut)


def evaluate_run(qrels: Qrels, run: Run, metrics: Sequence[str]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Score a run: ``(mean per metric, {query_id: {metric: value}})``.

    Only queries with at least one relevant document are scored and averaged.
    """
    parsed = [(m, *parse_metric(m)) for m in metrics]
    per_query: dict[str, dict[str, float]] = {}
    for qid, relevance in qrels.items():
        if not any(r > 0 for r in relevance.values()):
            continue
        ranked = list(run.get(qid, ()))
        per_query[qid] = {label: _FUNCS[base](relevance, ranked, k) for label, base, k in parsed}
    n = len(per_query)
    means = {label: (sum(q[label] for q in per_query.values()) / n if n else 0.0) for label, _, _ in parsed}
    return means, per_query


def topk_share(ranks: Sequence[int | None], k: int) -> float:
    """Share of queries whose (first) target sits at rank <= k; ``None`` = not retrieved."""
    if not ranks:
        return 0.0
    return sum(1 for r in ranks if r is not None and r <= k) / len(ranks)


def relative_reduction(model_value: float, baseline_value: float) -> float | None:
    """``(baseline - model) / baseline``: 0.2 means the model retrieves 20% less; ``None`` if baseline is 0."""
    if baseline_value == 0:
        return None
    return (baseline_value - model_value) / baseline_value


def random_ndcg_at_k(qrels: Qrels, searchable: Collection[str], k: int = 10,
                     excluded: Mapping[str, Collection[str]] | None = None) -> float:
    """Expected nDCG@k of a uniformly random ranking (the floor a broken encoder sits on), averaged like
    :func:`evaluate_run` over queries with a relevant document.

    ``searchable``: the document ids every query is ranked against; ``excluded[q]``: ids never ranked for q.
    Each rank holds each of the N eligible documents with probability 1/N, so
    E[DCG@k] = (sum of the eligible relevant gains / N) * sum_{i < min(k, N)} 1/log2(i+2)."""
    excluded = excluded or {}
    docs = searchable if isinstance(searchable, (set, frozenset)) else set(searchable)
    values = []
    for qid, relevance in qrels.items():
        gains = sorted((r for r in relevance.values() if r > 0), reverse=True)
        if not gains:
            continue
        skip = {d for d in excluded.get(qid, ()) if d in docs}
        n = len(docs) - len(skip)
        ideal = sum(g / math.log2(i + 2) for i, g in enumerate(gains[:k]))
        inside = sum(r for d, r in relevance.items() if r > 0 and d in docs and d not in skip)
        discount = sum(1 / math.log2(i + 2) for i in range(min(k, n)))
        values.append(inside / n * discount / ideal if n > 0 else 0.0)
    return sum(values) / len(values) if values else 0.0


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


__all__ = ["Qrels", "Run", "ndcg_at_k", "recall_at_k", "precision_at_k", "average_precision", "reciprocal_rank",
           "hit_at_k", "first_hit_rank", "parse_metric", "evaluate_run", "topk_share", "relative_reduction", "mean", "random_ndcg_at_k"]
