"""Benchmark pipelines with a mock encoder (milliseconds), the vector cache, reports, and instruction plumbing."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np
import pytest

from ragen.bench.data import advbench_tasks, load_advbench_ir, load_beir, load_bright, load_distractors
from ragen.bench.report import build_report, render_markdown, write_report
from ragen.encoders.base import takes_instructions
from ragen.bench.runner import (DenseRanker, RankerSpec, RunSettings, ranker_spec,
                                relative_reductions, run_benchmark, score_advbench)
from ragen.bench.synthetic import write_advbench, write_beir, write_bright
from ragen.encoders.base import Encoder
from ragen.errors import RagenError


class BagOfWords:
    """Deterministic hashed bag-of-words vectors; optionally takes ``instruction=`` like LLM2Vec-Gen."""

    def __init__(self, dim: int = 64, spec: str = "mock", seen: list | None = None) -> None:
        self._dim, self._spec = dim, spec
        self.calls: list[tuple[str, int, str | None]] = []
        self.seen = seen if seen is not None else []

    dim = property(lambda self: self._dim)
    spec = property(lambda self: self._spec)
    fingerprint = property(lambda self: f"bow-{self._dim}")

    def _vec(self, texts: Sequence[str], normalize: bool) -> np.ndarray:
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for i, t in enumerate(texts):
            self.seen.append(t)
            for w in t.lower().replace("?", " ").split():
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self._dim] += 1.0
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def encode_queries(self, texts, *, batch_size: int = 32, normalize: bool = False) -> np.ndarray:
        self.calls.append(("query", len(texts), None))
        return self._vec(texts, normalize)

    def encode_documents(self, texts, *, batch_size: int = 32, normalize: bool = False) -> np.ndarray:
        self.calls.append(("document", len(texts), None))
        return self._vec(texts, normalize)


class InstructedBagOfWords(BagOfWords):
    """Takes instructions and, like LLM2Vec-Gen, prepends them before embedding."""

    def encode_queries(self, texts, *, instruction: str | None = None, batch_size: int = 32,
                       normalize: bool = False) -> np.ndarray:
        self.calls.append(("query", len(texts), instruction))
        return self._vec([(instruction or "") + t for t in texts], normalize)

    def encode_documents(self, texts, *, instruction: str | None = None, batch_size: int = 32,
                         normalize: bool = False) -> np.ndarray:
        self.calls.append(("document", len(texts), instruction))
        return self._vec([(instruction or "") + t for t in texts], normalize)


def _spec(encoder, role, settings) -> RankerSpec:
    return RankerSpec(encoder.spec, role, lambda: DenseRanker(encoder, settings, role=role))


def test_mock_encoders_implement_the_protocol():
    assert isinstance(BagOfWords(), Encoder) and isinstance(InstructedBagOfWords(), Encoder)
    assert not takes_instructions(BagOfWords()) and takes_instructions(InstructedBagOfWords())


def test_beir_pipeline_scores_and_report(tmp_path):
    task = load_beir(write_beir(tmp_path / "beir"))
    settings = RunSettings(similarity="cos", cache_dir=tmp_path / "cache")
    results = run_benchmark("beir", [task], [_spec(BagOfWords(), "baseline", settings),
                                             ranker_spec("bm25", "baseline", settings)], settings)
    for r in results:
        m = r.tasks[task.name].metrics
        assert 0.0 < m["ndcg@10"] <= 1.0 and m["recall@100"] == 1.0 and m["queries"] == 6.0
    bow, bm25 = results
    assert bow.kind == "dense" and bm25.kind == "bm25"
    report = build_report("beir", [task], results, settings, source="synthetic", command="ragen bench beir",
                          protocol="beir/test")
    paths = write_report(report, tmp_path / "out")
    loaded = json.loads(paths["json"].read_text())
    assert loaded["headline"] == "ndcg@10" and loaded["lower_is_better"] is False
    assert loaded["versions"]["ragen"] and len(loaded["data"]["fingerprint"]) == 64
    enc = loaded["encoders"][0]
    assert enc["spec"] == "mock" and enc["fingerprint"] == "bow-64"
    assert set(enc["tasks"]["beir"]["metrics"]) >= {"ndcg@10", "recall@100", "map@100", "mrr@10"}
    q0 = enc["tasks"]["beir"]["per_query"]["q0"]
    assert q0["first_relevant_rank"] == 1 and q0["top"][0].startswith("volcano")
    assert "| `bm25` | baseline |" in paths["md"].read_text()
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import os

    mask = os.umask(0)
    os.umask(mask)
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~mask for p in paths.values())  # not mkstemp's 0600
    assert not list((tmp_path / "out").glob(".*tmp"))  # no temp files left behind


def test_advbench_pipeline_metrics_and_reductions(tmp_path):
    data = load_advbench_ir(write_advbench(tmp_path / "adv"))
    tasks = advbench_tasks(data, load_distractors(write_beir(tmp_path / "beir")))
    settings = RunSettings(similarity="dot")
    model = InstructedBagOfWords(spec="gen-model")
    results = run_benchmark("advbench-ir", tasks, [_spec(model, "model", settings),
                                                   ranker_spec("bm25", "baseline", settings)], settings)
    for r in results:
        for t in ("script", "full-chunk"):
            m = r.tasks[t].metrics
            assert [m[f"top{k}_acc"] for k in (1, 5, 20, 100)] == sorted(m[f"top{k}_acc"] for k in (1, 5, 20, 100))
            assert m["top5_any"] >= m["top5_acc"] and m["top100_acc"] == 1.0  # tiny corpus: all within 100
    reds = relative_reductions(results)
    assert {(r["model"], r["baseline"]) for r in reds} == {("gen-model", "bm25")}
    row = next(r for r in reds if r["task"] == "script" and r["metric"] == "top1_acc")
    assert row["reduction"] == pytest.approx((row["baseline_value"] - row["model_value"]) / row["baseline_value"])
    # the instruction reached the instructed encoder for documents (once, shared by both variants) and queries
    assert [c for c in model.calls if c[0] == "document"] == [("document", 18 + 7, "Summarize the following passage: ")]
    queries = [c for c in model.calls if c[0] == "query"]
    assert queries == [("query", 4, "Generate a relevant document that answers this query: ")]  # shared too
    report = build_report("advbench-ir", tasks, results, settings, source="synthetic", command="x", protocol="p")
    text = json.dumps(report)
    assert not any(chunk in text for chunk in data.chunk_texts)  # ids and ranks only, never harmful text
    assert "Relative reduction of top5_acc" in render_markdown(report)
    assert report["encoders"][0]["tasks"]["script"]["per_query"]["0"]["own_rank"] >= 1


def test_score_advbench_hand_case(tmp_path):
    data = load_advbench_ir(write_advbench(tmp_path / "adv"))
    script = advbench_tasks(data, None, ["script"])[0]
    ranking = {"0": ["h:3", "h:1"], "1": ["x", "y"], "2": ["h:5"], "3": []}
    m, per_query = score_advbench(script, ranking, ks=(1, 2))
    # chunks: q0 -> h:0..2, q1 -> h:3,4, q2 -> h:5, q3 -> h:6. Own: q0 at rank 2, q2 at rank 1, q1/q3 none
    assert m["top1_acc"] == 0.25 and m["top2_acc"] == 0.5
    # no distractors: every document is harmful, so the any-harmful share is omitted (it would read 100%)
    assert not [k for k in m if k.endswith("_any")] and "any_rank" not in per_query["0"]
    assert per_query["0"] == {"own_rank": 2, "harmful_in_top2": 2, "top": ["h:3", "h:1"]}
    mixed = advbench_tasks(data, load_distractors(write_beir(tmp_path / "beir")), ["script"])[0]
    ranking = {"0": ["d:volcano-0", "h:1"], "1": ["h:0", "x"], "2": ["d:tide-1", "d:tide-2"], "3": []}
    m, per_query = score_advbench(mixed, ranking, ks=(1, 2))
    assert m["top1_acc"] == 0.0 and m["top2_acc"] == 0.25
    assert m["top1_any"] == 0.25 and m["top2_any"] == 0.5
    assert per_query["0"] == {"own_rank": 2, "any_rank": 2, "harmful_in_top2": 1, "top": ["d:volcano-0", "h:1"]}


def test_baseline_gets_raw_text_without_instructions(tmp_path):
    task = load_beir(write_beir(tmp_path / "beir"))
    settings = RunSettings()
    plain = BagOfWords()
    DenseRanker(plain, settings).rank(task, 10)
    assert all(c[2] is None for c in plain.calls)
    assert "what about lava eruption crater?" in plain.seen and not any("Summarize" in t for t in plain.seen)


def test_bright_exclusions_never_ranked(tmp_path):
    (bio,) = load_bright(write_bright(tmp_path / "b", tasks=("biology",)), ["biology"])
    settings = RunSettings(similarity="cos")
    results = run_benchmark("bright", [bio], [_spec(BagOfWords(), "baseline", settings),
                                              ranker_spec("bm25", "baseline", settings)], settings)
    for r in results:
        per_query = r.tasks["biology"].per_query
        for qid, excluded in bio.excluded.items():
            assert not set(excluded) & set(per_query[qid]["top"])
        # the query text equals its document 0; when that one is excluded, the gold (doc 1) can lead
        assert per_query["0"]["top"][0] != "biology/volcano-0"
        assert per_query["1"]["top"][0] == "biology/orchard-0"  # not excluded ("N/A")
        assert r.suite["ndcg@10"] == r.tasks["biology"].metrics["ndcg@10"]


def test_document_vectors_cached_on_disk_and_reused(tmp_path):
    task = load_beir(write_beir(tmp_path / "beir"))
    settings = RunSettings(cache_dir=tmp_path / "cache", embed_block=5)
    first = DenseRanker(InstructedBagOfWords(), settings)
    v1 = np.array(first.document_vectors(task))
    assert first.embedded_docs == 18
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npy")
    meta = json.loads((tmp_path / "cache" / files[0]).read_text())
    assert meta["documents"] == 18 and meta["instruction"] == "Summarize the following passage: "
    second_enc = InstructedBagOfWords()
    second = DenseRanker(second_enc, settings)
    np.testing.assert_array_equal(np.asarray(second.document_vectors(task)), v1)
    assert second.embedded_docs == 0 and not second_enc.calls
    # another instruction or similarity is another cache entry
    other = load_beir(tmp_path / "beir", document_instruction="Represent: ")
    assert DenseRanker(InstructedBagOfWords(), settings).cache_key(other) != first.cache_key(task)
    assert DenseRanker(InstructedBagOfWords(), RunSettings(similarity="dot")).cache_key(task) != first.cache_key(task)
    # a corrupt cache file is ignored and rebuilt
    (tmp_path / "cache" / files[1]).write_bytes(b"garbage")
    third = DenseRanker(InstructedBagOfWords(), settings)
    np.testing.assert_array_equal(np.asarray(third.document_vectors(task)), v1)
    assert third.embedded_docs == 18


def test_bad_settings_and_specs():
    with pytest.raises(RagenError, match="similarity"):
        RunSettings(similarity="l2")
    with pytest.raises(RagenError, match="bm25 option"):
        ranker_spec("bm25:k9=1", "baseline", RunSettings())
    with pytest.raises(RagenError, match="nothing to compare"):
        run_benchmark("beir", [object()], [], RunSettings())  # type: ignore[list-item]
    with pytest.raises(RagenError, match="unknown benchmark"):
        run_benchmark("mteb", [], [], RunSettings())


def test_llm2vec_gen_gets_the_task_instructions(tmp_path, tiny_model, monkeypatch):
    """The real LLM2VecGen: query/document instructions of the task reach encode(); vectors match."""
    data = load_advbench_ir(write_advbench(tmp_path / "adv"))
    (task,) = advbench_tasks(data, None, ["script"])
    seen: list[str | None] = []
    original = tiny_model.encode

    def spy(texts, *, instruction=None, **kw):
        seen.append(instruction)
        return original(texts, instruction=instruction, **kw)

    monkeypatch.setattr(tiny_model, "encode", spy)
    ranker = DenseRanker(tiny_model, RunSettings(similarity="dot"), role="model")
    assert ranker.uses_instructions
    ranking = ranker.rank(task, 3)
    assert seen == ["Summarize the following passage: ", "Generate a relevant document that answers this query: "]
    docs = original(list(task.corpus.texts), instruction="Summarize the following passage: ")
    q = original(list(task.queries), instruction="Generate a relevant document that answers this query: ")
    expected = np.argsort(-(q @ docs[list(task.active)].T), axis=1, kind="stable")[:, :3]
    active_ids = [task.corpus.ids[i] for i in task.active]
    assert [ranking[qid] for qid in task.query_ids] == [[active_ids[j] for j in row] for row in expected]


def test_token_limit_reaches_encoders_that_take_one_and_keys_the_cache(tmp_path):
    task = load_beir(write_beir(tmp_path / "beir"))

    class Limited(InstructedBagOfWords):
        def __init__(self):
            super().__init__()
            self.limits = []

        def encode_queries(self, texts, *, instruction=None, batch_size=32, normalize=False, max_length=512):
            self.limits.append(max_length)
            return super().encode_queries(texts, instruction=instruction, batch_size=batch_size, normalize=normalize)

        def encode_documents(self, texts, *, instruction=None, batch_size=32, normalize=False, max_length=512):
            self.limits.append(max_length)
            return super().encode_documents(texts, instruction=instruction, batch_size=batch_size, normalize=normalize)

    enc = Limited()
    long_run = DenseRanker(enc, RunSettings(max_length=4096, cache_dir=tmp_path), role="model")
    default_run = DenseRanker(enc, RunSettings(cache_dir=tmp_path), role="model")
    assert long_run.cache_key(task) != default_run.cache_key(task)  # other truncation, other vectors
    long_run.rank(task, 5)
    assert set(enc.limits) == {4096}
    plain = BagOfWords()  # no max_length parameter: nothing is passed (it would raise TypeError)
    DenseRanker(plain, RunSettings(max_length=4096), role="baseline").rank(task, 5)
