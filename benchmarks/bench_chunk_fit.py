"""Do chunks fit the encoder? The share of chunks longer than the encoder's input (and so truncated when
embedded) for character chunks (1000/200, the former default) and token chunks (the default now: the
encoder's limit minus its document instruction and special tokens), plus chunking time.

    python benchmarks/bench_chunk_fit.py --model minilm --corpus ../shared/data/scifact/corpus.jsonl --docs 2000
    python benchmarks/bench_chunk_fit.py --model minilm --folder docs

Prints one row per chunking: chunks, share over the limit, mean and max input tokens, seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from ragen.corpus import ChunkingConfig, Document, SourceFile, chunk_document, read_document, scan, token_splitter
from ragen.encoders import load_encoder
from ragen.retriever import resolve_chunking


def _documents(args) -> list[Document]:
    if args.folder:
        report = scan(args.folder)
        return [read_document(sf) for sf in report.files]
    docs = []
    with open(args.corpus, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= args.docs:
                break
            row = json.loads(line)
            text = f"{row.get('title', '')}\n\n{row.get('text', '')}".strip()
            docs.append(Document(SourceFile(f"{row['_id']}.txt", Path("."), len(text), 0), text))
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--corpus", help="BEIR corpus.jsonl (title + text per document)")
    ap.add_argument("--docs", type=int, default=2000, help="first N documents of --corpus")
    ap.add_argument("--folder", help="a folder, read as `ragen index` reads it")
    args = ap.parse_args()
    if not args.corpus and not args.folder:
        ap.error("give --corpus or --folder")
    encoder = load_encoder(args.model, device="cpu")
    budget = encoder.document_token_budget()
    docs = _documents(args)
    print(f"{args.model}: input limit {budget.limit} tokens, {budget.overhead} spent on instruction/special tokens; "
          f"{len(docs)} documents from {args.folder or args.corpus}")
    print(f"{'chunking':<28} {'chunks':>7} {'over limit':>11} {'mean tok':>9} {'max tok':>8} {'seconds':>8}")
    for label, config in (("chars 1000/200 (former)", ChunkingConfig(1000, 200, "chars")),
                          ("tokens (default)", resolve_chunking(encoder, budget=budget))):
        splitter = token_splitter(config, budget.tokenizer) if config.unit == "tokens" else None
        t0 = time.perf_counter()
        chunks = [c for d in docs for c in chunk_document(d, config, splitter=splitter)]
        seconds = time.perf_counter() - t0
        lengths = budget.input_lengths([c.text for c in chunks])
        over = sum(n > budget.limit for n in lengths)
        name = label if config.unit == "chars" else f"tokens {config.chunk_size}/{config.chunk_overlap} (default)"
        print(f"{name:<28} {len(chunks):>7} {100 * over / max(1, len(chunks)):>10.1f}% "
              f"{statistics.mean(lengths):>9.1f} {max(lengths):>8} {seconds:>8.2f}")


if __name__ == "__main__":
    main()
