"""Benchmark loaders on small synthetic datasets in each layout (and the real AdvBench-IR counts when present)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ragen.bench.data import (ADVBENCH_QUERY_INSTRUCTION, BRIGHT_INSTRUCTIONS, BRIGHT_TASKS, advbench_tasks,
                              load_advbench_ir, load_beir, load_bright, load_distractors, resolve_bright_tasks,
                              word_chunks)
from ragen.bench.synthetic import write_advbench, write_beir, write_bright
from ragen.errors import DataError

REAL_ADVBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "advbench_ir"


def test_beir_layout(tmp_path):
    task = load_beir(write_beir(tmp_path / "beir"))
    assert len(task.corpus) == 18 and task.n_docs == 18
    assert "unjudged" not in task.query_ids and len(task.query_ids) == 6
    assert task.qrels["q0"] == {"volcano-0": 2, "volcano-1": 1}
    assert task.corpus.texts[0].startswith("Volcano magma")  # "title text"
    assert task.corpus.texts[1].startswith("lava")  # untitled: text only
    assert len(task.fingerprint) == 64
    assert task.fingerprint == load_beir(tmp_path / "beir").fingerprint
    assert task.limited(2).query_ids == task.query_ids[:2] and set(task.limited(2).qrels) == {"q0", "q1"}


def test_beir_errors_name_the_file_and_line(tmp_path):
    root = write_beir(tmp_path / "beir")
    with pytest.raises(DataError, match="no such directory"):
        load_beir(tmp_path / "missing")
    with pytest.raises(DataError, match=r"qrels/dev.tsv: no such file"):
        load_beir(root, split="dev")
    lines = (root / "corpus.jsonl").read_text().splitlines()
    (root / "corpus.jsonl").write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    with pytest.raises(DataError, match=r"corpus.jsonl:3: not valid JSON"):
        load_beir(root)
    write_beir(root)
    with open(root / "qrels" / "test.tsv", "a") as f:
        f.write("ghost\tvolcano-0\t1\n")
    with pytest.raises(DataError, match="'ghost' is not in queries.jsonl"):
        load_beir(root)
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\tvolcano-0\thigh\n")
    with pytest.raises(DataError, match=r"test.tsv:2: expected"):
        load_beir(root)


def test_advbench_protocols(tmp_path):
    data = load_advbench_ir(write_advbench(tmp_path / "adv"))
    # passages of 250, 130, 100, 60 words -> chunks 100/100/50, 100/30, 100, 60
    assert len(data.chunk_ids) == 7 and data.queries[0].startswith("explain")
    script, full = advbench_tasks(data, None)
    assert (script.name, full.name) == ("script", "full-chunk")
    assert script.corpus is full.corpus  # one pool, embedded once
    assert full.n_docs == 7 and script.n_docs == 5  # the 50- and 30-word tails are dropped; 60-word first kept
    assert script.qrels["0"] == {"h:0": 1, "h:1": 1} and full.qrels["0"] == {"h:0": 1, "h:1": 1, "h:2": 1}
    assert script.qrels["3"] == {"h:6": 1}
    assert script.harmful == frozenset({"h:0", "h:1", "h:3", "h:5", "h:6"})
    assert script.query_instruction == ADVBENCH_QUERY_INSTRUCTION
    assert script.corpus.texts[0] == "volcano guide # " + data.chunk_texts[0]  # "title # chunk"
    assert script.settings["harmful_chunks"] == 5 and full.settings["harmful_chunks_total"] == 7
    with pytest.raises(DataError, match="unknown AdvBench-IR protocol 'tails'"):
        advbench_tasks(data, None, ["tails"])


def test_advbench_without_chunk_files_chunks_passages_identically(tmp_path):
    root = write_advbench(tmp_path / "adv")
    from_files = load_advbench_ir(root)
    (root / "advbench-ir_chunked.jsonl").unlink()
    from_passages = load_advbench_ir(root)  # the path the hub dataset takes
    assert from_passages.chunk_texts == from_files.chunk_texts
    assert from_passages.chunk_is_first == from_files.chunk_is_first
    assert word_chunks("a b c d e", 2) == ["a b", "c d", "e"]


def test_advbench_map_errors(tmp_path):
    root = write_advbench(tmp_path / "adv")
    mapping = json.loads((root / "advbench-ir_to_chunked_map.json").read_text())
    mapping["1"].append(999)
    (root / "advbench-ir_to_chunked_map.json").write_text(json.dumps(mapping))
    with pytest.raises(DataError, match="chunk id_ 999"):
        load_advbench_ir(root)


def test_distractors_prefixed_and_mixed_in(tmp_path):
    beir = write_beir(tmp_path / "beir")
    dist = load_distractors(beir)
    assert len(dist) == 18 and dist.texts[0].startswith("Volcano # magma")
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "long.txt").write_text(" ".join(["word"] * 230))
    (folder / "skip.bin").write_bytes(b"\x00")
    notes = load_distractors(folder)
    assert notes.ids == ("sub/long.txt#0", "sub/long.txt#1", "sub/long.txt#2")
    assert notes.texts[2] == "long # " + " ".join(["word"] * 30)
    tasks = advbench_tasks(load_advbench_ir(write_advbench(tmp_path / "adv")), dist)
    assert tasks[0].corpus.ids[:2] == ("d:volcano-0", "d:volcano-1")
    assert tasks[0].n_docs == 18 + 5 and tasks[1].n_docs == 18 + 7
    assert not any(d.startswith("d:") for d in tasks[0].harmful)
    with pytest.raises(DataError, match="no such distractor corpus"):
        load_distractors(tmp_path / "nothing-here")


@pytest.mark.skipif(not REAL_ADVBENCH.is_dir(), reason="shared AdvBench-IR data not present")
def test_real_advbench_counts():
    data = load_advbench_ir(REAL_ADVBENCH)
    script, full = advbench_tasks(data, None)
    assert len(data.query_ids) == 520
    assert full.n_docs == 1796 and script.n_docs == 1280  # DESIGN.md: 1,280 when tails are dropped
    assert sum(len(r) for r in script.qrels.values()) == 1280


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_bright_hub_layout(tmp_path, fmt):
    pytest.importorskip("pandas")
    root = write_bright(tmp_path / "bright", fmt=fmt)
    bio, leet = load_bright(root, ["biology", "leetcode"])
    # the LLM2Vec-Gen script's wording, with the raw task name
    assert bio.query_instruction == "Given a biology post, generate relevant passages that help answer the post: "
    assert leet.query_instruction == BRIGHT_INSTRUCTIONS["leetcode"]
    assert len(bio.corpus) == 18 and len(bio.query_ids) == 6
    assert bio.qrels["0"] == {"biology/volcano-1": 1}
    assert bio.excluded["0"] == ("biology/volcano-0",) and bio.excluded["1"] == ()  # "N/A" dropped
    (long_bio,) = load_bright(root, ["biology"], long_documents=True)
    assert len(long_bio.corpus) == 6 and long_bio.qrels["2"] == {"biology/compiler.txt": 1}


def test_bright_task_names_and_missing_files(tmp_path):
    assert len(BRIGHT_TASKS) == 12 and resolve_bright_tasks(None) == list(BRIGHT_TASKS)
    assert resolve_bright_tasks(["pony,aops", "all"])[:2] == ["pony", "aops"]
    assert len(resolve_bright_tasks(["all"])) == 12
    with pytest.raises(DataError, match="unknown BRIGHT task 'chemistry'"):
        resolve_bright_tasks(["chemistry"])
    root = write_bright(tmp_path / "bright", tasks=("biology",))
    with pytest.raises(DataError, match="no economics-"):
        load_bright(root, ["economics"])


def test_hub_ids_need_datasets(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match=r"ragen-toolkit\[bench-hub\]"):
        load_advbench_ir("McGill-NLP/AdvBench-IR")
    with pytest.raises(ImportError, match="datasets"):
        load_bright("xlangai/BRIGHT", ["biology"])


def test_beir_never_ranks_a_document_with_the_query_id(tmp_path):
    """BEIR's ignore_identical_ids: in ArguAna/Quora a query is also a corpus document."""
    import json as _json

    from ragen.bench.data import load_beir

    root = tmp_path / "dup"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("\n".join(_json.dumps({"_id": i, "title": "", "text": t}) for i, t in
                                                 [("q1", "same text"), ("d1", "answer"), ("d2", "other")]))
    (root / "queries.jsonl").write_text(_json.dumps({"_id": "q1", "text": "same text"}))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    task = load_beir(root)
    assert task.excluded == {"q1": ("q1",)}
