"""Honest AdvBench-IR reports: harmful retrieval is always paired with a utility measure of the same encoder,
a near-random encoder is flagged (so "safer" cannot mean "broken"), and topK_any is omitted without distractors."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from typer.testing import CliRunner

from ragen.bench.data import advbench_tasks, beir_utility_task, distractor_utility_task, load_advbench_ir, load_distractors
from ragen.bench.metrics import ndcg_at_k, random_ndcg_at_k
from ragen.bench.report import NO_UTILITY_WARNING, build_report, render_markdown
from ragen.bench.runner import DenseRanker, RankerSpec, RunSettings, ranker_spec, run_benchmark
from ragen.bench.synthetic import write_advbench, write_beir, write_utility_beir
from ragen.cli import app
from tests.test_bench_runner import InstructedBagOfWords

runner = CliRunner()


def test_random_ndcg_is_the_mean_over_all_rankings():
    qrels = {"a": {"d1": 2, "d3": 1}, "b": {"d2": 1}, "c": {"zz": 1}}  # c: its relevant doc is not searchable
    docs = ["d0", "d1", "d2", "d3", "d4"]
    excluded = {"b": ["d4"]}
    for k in (1, 2, 10):
        brute = []
        for qid, rel in qrels.items():
            pool = [d for d in docs if d not in excluded.get(qid, [])]
            perms = list(itertools.permutations(pool))
            brute.append(sum(ndcg_at_k(rel, list(p), k) for p in perms) / len(perms))
        assert random_ndcg_at_k(qrels, docs, k, excluded) == pytest.approx(sum(brute) / len(brute))
    assert random_ndcg_at_k({"a": {"d": 1}}, ["d"], 10) == pytest.approx(1.0)
    assert math.isclose(random_ndcg_at_k({}, docs, 10), 0.0)


def test_random_tiny_checkpoint_is_flagged_near_random(tmp_path, tiny_checkpoint, monkeypatch):
    """A random checkpoint retrieves few harmful chunks; the report must not sell that as safety."""
    monkeypatch.chdir(tmp_path)
    adv = write_advbench(tmp_path / "adv")
    utility = write_utility_beir(tmp_path / "utility")
    res = runner.invoke(app, ["bench", "advbench-ir", "--data", str(adv), "--utility", str(utility),
                              "--model", str(tiny_checkpoint), "--baseline", "bm25", "--out", str(tmp_path / "out"),
                              "--no-chart"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    u = report["utility"]
    assert u["task"] == "utility" and 0 < u["random"] < 0.1 and u["queries"] == 40
    model, bm25 = u["encoders"][str(tiny_checkpoint)], u["encoders"]["bm25"]
    assert model["near_random"] is True and bm25["near_random"] is False and bm25["ndcg@10"] > 0.5
    assert any(w.startswith(f"{tiny_checkpoint}: utility near random") for w in report["warnings"])
    flat = " ".join(res.output.split())
    assert "warning:" in flat and "utility near random" in flat
    reds = [r for r in report["relative_reduction"] if r["metric"] == "top5_acc"]
    assert reds and all(r["model_near_random"] is True for r in reds)
    assert "utility" not in {r["task"] for r in report["relative_reduction"]}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "**near random: not evidence of safety**" in md and "## Utility: benign retrieval" in md
    # without distractors every document is harmful: no always-100% topK_any columns
    metrics = report["encoders"][1]["tasks"]["script"]["metrics"]
    assert "top5_acc" in metrics and not [m for m in metrics if m.endswith("_any")]
    assert any("any-harmful columns (topK_any) are omitted" in w for w in report["warnings"])


def test_without_any_utility_the_report_says_so(tmp_path):
    data = load_advbench_ir(write_advbench(tmp_path / "adv"))
    tasks = advbench_tasks(data, None, ["script"])
    settings = RunSettings(similarity="dot")
    results = run_benchmark("advbench-ir", tasks, [ranker_spec("bm25", "baseline", settings)], settings)
    report = build_report("advbench-ir", tasks, results, settings, source="s", command="c", protocol="p")
    assert report["utility"] is None and NO_UTILITY_WARNING in report["warnings"]
    assert f"**Warning:** {NO_UTILITY_WARNING}" in render_markdown(report)


def test_beir_distractors_give_a_utility_task_on_the_same_vectors(tmp_path):
    beir = write_beir(tmp_path / "beir")
    data = load_advbench_ir(write_advbench(tmp_path / "adv"))
    tasks = advbench_tasks(data, load_distractors(beir), ["script", "full-chunk"])
    useful = distractor_utility_task(tasks[0], beir)
    assert useful is not None and useful.corpus is tasks[0].corpus
    assert useful.active == tuple(range(18)) and useful.qrels["q0"] == {"d:volcano-0": 2, "d:volcano-1": 1}
    enc = InstructedBagOfWords(spec="gen")
    settings = RunSettings(similarity="dot")
    results = run_benchmark("advbench-ir", [*tasks, useful],
                            [RankerSpec("gen", "model", lambda: DenseRanker(enc, settings, role="model"))], settings)
    assert [c[0] for c in enc.calls].count("document") == 1  # the pool is embedded once for all three tasks
    assert results[0].tasks["utility"].metrics["ndcg@10"] > 0.5
    report = build_report("advbench-ir", [*tasks, useful], results, settings, source="s", command="c", protocol="p")
    assert report["utility"]["encoders"]["gen"]["near_random"] is False
    assert "top5_any" in report["encoders"][0]["tasks"]["script"]["metrics"]  # distractors: topK_any is meaningful
    assert not report["warnings"]
    # distractors without judgements (a text folder) give no utility task
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("tide moon ocean " * 50)
    plain = advbench_tasks(data, load_distractors(tmp_path / "txt"), ["script"])
    assert distractor_utility_task(plain[0], tmp_path / "txt") is None


def test_beir_utility_uses_cosine_and_the_reference_instruction(tmp_path):
    root = write_utility_beir(tmp_path / "scifact", queries=3)
    task = beir_utility_task(root)
    assert task.settings["role"] == "utility" and task.settings["similarity"] == "cos"
    assert task.query_instruction.startswith("Generate text that supports or refutes this claim.")
    assert task.document_instruction == "Summarize the following passage: "
    ranker = DenseRanker(InstructedBagOfWords(), RunSettings(similarity="dot"))
    adv = advbench_tasks(load_advbench_ir(write_advbench(tmp_path / "adv")), None, ["script"])[0]
    assert ranker.normalize_for(task) is True and ranker.normalize_for(adv) is False  # the run's dot elsewhere
