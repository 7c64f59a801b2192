"""``ragen serve`` on loopback: dynamic batching throughput, latency, warm server vs cold CLI, vector equality.

Starts ``ragen serve`` as a subprocess (the server gets its own process, as in real use), then measures:

1. ``--clients`` concurrent clients sending one text each, against the same requests sent one after
   another over one keep-alive connection: throughput ratio (what dynamic batching buys), ``--rounds`` times;
2. p50/p99 request latency, sequential and concurrent;
3. a warm ``ragen query --server URL`` against a cold ``ragen query`` (a fresh process that loads the
   model), both as subprocesses on the same index, and whether their hits agree;
4. the largest difference between served vectors (batched with the others) and in-process ``encode``.

Every count is fixed and every request and subprocess has a timeout. Loopback only.

    python benchmarks/bench_serve.py --model minilm --docs 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCIFACT = ROOT.parent / "shared" / "data" / "scifact"


def corpus_texts(n: int) -> list[str]:
    """``n`` documents: SciFact abstracts when the shared data is present, else synthetic sentences."""
    path = SCIFACT / "corpus.jsonl"
    if path.is_file():
        out = []
        with path.open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                out.append((row.get("title", "") + "\n\n" + row.get("text", "")).strip())
                if len(out) == n:
                    return out
    rng = np.random.default_rng(0)
    words = "plant ocean protein cell gene light water energy sugar tide moon virus drug trial dose".split()
    return [" ".join(rng.choice(words, size=60)) for _ in range(n)]


def query_texts(n: int) -> list[str]:
    path = SCIFACT / "queries.jsonl"
    out = []
    if path.is_file():
        with path.open(encoding="utf-8") as f:
            for line in f:
                out.append(json.loads(line)["text"])
                if len(out) == n:
                    return out
    return out + [f"what does protein {i} do in the cell?" for i in range(n - len(out))]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


async def sequential(url: str, texts: list[str], model: str) -> tuple[float, list[float]]:
    import httpx

    lat = []
    async with httpx.AsyncClient(timeout=120) as client:
        t0 = time.perf_counter()
        for text in texts:
            t = time.perf_counter()
            r = await client.post(url + "/v1/embeddings", json={"input": text, "model": model})
            r.raise_for_status()
            lat.append(time.perf_counter() - t)
        return time.perf_counter() - t0, lat


async def concurrent(url: str, texts: list[str], model: str) -> tuple[float, list[float], np.ndarray]:
    import httpx

    limits = httpx.Limits(max_connections=len(texts), max_keepalive_connections=len(texts))
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        # open the connections first, so the round measures requests, not TCP handshakes
        await asyncio.gather(*(client.get(url + "/health") for _ in texts))

        async def one(text: str):
            t = time.perf_counter()
            r = await client.post(url + "/v1/embeddings", json={"input": text, "model": model})
            r.raise_for_status()
            return time.perf_counter() - t, r.json()["data"][0]["embedding"]

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(t) for t in texts))
        wall = time.perf_counter() - t0
    return wall, [r[0] for r in results], np.asarray([r[1] for r in results], dtype=np.float32)


def run_cli(args: list[str], env: dict, timeout: float) -> tuple[float, list[dict]]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "ragen", *args], capture_output=True, text=True, timeout=timeout,
                         cwd=ROOT, env=env)
    took = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"ragen {' '.join(args[:2])} failed: {out.stderr.strip().splitlines()[-1:]}")
    return took, json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm", help="encoder spec to serve")
    ap.add_argument("--base-model", default=None)
    ap.add_argument("--docs", type=int, default=300, help="files in the benchmark index")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=10, help="repetitions of the sequential and concurrent runs")
    ap.add_argument("--cold-runs", type=int, default=2)
    ap.add_argument("--warm-runs", type=int, default=5)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=600.0, help="per subprocess")
    args = ap.parse_args()

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("RAGEN_SERVER", None)
    from ragen import load_encoder
    from ragen.retriever import build_index

    encoder = load_encoder(args.model, device="cpu", base_model=args.base_model)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "docs"
        src.mkdir()
        for i, text in enumerate(corpus_texts(args.docs)):
            (src / f"doc{i:04d}.txt").write_text(text, encoding="utf-8")
        index_dir = Path(tmp) / "index"
        t0 = time.perf_counter()
        build_index(src, index_dir, encoder=encoder)
        print(f"index: {args.docs} files in {time.perf_counter() - t0:.1f} s")

        cmd = [sys.executable, "-m", "ragen", "serve", "--model", args.model, "--index", f"bench={index_dir}",
               "--port", "0", "--device", "cpu", "--max-wait-ms", str(args.max_wait_ms)]
        if args.base_model:
            cmd += ["--base-model", args.base_model]
        server = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        try:
            deadline = time.monotonic() + args.timeout
            line = ""
            while "listening on" not in line:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"the server did not start: {line.strip()}")
                line = server.stderr.readline()
            url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
            import httpx

            model = httpx.get(url + "/v1/models", timeout=60).json()["data"][0]["id"]
            texts = query_texts(args.clients)
            asyncio.run(sequential(url, texts, model))  # warm-up: first-call costs out of the way
            seq_walls, seq_lat, conc_walls, conc_lat = [], [], [], []
            served = None
            for _ in range(args.rounds):
                wall, lat = asyncio.run(sequential(url, texts, model))
                seq_walls.append(wall)
                seq_lat += lat
                wall, lat, served = asyncio.run(concurrent(url, texts, model))
                conc_walls.append(wall)
                conc_lat += lat
            metrics = httpx.get(url + "/metrics", timeout=60).text

            query = texts[0]
            warm = []
            for _ in range(args.warm_runs):
                took, warm_hits = run_cli(["query", query, "--server", url, "--json", "-k", "5"], env, args.timeout)
                warm.append(took)
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
        cold = []
        for _ in range(args.cold_runs):
            took, cold_hits = run_cli(["query", query, "--index", str(index_dir), "--json", "-k", "5",
                                       "--device", "cpu"], env, args.timeout)
            cold.append(took)

    reference = encoder.encode_documents(texts, normalize=True)
    diff = float(np.abs(served - reference).max())
    batches = re.search(r"^ragen_batch_size_count (\S+)", metrics, re.M)
    batch_sum = re.search(r"^ragen_batch_size_sum (\S+)", metrics, re.M)
    mean_batch = float(batch_sum.group(1)) / float(batches.group(1)) if batches and batch_sum else float("nan")
    seq_med, conc_med = statistics.median(seq_walls), statistics.median(conc_walls)
    n = len(texts)
    same_hits = [h["chunk_id"] for h in warm_hits] == [h["chunk_id"] for h in cold_hits]
    print(f"model {args.model}; {n} texts per round, {args.rounds} rounds; loopback; "
          f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"sequential : {seq_med * 1000:8.1f} ms per {n} requests ({n / seq_med:6.1f} req/s)  "
          f"latency p50 {pct(seq_lat, 50) * 1000:.1f} ms, p99 {pct(seq_lat, 99) * 1000:.1f} ms")
    print(f"concurrent : {conc_med * 1000:8.1f} ms per {n} requests ({n / conc_med:6.1f} req/s)  "
          f"latency p50 {pct(conc_lat, 50) * 1000:.1f} ms, p99 {pct(conc_lat, 99) * 1000:.1f} ms")
    # every sequential request (warm-up included) is one forward batch of one text; the rest are concurrent
    conc_batches = (float(batches.group(1)) - (args.rounds + 1) * n) / args.rounds if batches else float("nan")
    print(f"batching throughput ratio concurrent/sequential: {seq_med / conc_med:.2f}x "
          f"({conc_batches:.1f} forward batches per concurrent round of {n} requests; mean forward batch over "
          f"the whole run {mean_batch:.1f} texts)")
    print(f"query: cold `ragen query` median {statistics.median(cold):.2f} s, warm `ragen query --server` median "
          f"{statistics.median(warm):.3f} s: {statistics.median(cold) / statistics.median(warm):.1f}x; same hits: {same_hits}")
    print(f"served vectors vs in-process encode_documents(normalize=True): max abs diff {diff:.2e}")


if __name__ == "__main__":
    main()
