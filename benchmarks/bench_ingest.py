"""Streaming ingestion: memory that does not grow with the corpus, and a killed run that keeps its work.

(a) Peak RSS of a first ``build_index`` over folders of ``--sizes`` files (generated prose, ``--file-kb``
    each) with a model-free random-projection encoder (``--dim``), each build in its own process, split in
    two: the peak while files are read, embedded and staged window by window (``ragen/ingest.py``; it
    should not grow with the corpus), and the peak of the whole run, which includes the commit's FAISS
    build (it holds the vectors, so it grows with them, not with the text).
(b) Kill and resume: a build over ``--html`` HTML pages (the extraction costs real time) is killed with
    SIGKILL once half of the files are staged; the resumed run's wall time and files read are printed
    against a build from scratch of the same folder.

Usage::

    PYTHONPATH=. python benchmarks/bench_ingest.py                       # both parts
    PYTHONPATH=. python benchmarks/bench_ingest.py --sizes 2000 20000 --skip-resume --json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

WORDS = ("the of and to in is that for it as with was on be by this are from at or an which have not but "
         "cell protein gene expression patients study results model data analysis effect increased "
         "reduced levels treatment risk response clinical role function activity mice human cancer").split()


class ProjectionEncoder:
    """Model-free: a fixed random projection of hashed word counts (costs microseconds, so the benchmark
    measures the ingestion, not a model)."""

    spec = "projection-bench"
    fingerprint = "projection-bench-v1"

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._proj = np.random.default_rng(0).standard_normal((4096, dim)).astype(np.float32)

    def encode_documents(self, texts, batch_size=32, normalize=True):
        counts = np.zeros((len(texts), 4096), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.split():
                counts[i, zlib.crc32(w.encode()) % 4096] += 1.0
        v = counts @ self._proj + 1e-3
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    encode_queries = encode_documents


def make_folder(root: Path, n: int, kb: int, html: bool = False, seed: int = 0) -> int:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(kb * 1024 // 6))
        if html:
            body = "".join(f"<p>{words[j:j + 400]}</p>" for j in range(0, len(words), 400))
            text = (f"<html><head><title>page {i}</title></head><body><nav><a href='/'>home</a></nav>"
                    f"<article><h1>page {i}</h1>{body}</article><footer>footer</footer></body></html>")
            name = f"page{i:05d}.html"
        else:
            text, name = f"document {i}. {words}", f"doc{i:05d}.txt"
        (root / name).write_text(text)
        total += len(text.encode())
    return total


def child_build(docs: str, idx: str, dim: int, flush_zero: bool) -> None:
    import faiss  # noqa: F401  (imported before the baseline: its libraries are not the corpus's memory)

    import ragen.ingest
    import ragen.store.writer  # noqa: F401
    from ragen.retriever import build_index

    if flush_zero:
        ragen.ingest.FLUSH_SECONDS = 0.0
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    before_commit = {}
    real_commit = ragen.store.writer.StoreWriter.commit

    def commit(self, *a, **kw):  # the peak so far is the ingestion's (read, chunk, embed, stage)
        before_commit["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return real_commit(self, *a, **kw)

    ragen.store.writer.StoreWriter.commit = commit
    t0 = time.perf_counter()
    stats = build_index(docs, idx, encoder=ProjectionEncoder(dim), chunk_unit="chars", chunk_size=1000,
                        chunk_overlap=200)
    print(json.dumps({"seconds": time.perf_counter() - t0, "baseline_rss_mb": base,
                      "ingest_peak_rss_mb": before_commit.get("rss", 0.0),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "chunks": stats.chunks_total, "files": stats.files_indexed,
                      "files_resumed": stats.files_resumed, "files_read": stats.files_changed - stats.files_resumed}))


def _child(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


def _staged(idx: Path) -> int:
    from ragen.testing import count_rows

    return count_rows(idx / "chunks.sqlite", "staged_files")


def memory(sizes: list[int], kb: int, dim: int, work: Path) -> list[dict]:
    rows = []
    for n in sizes:
        docs, idx = work / f"docs-{n}", work / f"idx-{n}"
        text_bytes = make_folder(docs, n, kb)
        proc = _child([str(docs), str(idx), str(dim), "0"])
        out, _ = proc.communicate()
        got = json.loads(out.strip().splitlines()[-1])
        ingest = got["ingest_peak_rss_mb"] - got["baseline_rss_mb"]
        rows.append({"files": n, "text_mb": round(text_bytes / 2**20, 1), "chunks": got["chunks"],
                     "vector_mb": round(got["chunks"] * dim * 4 / 2**20, 1), "build_s": round(got["seconds"], 1),
                     "baseline_rss_mb": round(got["baseline_rss_mb"]),
                     "ingest_rss_growth_mb": round(ingest), "peak_rss_mb": round(got["peak_rss_mb"]),
                     "commit_rss_growth_mb": round(got["peak_rss_mb"] - got["baseline_rss_mb"])})
    return rows


def resume(n: int, kb: int, dim: int, work: Path) -> dict:
    docs = work / "html"
    make_folder(docs, n, kb, html=True)
    scratch = _child([str(docs), str(work / "idx-scratch"), str(dim), "0"])
    full = json.loads(scratch.communicate()[0].strip().splitlines()[-1])
    idx = work / "idx-killed"
    proc = _child([str(docs), str(idx), str(dim), "1"])
    t0 = time.perf_counter()
    while proc.poll() is None and _staged(idx) < n // 2:
        time.sleep(0.01)
    killed_after = time.perf_counter() - t0
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    staged = _staged(idx)
    again = _child([str(docs), str(idx), str(dim), "0"])
    resumed = json.loads(again.communicate()[0].strip().splitlines()[-1])
    return {"files": n, "scratch_s": round(full["seconds"], 2), "killed_after_s": round(killed_after, 2),
            "staged_at_kill": staged, "resumed_s": round(resumed["seconds"], 2),
            "resumed_files_read": resumed["files_read"], "resumed_files_taken": resumed["files_resumed"],
            "resume_vs_scratch": round(resumed["seconds"] / full["seconds"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--file-kb", type=int, default=4)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--html", type=int, default=1000, help="HTML pages for the kill-and-resume part")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-resume", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        docs, idx, dim, flush = args.child
        child_build(docs, idx, int(dim), flush == "1")
        return
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        if not args.skip_memory:
            rows = memory(args.sizes, args.file_kb, args.dim, work)
            for r in rows:
                _show("memory", r, args.json, lambda r: (
                    f"{r['files']:>7,} files ({r['text_mb']:>6} MB text, {r['chunks']:>7,} chunks, {r['vector_mb']} MB "
                    f"vectors): build {r['build_s']:>6.1f} s; RSS above the {r['baseline_rss_mb']} MB baseline: "
                    f"+{r['ingest_rss_growth_mb']} MB while reading/embedding/staging, +{r['commit_rss_growth_mb']} MB "
                    "at the commit (FAISS build)"))
            if len(rows) > 1 and not args.json:
                a, b = rows[0], rows[-1]
                print(f"text x{b['text_mb'] / a['text_mb']:.1f}: ingestion RSS growth x"
                      f"{b['ingest_rss_growth_mb'] / max(a['ingest_rss_growth_mb'], 1):.2f}, commit RSS growth x"
                      f"{b['commit_rss_growth_mb'] / max(a['commit_rss_growth_mb'], 1):.2f} (vectors x"
                      f"{b['vector_mb'] / a['vector_mb']:.1f})")
        if not args.skip_resume:
            _show("resume", resume(args.html, args.file_kb, args.dim, work), args.json, lambda r: (
                f"{r['files']} HTML pages: from scratch {r['scratch_s']} s; killed after {r['killed_after_s']} s with "
                f"{r['staged_at_kill']} staged; the resumed run read {r['resumed_files_read']} files, took "
                f"{r['resumed_files_taken']} from the staging, {r['resumed_s']} s ({r['resume_vs_scratch']}x the "
                "scratch build)"))


def _show(part: str, row: dict, as_json: bool, text) -> None:
    print(json.dumps({"part": part, **row}) if as_json else text(row))

if __name__ == "__main__":
    main()
