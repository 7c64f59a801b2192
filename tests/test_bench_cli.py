"""``ragen bench ...`` end to end on synthetic data: outputs written, errors as one line and exit 1."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ragen.bench.synthetic import write_advbench, write_beir, write_bright
from ragen.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """The default vector cache is ./benchmarks/results/cache: keep it out of the checkout."""
    monkeypatch.chdir(tmp_path)


def _invoke(args):
    return runner.invoke(app, ["bench", *args], catch_exceptions=False)


def test_beir_with_bm25_writes_reports(tmp_path):
    data = write_beir(tmp_path / "beir")
    res = _invoke(["beir", "--data", str(data), "--baseline", "bm25", "--out", str(tmp_path / "out"), "--no-chart"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [e["spec"] for e in report["encoders"]] == ["bm25"]  # only a baseline: no LLM2Vec-Gen model loaded
    assert report["command"].startswith("ragen bench")
    assert (tmp_path / "out" / "report.md").is_file() and not (tmp_path / "out" / "chart.png").exists()
    assert "ndcg@10" in res.output and "bm25" in res.output


def test_bright_task_selection_and_limit(tmp_path):
    data = write_bright(tmp_path / "bright", tasks=("biology", "pony"))
    res = _invoke(["bright", "--data", str(data), "--task", "biology,pony", "--baseline", "bm25",
                   "--limit-queries", "2", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(report["data"]["tasks"]) == ["biology", "pony"]
    assert report["data"]["tasks"]["pony"]["queries"] == 2
    enc = report["encoders"][0]
    assert enc["suite"]["ndcg@10"] == pytest.approx(
        (enc["tasks"]["biology"]["metrics"]["ndcg@10"] + enc["tasks"]["pony"]["metrics"]["ndcg@10"]) / 2)
    assert (tmp_path / "out" / "chart.png").is_file()
    assert "mean" in res.output


def test_advbench_model_against_baseline(tmp_path, tiny_checkpoint):
    data = write_advbench(tmp_path / "adv")
    res = _invoke(["advbench-ir", "--data", str(data), "--model", str(tiny_checkpoint), "--baseline", "bm25",
                   "--protocol", "script", "--device", "cpu", "--out", str(tmp_path / "out"), "--no-chart"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    model, bm25 = report["encoders"]
    assert model["role"] == "model" and model["instructions_applied"] is True
    assert bm25["role"] == "baseline" and bm25["instructions_applied"] is False
    assert {r["task"] for r in report["relative_reduction"]} == {"script"}
    assert model["documents_embedded"] == 7  # every chunk is pooled: one cache serves every --protocol
    assert list((tmp_path / "benchmarks" / "results" / "cache").glob("*.npy"))  # the shared default cache
    # another out dir and the other protocol: document vectors still come from the cache
    res = _invoke(["advbench-ir", "--data", str(data), "--model", str(tiny_checkpoint), "--protocol", "full-chunk",
                   "--device", "cpu", "--out", str(tmp_path / "out2"), "--no-chart"])
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "out2" / "report.json").read_text())["encoders"][0]
    assert again["documents_embedded"] == 0
    assert set(again["tasks"]) == {"full-chunk"}


@pytest.mark.parametrize("args, message", [
    (["beir", "--data", "/nonexistent/beir", "--baseline", "bm25"], "no such directory"),
    (["bright", "--data", "{data}", "--task", "chemistry", "--baseline", "bm25"], "unknown BRIGHT task"),
    (["advbench-ir", "--data", "{data}", "--protocol", "tails", "--baseline", "bm25"], "--protocol must be"),
    (["advbench-ir", "--data", "{data}", "--baseline", "bm25:k1=x"], "must be a number"),
    (["beir", "--data", "{data}", "--baseline", "nonsense:thing"], "unknown encoder spec"),
    (["beir", "--data", "{data}", "--baseline", "bm25", "--similarity", "l2"], "similarity must be"),
    (["bright", "--data", "{data}", "--baseline", "bm25", "--depth", "10"], "--depth must be at least 100"),
])
def test_bad_input_is_one_line_and_exit_1(tmp_path, args, message):
    data = write_advbench(tmp_path / "d") if "advbench-ir" in args else (
        write_bright(tmp_path / "d") if "bright" in args else write_beir(tmp_path / "d"))
    res = runner.invoke(app, ["bench", *[a.replace("{data}", str(data)) for a in args], "--out",
                              str(tmp_path / "out")])
    assert res.exit_code == 1, res.output
    assert message in res.output and "Traceback" not in res.output
