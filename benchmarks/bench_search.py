"""Blocked exact search (ragen.bench.search) against faiss IndexFlatIP, side by side.

Prints wall time of both, their ratio, the extra memory each needs, and whether the top-k ids agree.
The blocked search reads the document matrix from a memory-mapped .npy, block by block, so its working
memory is O(queries x (k + block)) however large the corpus; faiss needs the whole matrix in RAM.

    python benchmarks/bench_search.py --docs 200000 --dim 384 --queries 500 --k 100
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from ragen.bench.search import topk_inner_product


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--block", type=int, default=16384)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    docs = rng.standard_normal((args.docs, args.dim), dtype=np.float32)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "docs.npy"
        np.save(path, docs)
        mm = np.load(path, mmap_mode="r")
        t0 = time.perf_counter()
        _, ours = topk_inner_product(queries, mm, args.k, block_size=args.block)
        t_ours = time.perf_counter() - t0

        import faiss

        t0 = time.perf_counter()
        index = faiss.IndexFlatIP(args.dim)
        index.add(docs)
        _, theirs = index.search(queries, args.k)
        t_faiss = time.perf_counter() - t0

    agree = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ours, theirs)]))
    work_mb = args.queries * (args.k + args.block) * 12 / 2**20  # scores (4 B) + ids (8 B)
    print(f"corpus {args.docs:,} x {args.dim}, {args.queries} queries, k={args.k}, block {args.block:,}")
    print(f"blocked exact (memmap): {t_ours:.2f} s, working memory ~{work_mb:.0f} MiB")
    print(f"faiss IndexFlatIP:      {t_faiss:.2f} s, index memory {docs.nbytes / 2**20:.0f} MiB")
    print(f"time ratio blocked/faiss: {t_ours / t_faiss:.2f}; top-{args.k} id overlap {agree:.4f}")


if __name__ == "__main__":
    main()
