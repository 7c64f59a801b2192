"""Retrieval metrics: hand-computed tiny cases and a cross-check against ranx on random runs."""

from __future__ import annotations

import math
import random

import pytest

from ragen.bench.metrics import (average_precision, evaluate_run, first_hit_rank, hit_at_k, ndcg_at_k,
                                 parse_metric, precision_at_k, recall_at_k, reciprocal_rank, relative_reduction,
                                 topk_share)
from ragen.errors import RagenError


def test_ndcg_hand_computed():
    rel = {"a": 2, "b": 1, "z": 0}
    # ranking b, x, a: DCG = 1/log2(2) + 2/log2(4) = 2; IDCG = 2/log2(2) + 1/log2(3)
    assert ndcg_at_k(rel, ["b", "x", "a"], 10) == pytest.approx(2 / (2 + 1 / math.log2(3)))
    assert ndcg_at_k(rel, ["a", "b"], 10) == pytest.approx(1.0)
    assert ndcg_at_k(rel, ["b", "x", "a"], 1) == pytest.approx(1 / 2)  # IDCG@1 = 2
    assert ndcg_at_k(rel, ["z", "x"], 10) == 0.0  # grade 0 is not relevant
    assert ndcg_at_k({"z": 0}, ["z"], 10) == 0.0


def test_recall_precision_ap_rr_hand_computed():
    rel = {"a": 1, "b": 1, "c": 1, "d": 1}
    ranked = ["x", "a", "y", "b", "c"]
    assert recall_at_k(rel, ranked, 2) == 0.25
    assert recall_at_k(rel, ranked, 5) == 0.75
    assert precision_at_k(rel, ranked, 5) == pytest.approx(3 / 5)
    assert precision_at_k(rel, ["a"], 5) == pytest.approx(1 / 5)  # short list not rewarded
    # AP@5 = (1/2 + 2/4 + 3/5) / 4 relevant
    assert average_precision(rel, ranked, 5) == pytest.approx((0.5 + 0.5 + 0.6) / 4)
    assert average_precision(rel, ranked, 3) == pytest.approx(0.5 / 4)
    assert reciprocal_rank(rel, ranked, 10) == 0.5
    assert reciprocal_rank(rel, ranked, 1) == 0.0
    assert hit_at_k(rel, ranked, 1) == 0.0 and hit_at_k(rel, ranked, 2) == 1.0
    assert first_hit_rank(ranked, {"b", "c"}) == 4
    assert first_hit_rank(ranked, set()) is None


def test_evaluate_run_skips_unjudged_and_zeroes_missing():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}, "q3": {"c": 0}}
    run = {"q1": ["a", "x"], "other": ["a"]}
    means, per_query = evaluate_run(qrels, run, ["ndcg@10", "recall@1"])
    assert set(per_query) == {"q1", "q2"}  # q3 has no relevant doc
    assert per_query["q2"] == {"ndcg@10": 0.0, "recall@1": 0.0}  # missing from the run
    assert means == {"ndcg@10": 0.5, "recall@1": 0.5}


def test_parse_metric_and_errors():
    assert parse_metric("nDCG@10") == ("ndcg", 10)
    assert parse_metric("map") == ("map", 1000)
    for bad in ("ndcg@0", "ndcg@x", "bleu@10"):
        with pytest.raises(RagenError):
            parse_metric(bad)


def test_topk_share_and_relative_reduction():
    assert topk_share([1, 5, 6, None], 5) == 0.5
    assert topk_share([], 5) == 0.0
    assert relative_reduction(0.25, 0.5) == 0.5
    assert relative_reduction(0.6, 0.5) == pytest.approx(-0.2)
    assert relative_reduction(0.1, 0.0) is None


def _random_case(seed: int):
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(60)]
    qrels, run_scores = {}, {}
    for q in range(25):
        judged = rng.sample(docs, rng.randint(1, 8))
        qrels[f"q{q}"] = {d: rng.choice([0, 1, 1, 2, 3]) for d in judged}
        if not any(qrels[f"q{q}"].values()):
            qrels[f"q{q}"][judged[0]] = 1
        retrieved = rng.sample(docs, rng.randint(5, 60))
        run_scores[f"q{q}"] = {d: rng.random() for d in retrieved}  # continuous: no ties
    return qrels, run_scores


@pytest.mark.slow  # importing ranx JIT-compiles its metrics with numba (~30 s on 2 cores)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_ranx_on_random_runs(seed):
    ranx = pytest.importorskip("ranx")
    qrels, scores = _random_case(seed)
    ranking = {q: sorted(s, key=lambda d: -s[d]) for q, s in scores.items()}
    pairs = {"ndcg@10": "ndcg@10", "ndcg@3": "ndcg@3", "recall@5": "recall@5", "recall@100": "recall@100",
             "map@100": "map@100", "map@7": "map@7", "mrr@10": "mrr@10", "precision@5": "precision@5",
             "hit@3": "hit_rate@3"}
    ours_mean, ours = evaluate_run(qrels, ranking, list(pairs))
    r_qrels = ranx.Qrels({q: {d: r for d, r in rel.items() if r > 0} for q, rel in qrels.items()})
    r_run = ranx.Run(scores)
    theirs = ranx.evaluate(r_qrels, r_run, list(pairs.values()), return_mean=False, make_comparable=True)
    for i, q in enumerate(sorted(qrels)):
        for ours_name, ranx_name in pairs.items():
            idx = sorted(r_qrels.keys()).index(q)
            assert ours[q][ours_name] == pytest.approx(float(theirs[ranx_name][idx]), abs=1e-9), (q, ours_name)
    theirs_mean = ranx.evaluate(r_qrels, r_run, list(pairs.values()), make_comparable=True)
    for ours_name, ranx_name in pairs.items():
        assert ours_mean[ours_name] == pytest.approx(theirs_mean[ranx_name], abs=1e-9)
