"""Peak memory of ``ask`` against ``query``: answering reuses the encoder's backbone, so the peak RSS of a
process that retrieves *and* answers should stay within ~10% of one that only retrieves, plus the KV cache.
For contrast, a third process loads the backbone a second time as a separate causal LM (what a toolkit
with an embedder plus an LLM does).

    python benchmarks/bench_ask.py                    # a random 8-layer, 512-wide Qwen3 backbone (~30M params)
    python benchmarks/bench_ask.py --hidden 1024 --layers 16 --max-new-tokens 128

Each mode runs in a fresh subprocess (peak RSS = ``ru_maxrss``), on CPU, in float32, on the same index.
The model is random: the answers are noise; the memory is what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTION = "why is the sky blue?"


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mb() -> float:
    """Resident memory now (Linux /proc): shows what stays allocated after the loading transients."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(mode: str, work: Path, max_new_tokens: int) -> dict:
    from ragen.rag import AskSettings, ChatGenerator, RagPipeline
    from ragen.retriever import Retriever

    retriever = Retriever.open(work / "idx", device="cpu")
    hits = retriever.search(QUESTION, k=4)
    after_query = peak_mb()
    result = {"mode": mode, "query_peak_mb": after_query, "query_rss_mb": rss_mb(), "hits": len(hits)}
    if mode == "query":
        return result
    settings = AskSettings(k=4, max_new_tokens=max_new_tokens)
    if mode == "ask":
        rag = RagPipeline(retriever, settings=settings)  # the encoder's own lm
    else:  # "second-copy": the same backbone loaded again as a separate causal LM
        rag = RagPipeline(retriever, ChatGenerator.from_pretrained(work / "lm", device="cpu", dtype="float32"),
                          settings=settings)
    answer = rag.ask(QUESTION)
    result.update(peak_mb=peak_mb(), rss_mb=rss_mb(), prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens,
                  shared=rag.generator.lm is retriever.encoder.lm)
    return result


def kv_cache_mb(work: Path, tokens: int) -> float:
    cfg = json.loads((work / "lm" / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * tokens * 4 / 2**20  # K and V, fp32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--child", choices=["query", "ask", "second-copy"], help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.work, args.max_new_tokens)))
        return

    from ragen import load_encoder
    from ragen.retriever import build_index
    from ragen.testing import make_backbone, make_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_backbone(work / "lm", hidden_size=args.hidden, num_layers=args.layers, num_heads=8, num_kv_heads=4,
                      intermediate_size=3 * args.hidden, seed=0)
        make_checkpoint(work / "ckpt", work / "lm", num_special_tokens=10, alignment_dim=None)
        docs = work / "docs"
        docs.mkdir()
        for i in range(24):
            (docs / f"doc{i}.txt").write_text(f"document {i}: rayleigh scattering makes short wavelengths scatter more. " * 6)
        build_index(docs, work / "idx", encoder=load_encoder(str(work / "ckpt"), device="cpu"))
        params = sum(p.numel() for p in load_encoder(str(work / "ckpt"), device="cpu").lm.parameters())
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        runs = {}
        for mode in ("query", "ask", "second-copy"):
            res = subprocess.run([sys.executable, __file__, "--child", mode, "--work", str(work),
                                  "--max-new-tokens", str(args.max_new_tokens)], env=env, capture_output=True,
                                 text=True, check=True)
            runs[mode] = json.loads(res.stdout.strip().splitlines()[-1])
        tokens = runs["ask"]["prompt_tokens"] + runs["ask"]["completion_tokens"]
        kv = kv_cache_mb(work, tokens)
    q, a, two = runs["query"]["query_peak_mb"], runs["ask"]["peak_mb"], runs["second-copy"]["peak_mb"]
    weights = params * 4 / 2**20
    print(f"backbone: {params / 1e6:.1f}M parameters ({weights:.0f} MB fp32), {args.layers} layers, hidden {args.hidden}")
    print(f"ask: {runs['ask']['prompt_tokens']} prompt + {runs['ask']['completion_tokens']} new tokens, "
          f"KV cache {kv:.1f} MB, weights shared: {runs['ask']['shared']}")
    qr, ar, twor = runs["query"]["query_rss_mb"], runs["ask"]["rss_mb"], runs["second-copy"]["rss_mb"]
    print(f"{'process':<34}{'peak RSS (MB)':>14}{'vs query + KV':>15}{'RSS after (MB)':>16}")
    print(f"{'query only':<34}{q:>14.0f}{q / (q + kv):>14.2f}x{qr:>16.0f}")
    print(f"{'query + ask (shared backbone)':<34}{a:>14.0f}{a / (q + kv):>14.2f}x{ar:>16.0f}")
    print(f"{'query + ask (second copy loaded)':<34}{two:>14.0f}{two / (q + kv):>14.2f}x{twor:>16.0f}")
    print(f"resident after answering: shared {ar - qr:+.0f} MB over query, second copy {twor - qr:+.0f} MB "
          f"(the weights are {weights:.0f} MB)")


if __name__ == "__main__":
    main()
