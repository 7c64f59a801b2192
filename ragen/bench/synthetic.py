"""Tiny synthetic benchmark datasets in each supported on-disk layout (tests, examples, smoke runs).

Each writer produces a few topics whose queries share words with their relevant documents, so a lexical
or bag-of-words ranker finds them and metrics land strictly between 0 and 1.
"""

from __future__ import annotations

import json
from pathlib import Path

TOPICS = {
    "volcano": "magma lava eruption crater basalt ash plume tectonic vent pressure",
    "orchard": "apple pear blossom pruning graft harvest cider orchard root soil",
    "compiler": "parser token grammar lexer bytecode optimizer register syntax tree emit",
    "tide": "moon gravity ocean tide coast current bulge spring neap harbor",
    "bakery": "flour yeast dough oven crust proof knead loaf sourdough butter",
    "glacier": "ice snow moraine crevasse glacier melt valley frozen firn calving",
}


def _words(topic: str, n: int, shift: int) -> str:
    vocab = TOPICS[topic].split()
    return " ".join(vocab[(i + shift) % len(vocab)] for i in range(n))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_beir(root: str | Path, *, docs_per_topic: int = 3) -> Path:
    """corpus.jsonl, queries.jsonl, qrels/test.tsv: one query per topic, its first doc relevant (grade 2),
    its second relevant (grade 1)."""
    root = Path(root)
    corpus, queries, qrels = [], [], ["query-id\tcorpus-id\tscore"]
    for t, topic in enumerate(TOPICS):
        for j in range(docs_per_topic):
            corpus.append({"_id": f"{topic}-{j}", "title": topic.title() if j == 0 else "",
                           "text": _words(topic, 12, j)})
        queries.append({"_id": f"q{t}", "text": f"what about {_words(topic, 3, 1)}?"})
        qrels += [f"q{t}\t{topic}-0\t2", f"q{t}\t{topic}-1\t1"]
    queries.append({"_id": "unjudged", "text": "a query without judgements is ignored"})
    _write_jsonl(root / "corpus.jsonl", corpus)
    _write_jsonl(root / "queries.jsonl", queries)
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n", encoding="utf-8")
    return root


def write_advbench(root: str | Path, *, words: tuple[int, ...] = (250, 130, 100, 60)) -> Path:
    """The malicious-ir release layout with one "harmful" passage per topic of ``words[i]`` words.

    With the defaults, passage 0 has chunks of 100, 100, 50 words (the 50-word tail is dropped by the
    script protocol), passage 3 a single 60-word first chunk (kept by both protocols).
    """
    root = Path(root)
    topics = list(TOPICS)
    rows, chunks, mapping = [], [], {}
    cid = 0
    for i, n in enumerate(words):
        topic = topics[i % len(topics)]
        passage = _words(topic, n, i)
        rows.append({"id_": i, "instruction": f"explain {_words(topic, 4, 2)}", "title": f"{topic} guide",
                     "response": [passage]})
        tokens = passage.split()
        mapping[str(i)] = []
        for start in range(0, len(tokens), 100):
            chunks.append({"id_": cid, "title": f"{topic} guide", "response": [" ".join(tokens[start : start + 100])],
                           "original_data_instruction": rows[-1]["instruction"], "original_data_id_": i})
            mapping[str(i)].append(cid)
            cid += 1
    _write_jsonl(root / "advbench-ir.jsonl", rows)
    _write_jsonl(root / "advbench-ir_chunked.jsonl", chunks)
    (root / "advbench-ir_to_chunked_map.json").write_text(json.dumps(mapping), encoding="utf-8")
    return root


def write_bright(root: str | Path, tasks: tuple[str, ...] = ("biology", "leetcode"), *, fmt: str = "jsonl") -> Path:
    """``examples/<task>-00000-of-00001.<fmt>`` and ``documents/``/``long_documents/`` likewise (fmt: jsonl
    or parquet). Each query's best lexical match is listed in its ``excluded_ids``; its gold is the next."""
    root = Path(root)
    for task in tasks:
        examples, docs, long_docs = [], [], []
        for t, topic in enumerate(TOPICS):
            for j in range(3):
                docs.append({"id": f"{task}/{topic}-{j}", "content": _words(topic, 10, j)})
            long_docs.append({"id": f"{task}/{topic}.txt", "content": _words(topic, 40, 0)})
            examples.append({
                "id": str(t), "query": _words(topic, 10, 0),  # identical to document 0: the excluded one
                "reasoning": "", "gold_ids": [f"{task}/{topic}-1"], "gold_ids_long": [f"{task}/{topic}.txt"],
                "excluded_ids": [f"{task}/{topic}-0"] if t % 2 == 0 else ["N/A"],
            })
        for config, rows in (("examples", examples), ("documents", docs), ("long_documents", long_docs)):
            path = root / config / f"{task}-00000-of-00001.{fmt}"
            if fmt == "jsonl":
                _write_jsonl(path, rows)
            elif fmt == "parquet":
                import pandas as pd

                path.parent.mkdir(parents=True, exist_ok=True)
                pd.DataFrame(rows).to_parquet(path, index=False)
            else:
                raise ValueError(f"fmt must be jsonl or parquet, got {fmt!r}")
    return root


def write_utility_beir(root: str | Path, *, queries: int = 40, docs_per_query: int = 3, seed: int = 0) -> Path:
    """A BEIR-layout set big enough to tell a working encoder from a random one: ``queries`` topics of 12
    made-up words, each with ``docs_per_query`` documents (8 topic words + 8 random ones), a 4-word query
    and document 0 relevant. BM25 scores about 0.7 nDCG@10 here, MiniLM about 0.45, a random ranking 0.04."""
    import random

    rng = random.Random(seed)
    words = sorted({"".join(rng.choice("bcdfghjklmnpqrstvwxz") + rng.choice("aeiou") for _ in range(3))
                    for _ in range(800)})
    root = Path(root)
    corpus, rows, qrels = [], [], ["query-id\tcorpus-id\tscore"]
    for q in range(queries):
        topic = rng.sample(words, 12)
        for j in range(docs_per_query):
            corpus.append({"_id": f"t{q}-{j}", "title": "", "text": " ".join(rng.sample(topic, 8) + rng.sample(words, 8))})
        rows.append({"_id": f"q{q}", "text": " ".join(rng.sample(topic, 4))})
        qrels.append(f"q{q}\tt{q}-0\t1")
    _write_jsonl(root / "corpus.jsonl", corpus)
    _write_jsonl(root / "queries.jsonl", rows)
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n", encoding="utf-8")
    return root


__all__ = ["write_beir", "write_advbench", "write_bright", "write_utility_beir", "TOPICS"]
