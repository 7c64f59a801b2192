"""``ragen serve`` chat: what stepped generation buys embedding requests, and what it costs the answer.

A server on loopback (in this process, on a background thread) answers a long streamed chat completion
while a client sends embedding requests one after another. Measured for ``--step`` tokens per worker job
and for the whole answer in one job (the unstepped baseline):

1. embedding latency while the answer streams (p50 / max; requests start 0.3 s after the chat request),
   against the same requests on an idle server;
2. the answer's decoding rate (tokens/s) and time to its first piece.

Fixed counts, timeouts on every request, loopback only. Default model: the tiny LLM2Vec-Gen fixture.

    python benchmarks/bench_serve_chat.py
    python benchmarks/bench_serve_chat.py --model /ckpt/LLM2Vec-Gen-Qwen3-06B --base-model /models/Qwen3-0.6B
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "llm2vec-gen-tiny"
MESSAGES = [{"role": "user", "content": "Tell me a long story about the sea."}]


def embed_latencies(url: str, n: int) -> list[float]:
    out = []
    with httpx.Client(timeout=120) as client:
        for i in range(n):
            t0 = time.perf_counter()
            r = client.post(url + "/v1/embeddings", json={"input": f"tides and the moon {i}"})
            r.raise_for_status()
            out.append(time.perf_counter() - t0)
    return out


def run(encoder, step: int, tokens: int, embeds: int) -> dict:
    from ragen.serve import ServeConfig
    from ragen.serve.app import create_app
    from ragen.serve.runner import BackgroundServer

    config = ServeConfig(max_new_tokens=tokens, chat_step_tokens=step)
    with BackgroundServer(create_app(encoder, config=config)) as server:
        url = server.url
        embed_latencies(url, 3)  # warm-up
        idle = [embed_latencies(url, 1)[0] for _ in range(embeds)]  # one connection each, as below
        result: dict = {}

        def stream() -> None:
            t0 = time.perf_counter()
            with httpx.stream("POST", url + "/v1/chat/completions", timeout=600,
                              json={"messages": MESSAGES, "max_tokens": tokens, "stream": True,
                                    "stream_options": {"include_usage": True}}) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if '"content": "' in line and '"content": ""' not in line and "first" not in result:
                        result["first"] = time.perf_counter() - t0
                    if '"usage"' in line and '"completion_tokens"' in line:
                        import json

                        result["tokens"] = json.loads(line[len("data: "):])["usage"]["completion_tokens"]
            result["total"] = time.perf_counter() - t0

        t = threading.Thread(target=stream)
        t.start()
        time.sleep(0.3)  # the answer has started on the worker (its first piece may not be out yet)
        busy = []
        while t.is_alive() and len(busy) < embeds:
            busy += embed_latencies(url, 1)
        t.join(600)
    return {"idle_p50": statistics.median(idle), "busy_p50": statistics.median(busy) if busy else float("nan"),
            "busy_max": max(busy) if busy else float("nan"), "busy_n": len(busy),
            "tok_s": result.get("tokens", 0) / result["total"], "first": result.get("first", float("nan")),
            "total": result["total"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(FIXTURE / "checkpoint"), help="LLM2Vec-Gen checkpoint to serve")
    ap.add_argument("--base-model", default=str(FIXTURE / "base"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=1500, help="length of the streamed answer")
    ap.add_argument("--step", type=int, default=8, help="tokens per worker job (the server's --chat-step-tokens)")
    ap.add_argument("--embeds", type=int, default=20, help="embedding requests per phase")
    args = ap.parse_args()

    from ragen.encoders import load_encoder

    encoder = load_encoder(args.model, device=args.device, base_model=args.base_model)
    stepped = run(encoder, args.step, args.tokens, args.embeds)
    whole = run(encoder, args.tokens, args.tokens, args.embeds)
    shown = Path(args.model).resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else args.model
    print(f"model {shown}, answer of {args.tokens} tokens, {args.embeds} embedding requests per phase")
    print(f"{'':34s} {'step ' + str(args.step):>12s} {'whole answer':>14s} {'ratio':>8s}")
    rows = [("embed p50 idle (ms)", "idle_p50", 1000), ("embed p50 while streaming (ms)", "busy_p50", 1000),
            ("embed max while streaming (ms)", "busy_max", 1000), ("embeds answered while streaming", "busy_n", 1),
            ("answer tokens/s", "tok_s", 1), ("first piece (ms)", "first", 1000), ("answer total (s)", "total", 1)]
    for label, key, scale in rows:
        a, b = stepped[key] * scale, whole[key] * scale
        ratio = b / a if a else float("nan")
        print(f"{label:34s} {a:12.1f} {b:14.1f} {ratio:7.2f}x")


if __name__ == "__main__":
    main()
