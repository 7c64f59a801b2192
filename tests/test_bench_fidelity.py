"""Bench runners against the reference's own scripts: how texts and instructions are joined, the hub
datasets' columns (from the hub and from local snapshots), and malformed data as one clear line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragen.bench.data import (advbench_tasks, bright_instruction, load_advbench_ir, load_beir, load_bright,
                              load_distractors, titled)
from ragen.bench.runner import DenseRanker, RunSettings
from ragen.bench.synthetic import TOPICS, write_beir
from ragen.cli import app
from ragen.errors import DataError
from tests.test_bench_runner import InstructedBagOfWords

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

REAL_ADVBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "advbench_ir"
runner = CliRunner()


# ----------------------------------------------------------------------------------------------------------
# the reference's joins, written out as its scripts spell them
# ----------------------------------------------------------------------------------------------------------
def advbench_reference_string(instruction: str, text: str) -> str:  # scripts/advbenchir_eval.py _batch_encode
    return instruction.strip() + " " + text.strip()


def bright_reference_query(instruction: str, query: str) -> str:  # retrievers.py retrieval_hf_llm2vecgen
    return (instruction + query).strip()


def bright_reference_document(doc: str) -> str:
    return "Summarize the following passage: " + doc.strip()


def _words(topic: str, n: int) -> str:
    vocab = TOPICS[topic].split()
    return " ".join(vocab[i % len(vocab)] for i in range(n))


def hub_advbench_rows() -> list[dict]:
    """Rows shaped exactly like McGill-NLP/AdvBench-IR's: ID, query, title, document (one string)."""
    return [
        {"ID": 0, "query": "explain volcano magma eruption\n", "title": " Volcano guide",
         "document": _words("volcano", 230)},
        {"ID": 1, "query": "  how does an orchard graft work", "title": "Orchard  notes ",
         "document": "\n" + _words("orchard", 100) + "\n"},
        {"ID": 2, "query": "write a compiler parser", "title": "Compilers", "document": _words("compiler", 60)},
    ]


def hub_wiki_rows() -> list[dict]:
    """Rows shaped exactly like McGill-NLP/AdvBench-IR-Small-Wiki-100's: ID, title, passage."""
    return [{"ID": f"{i}", "title": ("  " if i == 0 else "") + topic.title(), "passage": _words(topic, 100)}
            for i, topic in enumerate(("tide", "bakery", "glacier"))]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def snapshot(root: Path, rows: list[dict]) -> Path:
    """What `hf download --repo-type dataset NAME --local-dir root` leaves: README, .cache, data/*.parquet."""
    (root / ".cache" / "huggingface").mkdir(parents=True)
    (root / ".cache" / "huggingface" / "download.lock").write_text("x")
    (root / "README.md").write_text("---\nconfigs:\n- config_name: default\n---\n# dataset card\n")
    write_parquet(root / "data" / "train-00000-of-00001.parquet", rows)
    return root


def reference_generate_corpus(queries: list[dict], wiki: list[dict], l: int = 100):
    """scripts/advbenchir_eval.py generate_corpus, re-derived: scored chunk passages and ground truth."""
    corpus, truth = [], {}
    for q in queries:
        tokens = q["document"].split()
        for start in range(0, len(tokens), l):
            piece = tokens[start : start + l]
            if len(piece) == 100 or start == 0:
                truth.setdefault(q["ID"], []).append(len(corpus))
                corpus.append(("malicious", f'{q["title"]} # {" ".join(piece)}'))
    for w in wiki:
        corpus.append(("wiki", f'{w["title"]} # {w["passage"]}'))
    return corpus, truth


# ----------------------------------------------------------------------------------------------------------
# whitespace
# ----------------------------------------------------------------------------------------------------------
def test_advbench_texts_reach_the_encoder_as_the_reference_joins_them(tmp_path):
    rows, wiki = hub_advbench_rows(), hub_wiki_rows()
    data = load_advbench_ir(snapshot(tmp_path / "adv", rows))
    dist = load_distractors(snapshot(tmp_path / "wiki", wiki))
    (task,) = advbench_tasks(data, dist, ["script"])
    enc = InstructedBagOfWords(spec="gen")
    DenseRanker(enc, RunSettings(similarity="dot"), role="model").rank(task, 10)
    ref_corpus, _ = reference_generate_corpus(rows, wiki)
    seen_docs = set(enc.seen[: len(task.corpus)])
    expected_docs = {advbench_reference_string("Summarize the following passage:", p) for _, p in ref_corpus}
    # every scored passage the reference embeds is embedded here, character for character
    assert expected_docs <= seen_docs
    assert "Summarize the following passage: Volcano guide # magma" in " ".join(seen_docs)
    assert not any("  " in s.split(" # ")[0] for s in seen_docs if "Volcano" in s)  # no double space
    seen_queries = enc.seen[len(task.corpus):]
    assert seen_queries == [advbench_reference_string("Generate a relevant document that answers this query:", r["query"])
                            for r in rows]
    # a title's inner and trailing spaces are kept, as the reference's f-string keeps them
    assert any(s.startswith("Summarize the following passage: Orchard  notes  # ") for s in seen_docs)


@pytest.mark.skipif(not (REAL_ADVBENCH / "advbench-ir.jsonl").is_file(), reason="released AdvBench-IR not present")
def test_released_advbench_240_of_1280_scored_chunks_were_joined_differently():
    data = load_advbench_ir(REAL_ADVBENCH)
    (task,) = advbench_tasks(data, None, ["script"])
    scored = {c for c in task.harmful}
    assert len(scored) == 1280
    unstripped = {f"h:{c}": "Summarize the following passage: " + titled(t, x)
                  for c, t, x in zip(data.chunk_ids, data.chunk_titles, data.chunk_texts)}
    now = {d: task.document_instruction + t for d, t in zip(task.corpus.ids, task.corpus.texts)}
    reference = {d: advbench_reference_string("Summarize the following passage:", s[len("Summarize the following passage: "):])
                 for d, s in unstripped.items()}
    assert all(now[d] == reference[d] for d in scored)
    changed = [d for d in scored if unstripped[d] != now[d]]
    assert len(changed) == 240
    # with a byte-level BPE like Qwen3's (the fixture's tokenizer), each of those had one extra token
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(__file__).parent / "fixtures" / "llm2vec-gen-tiny" / "base")
    extra = {len(tok(unstripped[d])["input_ids"]) - len(tok(now[d])["input_ids"]) for d in changed}
    assert extra == {1}


def test_bright_queries_and_documents_join_like_the_reference(tmp_path):
    root = tmp_path / "bright"
    write_parquet(root / "examples" / "biology-00000-of-00001.parquet", [
        {"query": "  Why do cells divide?\n\n", "reasoning": "r", "id": "0", "excluded_ids": ["N/A"],
         "gold_ids_long": ["a.txt"], "gold_ids": ["a.txt_0"]},
    ])
    write_parquet(root / "documents" / "biology-00000-of-00001.parquet", [
        {"id": "a.txt_0", "content": "\n cells divide by mitosis \n"}, {"id": "b.txt_0", "content": "plants"}])
    (task,) = load_bright(root, ["biology"])
    enc = InstructedBagOfWords(spec="gen")
    DenseRanker(enc, RunSettings(), role="model").rank(task, 2)
    instruction = bright_instruction("biology")
    assert enc.seen[:2] == [bright_reference_document("\n cells divide by mitosis \n"), bright_reference_document("plants")]
    assert enc.seen[2] == bright_reference_query(instruction, "  Why do cells divide?\n\n")
    assert enc.seen[2].endswith("post:   Why do cells divide?")  # the query's leading spaces stay, as there


def test_beir_joins_like_the_reference_mteb_script(tmp_path):
    root = write_beir(tmp_path / "beir")
    lines = (root / "corpus.jsonl").read_text().splitlines()
    lines[1] = json.dumps({"_id": "volcano-1", "title": "", "text": "  lava eruption  \n"})
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    task = load_beir(root, query_instruction="Find it:", document_instruction="Summarize the following passage: ")
    assert task.corpus.texts[1] == "lava eruption"
    assert task.query_instruction + task.queries[0] == advbench_reference_string("Find it:", "what about lava eruption crater?")


# ----------------------------------------------------------------------------------------------------------
# hub datasets: the hub itself (datasets.load_dataset) and local snapshots
# ----------------------------------------------------------------------------------------------------------
def test_advbench_snapshot_and_hub_rows_give_the_reference_corpus(tmp_path, monkeypatch):
    rows, wiki = hub_advbench_rows(), hub_wiki_rows()
    from_snapshot = load_advbench_ir(snapshot(tmp_path / "adv", rows))
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(repo, config=None, *, split):
        calls.append((repo, config, split))
        table = {"McGill-NLP/AdvBench-IR": rows, "McGill-NLP/AdvBench-IR-Small-Wiki-100": wiki}[repo]
        return datasets.Dataset.from_list(table)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    from_hub = load_advbench_ir("McGill-NLP/AdvBench-IR")
    hub_wiki = load_distractors("McGill-NLP/AdvBench-IR-Small-Wiki-100")
    assert calls == [("McGill-NLP/AdvBench-IR", None, "train"), ("McGill-NLP/AdvBench-IR-Small-Wiki-100", None, "train")]
    assert from_hub.chunk_texts == from_snapshot.chunk_texts and from_hub.queries == from_snapshot.queries
    assert from_hub.query_ids == ("0", "1", "2")
    snap_wiki = load_distractors(snapshot(tmp_path / "wiki", wiki))
    assert snap_wiki.texts == hub_wiki.texts and snap_wiki.ids == ("0", "1", "2")
    (task,) = advbench_tasks(from_hub, hub_wiki, ["script"])
    ref_corpus, truth = reference_generate_corpus(rows, wiki)
    ours = sorted(task.document_instruction + task.corpus.texts[i] for i in task.active)
    assert ours == sorted(advbench_reference_string("Summarize the following passage:", p) for _, p in ref_corpus)
    assert {q: len(r) for q, r in task.qrels.items()} == {str(q): len(v) for q, v in truth.items()}


def test_snapshot_split_and_errors(tmp_path):
    root = tmp_path / "adv"
    write_parquet(root / "data" / "test-00000-of-00001.parquet", hub_advbench_rows())
    with pytest.raises(DataError, match="no 'train' split"):
        load_advbench_ir(root)
    write_parquet(root / "data" / "train-00000-of-00001.parquet", hub_advbench_rows()[:1])
    assert load_advbench_ir(root).query_ids == ("0",)  # only the train split is read
    bad = tmp_path / "bad"
    (bad / "data").mkdir(parents=True)
    (bad / "data" / "train-00000-of-00001.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"train-00000-of-00001.parquet: cannot read parquet"):
        load_advbench_ir(bad)
    wrong = tmp_path / "wrong"
    write_parquet(wrong / "data" / "train-00000-of-00001.parquet", [{"ID": 1, "title": "t"}])
    with pytest.raises(DataError, match=r"missing field 'passage'"):
        load_distractors(wrong)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="neither the malicious-ir release files"):
        load_advbench_ir(tmp_path / "notes")  # an unrelated folder


def test_bright_hub_rows_and_snapshot_use_the_reference_columns(tmp_path, monkeypatch):
    examples = [{"query": "why do leaves fall?", "reasoning": "r", "id": "0", "excluded_ids": ["b.txt_0"],
                 "gold_ids_long": ["a.txt"], "gold_ids": ["a.txt_0"]},
                {"query": "how do roots grow?", "reasoning": "r", "id": "1", "excluded_ids": ["N/A"],
                 "gold_ids_long": ["b.txt"], "gold_ids": ["b.txt_0"]}]
    documents = [{"id": "a.txt_0", "content": "leaves fall in autumn"}, {"id": "b.txt_0", "content": "roots grow"}]
    long_documents = [{"id": "a.txt", "content": "leaves fall in autumn, long"}, {"id": "b.txt", "content": "roots"}]
    root = tmp_path / "BRIGHT"
    for config, rows in (("examples", examples), ("documents", documents), ("long_documents", long_documents)):
        write_parquet(root / config / "biology-00000-of-00001.parquet", rows)
    (local,) = load_bright(root, ["biology"])
    (local_long,) = load_bright(root, ["biology"], long_documents=True)
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(repo, config=None, *, split):
        calls.append((repo, config, split))
        return datasets.Dataset.from_list({"examples": examples, "documents": documents,
                                           "long_documents": long_documents}[config])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (hub,) = load_bright("xlangai/bright", ["biology"])
    assert calls == [("xlangai/bright", "examples", "biology"), ("xlangai/bright", "documents", "biology")]
    for task in (local, hub):
        assert task.qrels == {"0": {"a.txt_0": 1}, "1": {"b.txt_0": 1}}
        assert task.excluded == {"0": ("b.txt_0",), "1": ()}
        assert task.corpus.ids == ("a.txt_0", "b.txt_0")
    assert local.fingerprint == hub.fingerprint
    assert local_long.qrels == {"0": {"a.txt": 1}, "1": {"b.txt": 1}} and local_long.corpus.ids == ("a.txt", "b.txt")


def test_cli_runs_the_paper_protocol_on_local_snapshots(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    adv = snapshot(tmp_path / "AdvBench-IR", hub_advbench_rows())
    wiki = snapshot(tmp_path / "AdvBench-IR-Small-Wiki-100", hub_wiki_rows())
    res = runner.invoke(app, ["bench", "advbench-ir", "--data", str(adv), "--distractors", str(wiki),
                              "--baseline", "bm25", "--out", str(tmp_path / "out"), "--no-chart"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["data"]["tasks"]["script"]["documents"] == 3 + 2 + 1 + 1  # 3 wiki + 4 scored chunks
    assert report["protocol"]["tasks"]["script"]["instruction_join"]["query"] == "instruction.strip() + ' ' + text.strip()"


# ----------------------------------------------------------------------------------------------------------
# malformed bench data: one DataError line naming file and line
# ----------------------------------------------------------------------------------------------------------
def _beir_with_corpus_line(tmp_path: Path, line: bytes) -> Path:
    root = write_beir(tmp_path / "beir")
    with open(root / "corpus.jsonl", "ab") as f:
        f.write(line + b"\n")
    return root


@pytest.mark.parametrize("line, expected", [
    (b'{"_id": ' + b"7" * 5000 + b', "text": "x"}', r"corpus.jsonl:19: not usable JSON \(Exceeds the limit"),
    (b"[" * 100_000 + b"]" * 100_000, r"corpus.jsonl:19: not usable JSON \(nested too deeply\)"),
    (b'{"_id": "z", "text": "caf\xe9"}', r"corpus.jsonl:19: not valid UTF-8 \(byte 0xe9 at column 26\)"),
])
def test_malformed_corpus_lines_are_one_data_error(tmp_path, line, expected):
    root = _beir_with_corpus_line(tmp_path, line)
    with pytest.raises(DataError, match=expected):
        load_beir(root)


@pytest.mark.parametrize("row, expected", [
    ("q0\tvolcano-0\t\u00b2", r"test.tsv:2: expected 'query-id<TAB>corpus-id<TAB>integer score'"),
    ("q0\tvolcano-0\t" + "9" * 5000, r"test.tsv:2: expected"),
])
def test_malformed_qrels_scores_are_one_data_error(tmp_path, row, expected):
    root = write_beir(tmp_path / "beir")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + row + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=expected):
        load_beir(root)


def test_bad_bytes_in_qrels_and_advbench_map(tmp_path):
    root = write_beir(tmp_path / "beir")
    (root / "qrels" / "test.tsv").write_bytes(b"query-id\tcorpus-id\tscore\nq0\tvolc\xffano-0\t1\n")
    with pytest.raises(DataError, match=r"test.tsv:2: not valid UTF-8"):
        load_beir(root)
    from ragen.bench.synthetic import write_advbench

    adv = write_advbench(tmp_path / "adv")
    (adv / "advbench-ir_to_chunked_map.json").write_bytes(b'{"0": [0],\n "1": "\xc3("}')
    with pytest.raises(DataError, match=r"advbench-ir_to_chunked_map.json:2: not valid UTF-8"):
        load_advbench_ir(adv)
    (adv / "advbench-ir_to_chunked_map.json").write_bytes(b"[" * 100_000)
    with pytest.raises(DataError, match=r"advbench-ir_to_chunked_map.json: not"):
        load_advbench_ir(adv)


def test_cli_prints_one_error_line_for_bad_bench_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = _beir_with_corpus_line(tmp_path, b"[" * 100_000)
    res = runner.invoke(app, ["bench", "beir", "--data", str(root), "--baseline", "bm25", "--no-chart"])
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "corpus.jsonl:19" in lines[0], res.output
    assert sys.getrecursionlimit() >= 1000  # nothing left altered
