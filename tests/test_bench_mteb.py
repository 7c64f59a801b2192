"""MTEB 2.x adapter: mteb's encoder protocol over ragen encoders, the reference's per-task instructions, and
``ragen bench mteb`` offline on a registered retrieval task fed from a local BEIR folder."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragen.bench.instructions import MTEB_INSTRUCTIONS
from ragen.bench.synthetic import write_beir
from ragen.cli import app
from ragen.errors import RagenError

mteb = pytest.importorskip("mteb")
runner = CliRunner()
SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MTEB_CACHE", str(tmp_path / "mteb-cache"))


def _bench(args):
    res = runner.invoke(app, ["bench", *args])
    assert res.exit_code == 0, res.output
    return res


def _same_score_as_bench_beir(tmp_path: Path, data: Path) -> tuple[float, float]:
    _bench(["mteb", "--task", "SciFact", "--data", str(data), "--baseline", "minilm", "--out", str(tmp_path / "m")])
    report = json.loads((tmp_path / "m" / "report.json").read_text())
    mteb_files = list((tmp_path / "m" / "results").glob("*/*/SciFact.json"))
    assert len(mteb_files) == 1  # mteb's own result file, next to ragen's report
    assert (tmp_path / "m" / "report.md").is_file()
    adapter = report["encoders"][0]["main_scores"]["SciFact"]["test/default"]
    assert report["main_score"]["SciFact"] == "ndcg_at_10"
    raw = json.loads(mteb_files[0].read_text())
    assert raw["scores"]["test"][0]["ndcg_at_10"] == adapter
    _bench(["beir", "--data", str(data), "--baseline", "minilm", "--out", str(tmp_path / "b"), "--no-chart"])
    beir = json.loads((tmp_path / "b" / "report.json").read_text())
    return adapter, beir["encoders"][0]["tasks"][data.name]["metrics"]["ndcg@10"]


def test_adapter_scifact_ndcg_equals_bench_beir_for_minilm(tmp_path, minilm):
    adapter, ours = _same_score_as_bench_beir(tmp_path, write_beir(tmp_path / "scifact"))
    assert adapter == pytest.approx(ours, abs=5e-6)  # mteb rounds to 5 decimals


@pytest.mark.slow
@pytest.mark.skipif(not (SCIFACT / "corpus.jsonl").is_file(), reason="SciFact (BEIR layout) not present")
def test_adapter_on_real_scifact_subset_equals_bench_beir(tmp_path, minilm):
    """20 SciFact test claims against their abstracts plus 150 others: a real corpus, seconds on a CPU.

    (It was 40 + 400: MiniLM encoding ~450 abstracts of up to 256 tokens, twice (mteb, then bench beir), was
    the whole cost of the test; a third of the corpus proves the same equality.)"""
    rng = random.Random(0)
    qrels = [ln.split("\t") for ln in (SCIFACT / "qrels" / "test.tsv").read_text().splitlines()[1:] if ln.strip()]
    claims = sorted({q for q, _, _ in qrels}, key=int)[:20]
    wanted = {d for q, d, _ in qrels if q in claims}
    corpus = [json.loads(ln) for ln in (SCIFACT / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    keep = [r for r in corpus if r["_id"] in wanted] + rng.sample([r for r in corpus if r["_id"] not in wanted], 150)
    root = tmp_path / "scifact"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
    queries = [json.loads(ln) for ln in (SCIFACT / "queries.jsonl").read_text(encoding="utf-8").splitlines()]
    (root / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries if r["_id"] in claims))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{s}\n" for q, d, s in qrels if q in claims))
    adapter, ours = _same_score_as_bench_beir(tmp_path, root)
    assert adapter == pytest.approx(ours, abs=5e-6) and adapter > 0.5


def test_llm2vec_gen_gets_the_reference_instructions(tmp_path, tiny_model, monkeypatch):
    from ragen.bench.mteb import local_retrieval_task, make_mteb_encoder

    root = write_beir(tmp_path / "scifact")
    lines = (root / "queries.jsonl").read_text().splitlines()
    lines[0] = json.dumps({"_id": "q0", "text": "  what about lava eruption crater?  "})
    (root / "queries.jsonl").write_text("\n".join(lines) + "\n")
    seen: list[tuple[str | None, list[str]]] = []
    original = tiny_model.encode

    def spy(texts, *, instruction=None, **kw):
        seen.append((instruction, list(texts)))
        return original(texts, instruction=instruction, **kw)

    monkeypatch.setattr(tiny_model, "encode", spy)
    model = make_mteb_encoder(tiny_model, spec="tiny")
    mteb.evaluate(model, [local_retrieval_task("SciFact", root)], cache=mteb.ResultCache(tmp_path / "r"),
                  show_progress_bar=False)
    by_instruction = {i: texts for i, texts in seen}
    query_instruction = MTEB_INSTRUCTIONS["SciFact"].strip() + " "
    assert set(by_instruction) == {"Summarize the following passage: ", query_instruction}
    assert "what about lava eruption crater?" in by_instruction[query_instruction]  # stripped, as the reference
    assert "Volcano magma lava eruption crater basalt ash plume tectonic vent pressure magma lava" in \
        by_instruction["Summarize the following passage: "]  # "title text", as mteb joins a corpus row
    assert model.seen_instructions == {"SciFact": MTEB_INSTRUCTIONS["SciFact"],
                                       "document": "Summarize the following passage:"}
    with pytest.raises(RagenError, match="no LLM2Vec-Gen instruction for MTEB task 'NoSuchTask'"):
        model.instruction_for("NoSuchTask", None)


def test_instruction_table_is_the_reference_generative_json():
    assert len(MTEB_INSTRUCTIONS) == 48
    assert MTEB_INSTRUCTIONS["AdvBench-IR"] == "Generate a relevant document that answers this query:"
    assert MTEB_INSTRUCTIONS["STS12"] == "Generate text that is semantically similar to this text:"


def test_cli_errors_are_one_line(tmp_path):
    root = write_beir(tmp_path / "scifact")
    for args, expected in (
        (["--task", "SciFact", "--task", "NFCorpus", "--data", str(root), "--baseline", "minilm"], "exactly one --task"),
        (["--task", "SciFact", "--data", str(root), "--baseline", "bm25"], "bm25 is not an embedding model"),
        (["--baseline", "minilm"], "give either --task"),
        (["--task", "NoSuchTaskAnywhere", "--baseline", "minilm"], "unknown MTEB task"),
    ):
        res = runner.invoke(app, ["bench", "mteb", *args])
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], \
            res.output


def test_benchmark_and_task_names_resolve_from_mteb_registry():
    from ragen.bench.mteb import resolve_tasks

    tasks = resolve_tasks(None, "MTEB(eng, v2)")
    names = {t.metadata.name for t in tasks}
    assert len(tasks) == 41 and {"ArguAna", "STS12", "Banking77Classification"} <= names
    assert names <= set(MTEB_INSTRUCTIONS)  # generative.json covers every task of MTEB(eng, v2)
    assert [t.metadata.name for t in resolve_tasks(["SciFact", "STS12"], None)] == ["SciFact", "STS12"]
    with pytest.raises(RagenError, match="unknown MTEB benchmark"):
        resolve_tasks(None, "MTEB(klingon)")


def test_tasks_are_evaluated_on_test_splits_like_the_reference():
    from ragen.bench.mteb import resolve_tasks

    tasks = {t.metadata.name: t for t in resolve_tasks(None, "MTEB(eng, v2)")}
    with_test = [t for t in tasks.values() if "test" in t.metadata.eval_splits]
    assert with_test and all(list(t.eval_splits) == ["test"] for t in with_test)
