"""Indexing overhead and search latency of ragen's store.

(a) ``ragen index`` overhead: wall time of :func:`ragen.build_index` (walk, read, chunk, SQLite
    writes per batch, FAISS build, atomic switch) against pure ``encode_documents`` of the same chunk
    texts with the same encoder and batch size. Target: overhead <= 10 %.
(b) Search latency at 100k and 1M vectors: exact flat inner product against HNSW, IVF and IVF-PQ
    (``--kinds ivf ivfpq opq hnsw``; the memory per vector of each is printed too), with
    recall@10 measured against the exact results. Vectors are clustered synthetic unit vectors (a
    Gaussian mixture, closer to real embeddings than uniform noise, on which no ANN index does well).
(c) The store at scale (``--store-sizes``): random vectors through the store API (``StoreWriter``),
    ``--per-file`` chunks per file. Each phase runs in its own process, so its peak RSS is its own:
    initial build, a one-file update (one file's chunks replaced), and the search latency of the
    committed index through ``Store.search`` and ``Store.hits`` against raw faiss on the same file.
    ``--json`` prints one JSON object per size (n, dim, initial_build_s, one_file_update_s,
    update_peak_rss_mb, vector_mb, search_ms {ragen, ragen_hits, faiss}).
(d) ``--two-process``: the 2-process index build against one process, side by side in one run. The same
    generated folder (``--procs-docs`` files) is indexed by ``python -m ragen index`` and by
    ``python -m torch.distributed.run --standalone --nproc_per_node 2 -m ragen index`` (gloo, ``--device
    cpu``, ``--procs-threads`` threads per process) with the same encoder (``--model``); both indexes must
    hold the same chunk ids and vectors (to 1e-5). Prints the wall time of each whole command, the
    encoding time each reports, and the ratios (one process / two: above 1 means two are faster); with
    ``--json`` one more JSON object (procs_1_s, procs_2_s, ratio, encode_1_s, encode_2_s, encode_ratio,
    chunks, equal, max_abs_diff).

Usage::

    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_index.py            # both parts
    PYTHONPATH=. python benchmarks/bench_index.py --skip-index --sizes 100000  # search only
    PYTHONPATH=. python benchmarks/bench_index.py --skip-index --skip-search --store-sizes 200000 --json
    PYTHONPATH=. HF_HUB_OFFLINE=1 python benchmarks/bench_index.py --json --two-process

The index part reads text from ``--corpus`` (a folder, or a BEIR-style corpus.jsonl whose records are
written out as files) or, by default, generates a folder of prose-like text.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = ("the of and to in is that for it as with was on be by this are from at or an which have not but "
         "cell protein gene expression patients study results model data analysis effect increased "
         "reduced levels treatment risk response clinical role function activity mice human cancer").split()


def make_folder(root: Path, corpus: str | None, n_docs: int, seed: int = 0) -> int:
    root.mkdir(parents=True, exist_ok=True)
    if corpus and Path(corpus).is_file():
        n = 0
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                if n >= n_docs:
                    break
                rec = json.loads(line)
                (root / f"doc{n:05d}.txt").write_text(f"{rec.get('title', '')}\n\n{rec.get('text', '')}")
                n += 1
        return n
    rng = random.Random(seed)
    for i in range(n_docs):
        paras = []
        for _ in range(rng.randint(1, 4)):
            sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))).capitalize() + "."
                         for _ in range(rng.randint(3, 8))]
            paras.append(" ".join(sentences))
        (root / f"doc{i:05d}.md").write_text("\n\n".join(paras))
    return n_docs


def bench_index(args) -> None:
    from ragen import build_index, load_encoder
    from ragen.corpus import chunk_document, read_document, scan, token_splitter
    from ragen.retriever import encoder_budget, resolve_chunking

    enc = load_encoder(args.model, device=args.device)
    tmp = Path(tempfile.mkdtemp(prefix="ragen-bench-"))
    try:
        folder = tmp / "docs"
        n = make_folder(folder, args.corpus, args.docs)
        cfg = resolve_chunking(enc)  # what build_index uses by default (the encoder's tokens when it has a tokenizer)
        splitter = token_splitter(cfg, encoder_budget(enc).tokenizer) if cfg.unit == "tokens" else None
        texts = [c.text for f in scan(folder).files for c in chunk_document(read_document(f), cfg, splitter=splitter)]
        unique = list(dict.fromkeys(texts))
        enc.encode_documents(unique[:64], batch_size=args.batch_size, normalize=True)  # warm-up
        rows = []
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            enc.encode_documents(unique, batch_size=args.batch_size, normalize=True)
            encode_s = time.perf_counter() - t0
            idx = tmp / f"idx{rep}"
            t0 = time.perf_counter()
            stats = build_index(folder, idx, encoder=enc, batch_size=args.batch_size)
            index_s = time.perf_counter() - t0
            rows.append((encode_s, index_s))
            assert stats.chunks_embedded == len(unique)
        encode_s = min(r[0] for r in rows)
        index_s = min(r[1] for r in rows)
        t0 = time.perf_counter()
        again = build_index(folder, tmp / "idx0", encoder=enc, batch_size=args.batch_size)
        noop_s = time.perf_counter() - t0
        print(f"## ragen index overhead ({args.model}, {n} files, {len(texts)} chunks, batch {args.batch_size}, "
              f"best of {args.repeats})")
        print(f"pure encode_documents : {encode_s:8.2f} s  ({len(unique) / encode_s:,.1f} chunks/s)")
        print(f"build_index           : {index_s:8.2f} s")
        print(f"overhead              : {100 * (index_s / encode_s - 1):+7.1f} %")
        print(f"unchanged re-run      : {noop_s:8.2f} s  ({again.chunks_embedded} embedded)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clustered(n: int, dim: int, n_clusters: int, rng: np.random.Generator, centers=None):
    from ragen.store import normalize_rows

    if centers is None:
        centers = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):  # in slabs: keeps the float64 temporaries small
        m = min(100_000, n - s)
        out[s:s + m] = centers[rng.integers(0, len(centers), m)] + 0.6 * rng.standard_normal((m, dim), dtype=np.float32)
    return normalize_rows(out), centers


def bench_search(args) -> None:
    import faiss

    from ragen.store import IndexConfig, build_faiss_index

    rng = np.random.default_rng(0)
    print(f"\n## search latency (dim {args.dim}, clustered unit vectors, {args.queries} queries, "
          f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, CPU)")
    from ragen.store.faiss_index import bytes_per_vector, pq_subquantizers

    print("| vectors | index | build s | ms/query (1 at a time) | ms/query (batched) | recall@10 | bytes/vector |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        data, centers = clustered(n, args.dim, max(64, n // 1000), rng)
        queries, _ = clustered(args.queries, args.dim, 0, rng, centers)
        truth = None
        kinds = [k for k in ["flat", *args.kinds] if k != "hnsw" or n <= args.hnsw_max]
        for kind in dict.fromkeys(kinds):
            if kind in ("ivf", "ivfpq", "opq"):
                nlist = args.ivf_nlist or int(4 * np.sqrt(n))
                config = IndexConfig("ivf" if kind == "ivf" else "ivfpq", ivf_nlist=nlist, ivf_nprobe=args.nprobe,
                                     pq_m=args.pq_m, opq=kind == "opq")
            else:
                config = IndexConfig(kind, hnsw_m=32, hnsw_ef_construction=80, hnsw_ef_search=args.ef_search)
            t0 = time.perf_counter()
            index, built = build_faiss_index(data, config)
            build_s = time.perf_counter() - t0
            single = queries[: min(200, args.queries)]
            t0 = time.perf_counter()
            for q in single:
                index.search(q[None, :], 10)
            one_ms = 1000 * (time.perf_counter() - t0) / len(single)
            t0 = time.perf_counter()
            _, got = index.search(queries, 10)
            batch_ms = 1000 * (time.perf_counter() - t0) / len(queries)
            if kind == "flat":
                truth = got
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got)])
            pq = f"{'OPQ+' if config.opq else ''}IVF{config.ivf_nlist}-PQ{pq_subquantizers(args.dim, config)}"
            label = {"flat": "flat (exact)", "ivf": f"IVF{config.ivf_nlist}, nprobe {args.nprobe}",
                     "ivfpq": f"{pq}, nprobe {args.nprobe}", "hnsw": f"HNSW32, efSearch {args.ef_search}"}[built]
            print(f"| {n:,} | {label} | {build_s:.1f} | {one_ms:.2f} | {batch_ms:.3f} | {recall:.3f} | "
                  f"{bytes_per_vector(built, args.dim, config)} |", flush=True)
            if built == "ivfpq":  # what Store.search does: k * PQ_RERANK candidates, re-ranked by exact vectors
                from ragen.store.faiss_index import PQ_RERANK, rerank_exact

                def reranked(qs, index=index, data=data):
                    _, cand = index.search(qs, 10 * PQ_RERANK)
                    return rerank_exact(qs, cand, {int(c): data[c] for c in np.unique(cand[cand >= 0])}, 10)[1]

                t0 = time.perf_counter()
                for q in single:
                    reranked(q[None, :])
                one_ms = 1000 * (time.perf_counter() - t0) / len(single)
                t0 = time.perf_counter()
                got = reranked(queries)
                batch_ms = 1000 * (time.perf_counter() - t0) / len(queries)
                recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth, got)])
                print(f"| {n:,} | {pq}, nprobe {args.nprobe}, re-ranked x{PQ_RERANK} (ragen) | {build_s:.1f} | "
                      f"{one_ms:.2f} | {batch_ms:.3f} | {recall:.3f} | {bytes_per_vector(built, args.dim, config)} |",
                      flush=True)
            del index
        del data


# ---------------------------------------------------------------------------------------------- (c) the store
def _store_phase(args) -> dict:
    """One phase in this (child) process; returns its figures."""
    import faiss

    from ragen.store import EncoderInfo, FileRecord, IndexConfig, Store, StoreWriter
    from ragen.types import Chunk

    n, dim, per_file = args.phase_n, args.dim_store, args.per_file
    enc = EncoderInfo(spec="bench", fingerprint="bench", dim=dim)
    chunking = {"method": "bench", "chunk_size": 1000, "chunk_overlap": 0}
    idx = Path(args.phase_dir)

    def record(f: int, tag: str = "") -> FileRecord:
        path = f"f{f:07d}.txt"
        return FileRecord(path, 1, 1, tuple(Chunk(f"{path}#{p}", path, p, f"t{tag}{f}-{p}", 0, 1, f"h{tag}{f}-{p}")
                                            for p in range(per_file)))

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    if args.phase == "build":
        records = [record(f) for f in range(n // per_file)]
        with StoreWriter(idx, encoder=enc, chunking=chunking, index_config=IndexConfig(args.store_index)) as w:
            hashes = [c.content_hash for r in records for c in r.chunks]
            for s in range(0, len(hashes), 8192):
                part = hashes[s:s + 8192]
                w.add_vectors(part, rng.standard_normal((len(part), dim), dtype=np.float32))
            w.commit(records, [r.path for r in records])
        out = {"initial_build_s": time.perf_counter() - t0}
    elif args.phase == "update":
        changed = record(n // per_file // 2, tag="u")
        with StoreWriter(idx, encoder=enc, chunking=chunking, index_config=IndexConfig(args.store_index)) as w:
            present = [f"f{f:07d}.txt" for f in range(n // per_file)]
            w.add_vectors([c.content_hash for c in changed.chunks], rng.standard_normal((per_file, dim), dtype=np.float32))
            result = w.commit([changed], present)
        assert result.chunks == n // per_file * per_file
        out = {"one_file_update_s": time.perf_counter() - t0}
    else:
        queries = rng.standard_normal((args.store_queries, dim), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        with Store.open(idx, device="cpu") as store:
            raws = [faiss.read_index(str(idx / s.spec.name)) for s in store._segments]  # the same files, raw

            def raw_search(q):
                for raw in raws:
                    raw.search(q[None, :], 10)

            def per_query(fn) -> float:
                fn(queries[0])
                t = time.perf_counter()
                for q in queries:
                    fn(q)
                return 1000 * (time.perf_counter() - t) / len(queries)

            out = {"search_ms": {"ragen": per_query(lambda q: store.search(q, 10)),
                                 "ragen_hits": per_query(lambda q: store.hits(q, 10)),
                                 "faiss": per_query(raw_search)}, "segments": len(raws)}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def bench_store(args) -> None:
    rows = []
    for n in args.store_sizes:
        tmp = Path(tempfile.mkdtemp(prefix="ragen-bench-store-"))
        try:
            row = {"n": n, "dim": args.dim_store, "per_file": args.per_file, "index": args.store_index,
                   "vector_mb": n * args.dim_store * 4 / 2**20}
            for phase in ("build", "update", "search"):
                cmd = [sys.executable, __file__, "--phase", phase, "--phase-n", str(n), "--phase-dir", str(tmp / "idx"),
                       "--dim-store", str(args.dim_store), "--per-file", str(args.per_file),
                       "--store-index", args.store_index, "--store-queries", str(args.store_queries)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                figures = json.loads(done.stdout.strip().splitlines()[-1])
                rss = figures.pop("peak_rss_mb")
                row.update(figures)
                row[f"{phase}_peak_rss_mb"] = rss
            row["update_peak_rss_mb"] = row.pop("update_peak_rss_mb")
            row["disk_mb"] = sum(p.stat().st_size for p in (tmp / "idx").iterdir()) / 2**20
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
    if args.json:
        return
    print(f"\n## the store at scale (random vectors, dim {args.dim_store}, {args.per_file} chunks per file, "
          f"{args.store_index}, CPU)")
    print("| vectors | vector MB | initial build s | one-file update s | update peak RSS MB | RSS / vectors | "
          "search ms: ragen / raw faiss | hits ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s = r["search_ms"]
        print(f"| {r['n']:,} | {r['vector_mb']:.0f} | {r['initial_build_s']:.1f} | {r['one_file_update_s']:.2f} | "
              f"{r['update_peak_rss_mb']:.0f} | {r['update_peak_rss_mb'] / r['vector_mb']:.2f}x | "
              f"{s['ragen']:.2f} / {s['faiss']:.2f} ({s['ragen'] / s['faiss']:.2f}x) | {s['ragen_hits']:.2f} |")


# ------------------------------------------------------------------------------ (d) 2 processes against 1
def _cli_index(folder: Path, out: Path, args, ranks: int) -> tuple[float, float | None]:
    """Run ``ragen index`` in ``ranks`` processes; (wall seconds of the whole command, encoding seconds)."""
    import os
    import re

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    cmd = [*launcher, "-m", "ragen", "index", str(folder), "--index", str(out), "--model", args.model,
           "--device", "cpu", "--batch-size", str(args.batch_size)]
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    threads = str(args.procs_threads)
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               COLUMNS="200", PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                      env.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.procs_timeout, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:8])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    found = re.search(r"encoding ([0-9.]+) s", done.stdout)  # the summary's "time  X s (encoding Y s, ...)"
    return wall, float(found.group(1)) if found else None


def _stored_vectors(index: Path) -> dict[str, np.ndarray]:
    """chunk id -> stored vector of every chunk of a committed index."""
    from ragen.store import Store

    with Store.open(index, device="cpu") as store:
        chunks = store.chunks(range(4 * store.count + 10))  # row ids of a fresh build are 1..count
        vectors = store._vectors_of_rows(np.array(sorted(chunks)))
        if not len(chunks) == len(vectors) == store.count:
            raise SystemExit(f"{index}: read {len(chunks)} chunks / {len(vectors)} vectors of {store.count}")
        return {chunks[r].chunk_id: vectors[r] for r in chunks}


def bench_two_process(args) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ragen-bench-procs-"))
    try:
        folder = tmp / "docs"
        n_files = make_folder(folder, args.corpus, args.procs_docs)
        one_s, enc_one = _cli_index(folder, tmp / "one", args, 1)
        two_s, enc_two = _cli_index(folder, tmp / "two", args, 2)
        a, b = _stored_vectors(tmp / "one"), _stored_vectors(tmp / "two")
        same_ids = sorted(a) == sorted(b)
        diff = max((float(np.max(np.abs(a[c] - b[c]))) for c in a), default=0.0) if same_ids else float("inf")
        row = {"bench": "two_process", "model": args.model, "files": n_files, "chunks": len(a),
               "batch_size": args.batch_size, "threads_per_process": args.procs_threads,
               "procs_1_s": one_s, "procs_2_s": two_s, "ratio": one_s / two_s,
               "encode_1_s": enc_one, "encode_2_s": enc_two,
               "encode_ratio": enc_one / enc_two if enc_one and enc_two else None,
               "equal": bool(same_ids and diff <= 1e-5), "max_abs_diff": diff}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(row), flush=True)
    else:
        def enc(v):
            return f"{v:.1f} s" if v is not None else "n/a"

        print(f"\n## 2-process index build against one process ({args.model}, {n_files} files, {len(a)} chunks, "
              f"batch {args.batch_size}, --device cpu, gloo, {args.procs_threads} thread(s) per process)")
        print("| processes | whole command s | encoding s |")
        print("|---:|---:|---:|")
        print(f"| 1 | {one_s:.1f} | {enc(enc_one)} |")
        print(f"| 2 | {two_s:.1f} | {enc(enc_two)} |")
        er = f"{row['encode_ratio']:.2f}x" if row["encode_ratio"] else "n/a"
        print(f"ratio one/two (above 1: two are faster): whole command {row['ratio']:.2f}x, encoding {er}")
        print(f"same chunk ids: {same_ids}; max abs vector difference {diff:.2e}; equal: {row['equal']}")
    if not row["equal"]:
        raise SystemExit("the 2-process index differs from the one-process index")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--device", default="cpu")
    p.add_argument("--corpus", default=None, help="folder or BEIR corpus.jsonl (default: generated text)")
    p.add_argument("--docs", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--ef-search", type=int, default=128)
    p.add_argument("--ivf-nlist", type=int, default=None, help="IVF lists (default 4*sqrt(n), as ragen builds)")
    p.add_argument("--hnsw-max", type=int, default=100_000, help="largest size to build HNSW for (slow on few cores)")
    p.add_argument("--kinds", nargs="+", default=["ivf", "hnsw"], choices=["ivf", "ivfpq", "opq", "hnsw"],
                   help="index types next to the exact flat one (opq: OPQ + IVF-PQ)")
    p.add_argument("--pq-m", type=int, default=None, help="IVF-PQ bytes per code (default dim / 4, as ragen builds)")
    p.add_argument("--skip-index", action="store_true")
    p.add_argument("--skip-search", action="store_true")
    p.add_argument("--store-sizes", type=int, nargs="*", default=[], help="sizes for part (c), e.g. 200000 1000000")
    p.add_argument("--dim-store", type=int, default=1024)
    p.add_argument("--per-file", type=int, default=10, help="chunks per file in part (c)")
    p.add_argument("--store-index", default="flat")
    p.add_argument("--store-queries", type=int, default=200)
    p.add_argument("--json", action="store_true",
                   help="parts (c) and (d) only: one JSON object per size (and one for --two-process) on stdout")
    p.add_argument("--two-process", action="store_true",
                   help="part (d): `ragen index` in 2 torchrun processes (gloo, CPU) against 1, same folder")
    p.add_argument("--procs-docs", type=int, default=300, help="files of the folder part (d) indexes")
    p.add_argument("--procs-threads", type=int, default=1, help="OMP threads per process in part (d)")
    p.add_argument("--procs-timeout", type=int, default=600, help="seconds each part (d) command may take")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--phase-n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--phase-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        print(json.dumps(_store_phase(args)))
        return
    if args.json:
        args.skip_index = args.skip_search = True
    if not args.skip_index:
        bench_index(args)
    if not args.skip_search:
        bench_search(args)
    if args.store_sizes:
        bench_store(args)
    if args.two_process:
        bench_two_process(args)


if __name__ == "__main__":
    main()
