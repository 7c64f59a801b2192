"""Encoder speed: ragen's LLM2Vec-Gen against the reference computation, side by side in one run.

Both run on the same random checkpoint of a realistic shape (default: hidden 768, 12 layers; built here,
nothing downloaded) and must produce the same outputs.

- encode: 256 texts of mixed length. Reference = what llm2vec-gen 0.1.3 does: a second copy of the
  backbone with a resized vocabulary, texts in the given order in fixed batches of 32, padded to the
  batch's longest. ragen = one backbone, length-sorted batches. Target: >= 1.5x.
- decode: 64 new tokens per text. Reference = its greedy loop: batch size 1, no KV cache, the whole
  prefix recomputed at every step. ragen = batched decoding with a KV cache. Target: >= 5x.
- load: ``from_pretrained`` time, and how much of it the load-time checks take (safetensors headers,
  NaN/inf scan of every backbone and checkpoint tensor, head validation), side by side.
- On CUDA (when present): bf16 encode tokens/s of a Qwen3-0.6B-shaped model with random weights, against
  the device's measured bf16 matmul rate.
- compile (``--compile``): eager against ``compile=True`` (torch.compile of the backbone, length buckets) on
  the same texts, each in a fresh process run twice on one empty inductor cache: cold (every kernel
  compiled) then warm (the FX graph cache of the first run). Prints the first-call time (all compiles),
  the steady-state speed-up, the bucketed shapes compiled and the max |diff| of the vectors.

    python benchmarks/bench_encoder.py                      # CPU defaults (a few minutes on 2 cores)
    python benchmarks/bench_encoder.py --texts 64 --layers 4  # quicker
    python benchmarks/bench_encoder.py --load-only            # just the load-time checks
    python benchmarks/bench_encoder.py --compile-only --hidden 384 --layers 4 --texts 128  # eager vs compiled
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ragen import LLM2VecGen  # noqa: E402
from ragen.testing import make_backbone, make_checkpoint, make_tokenizer  # noqa: E402

WORDS = ("the quick brown fox jumps over lazy dog how do plants grow photosynthesis turns light into sugar what is "
         "capital of france paris cache stores recent results so that repeated questions are answered faster why "
         "sky blue rayleigh scattering makes short wavelengths scatter more theorem follows from induction").split()


def mixed_texts(n: int, min_words: int, max_words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------------
# the reference computation (llm2vec-gen 0.1.3 semantics, re-implemented for timing)
# ----------------------------------------------------------------------------------------------------------
class ReferenceComputation:
    def __init__(self, ckpt: Path, model: LLM2VecGen) -> None:
        from transformers import AutoModel, AutoModelForCausalLM

        self.tok = model.tokenizer
        self.specials = list(model.special_tokens)
        self.special_ids = torch.tensor(model.special_ids)
        # Two backbone copies, as the reference loads them: a resized encoder and a causal-LM decoder.
        self.encoder = AutoModel.from_pretrained(model.base_model, dtype=model.dtype).to(model.device).eval()
        self.encoder.resize_token_embeddings(len(self.tok))
        with torch.no_grad():
            self.encoder.get_input_embeddings().weight[self.special_ids] = model.trained_rows().to(model.dtype)
        self.decoder = AutoModelForCausalLM.from_pretrained(model.base_model, dtype=model.dtype).to(model.device).eval()
        self.recon, self.align = model.reconstruction_head, model.alignment_head
        self.n = model.num_pooled
        self.device = model.device
        self.stop = set(model._stop_ids)

    @torch.no_grad()
    def _states(self, texts: list[str]) -> torch.Tensor:
        batch = self.tok([t + "".join(self.specials) for t in texts], padding=True, truncation=True, max_length=512,
                         return_tensors="pt")
        ids = batch["input_ids"]
        missing = torch.isin(ids, self.special_ids).sum(dim=1) < len(self.special_ids)
        ids[missing, -len(self.special_ids):] = self.special_ids
        h = self.encoder(input_ids=ids.to(self.device), attention_mask=batch["attention_mask"].to(self.device))
        states = h.last_hidden_state[:, -self.n:].float()  # (batch, n, hidden)
        return self.recon(states) if self.recon is not None else states

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            states = self._states(texts[i:i + batch_size])
            out.append((self.align(states) if self.align is not None else states).mean(dim=1).cpu().numpy())
        return np.concatenate(out)

    @torch.no_grad()
    def decode(self, text: str, steps: int) -> list[int]:
        x = self._states([text]).to(self.decoder.dtype)  # (1, n, hidden)
        table = self.decoder.get_input_embeddings()
        ids: list[int] = []
        for _ in range(steps):
            mask = torch.ones(x.shape[:2], dtype=torch.long, device=self.device)
            nxt = int(self.decoder(inputs_embeds=x, attention_mask=mask).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt in self.stop:
                break
            x = torch.cat([x, table(torch.tensor([[nxt]], device=self.device))], dim=1)
        return ids


def timed(fn, repeat: int = 1):
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def cpu_comparison(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _bench_checkpoint(Path(tmp), args)
        model = LLM2VecGen.from_pretrained(ckpt, device="cpu")
        ref = ReferenceComputation(ckpt, model)
        texts = mixed_texts(args.texts, 4, args.max_words)
        n_tokens = sum(len(t) for t in model.tokenize(texts))
        print(f"model: hidden {args.hidden}, {args.layers} layers; {len(texts)} texts, {n_tokens} tokens "
              f"(incl. special tokens), torch threads {torch.get_num_threads()}")

        # Warm up both paths once on a few texts so allocation and kernel selection stay out of the timings.
        model.encode(texts[:4]), ref.encode(texts[:4])
        t_ref, v_ref = timed(lambda: ref.encode(texts, batch_size=32))
        t_ours, v_ours = timed(lambda: model.encode(texts, batch_size=32))
        diff = float(np.abs(v_ref - v_ours).max())
        print(f"encode  reference {t_ref:7.2f} s ({n_tokens / t_ref:8.0f} tok/s) | ragen {t_ours:7.2f} s "
              f"({n_tokens / t_ours:8.0f} tok/s) | speed-up {t_ref / t_ours:5.2f}x | max |diff| {diff:.2e}")

        dec_texts = texts[: args.decode_texts]
        t_ref_d, ids_ref = timed(lambda: [ref.decode(t, args.new_tokens) for t in dec_texts])
        t_ours_d, ids_ours = timed(lambda: model.decode_ids(dec_texts, max_new_tokens=args.new_tokens,
                                                            batch_size=len(dec_texts)))
        same = sum(a == b for a, b in zip(ids_ref, ids_ours))
        n_new = sum(len(r) for r in ids_ours)
        print(f"decode  reference {t_ref_d:7.2f} s | ragen {t_ours_d:7.2f} s | speed-up {t_ref_d / t_ours_d:5.2f}x | "
              f"{len(dec_texts)} texts, {n_new} tokens generated, identical ids for {same}/{len(dec_texts)}")


def _bench_checkpoint(folder: Path, args: argparse.Namespace) -> Path:
    """A random checkpoint of ``--hidden``/``--layers`` size with a tokenizer trained on the benchmark words."""
    tok = make_tokenizer(vocab_size=2000, extra_corpus=[" ".join(WORDS)] * 4)
    base = make_backbone(folder / "base", hidden_size=args.hidden, num_layers=args.layers,
                         num_heads=args.hidden // 64, num_kv_heads=max(1, args.hidden // 256),
                         intermediate_size=4 * args.hidden, tokenizer=tok, seed=0)
    return make_checkpoint(folder / "ckpt", base, alignment_dim=args.hidden, seed=0)


def load_overhead(args: argparse.Namespace) -> None:
    """What validating a checkpoint at load time costs next to loading it."""
    from ragen.encoders.checkpoint import HEAD_FILES, ProjectionHead, check_finite, read_adapter
    from ragen.encoders.llm2vec_gen import _check_safetensors

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _bench_checkpoint(Path(tmp), args)
        t_load, model = timed(lambda: LLM2VecGen.from_pretrained(ckpt, device="cpu"), repeat=3)

        def checks() -> None:
            _check_safetensors(Path(tmp) / "base")
            read_adapter(ckpt / "encoder")
            for name in HEAD_FILES:
                ProjectionHead.load(ckpt / name)
            for name, param in model.lm.named_parameters():
                check_finite(param, "base", name)

        t_checks, _ = timed(checks, repeat=3)
        n = sum(p.numel() for p in model.lm.parameters())
        print(f"load    from_pretrained {t_load:6.2f} s | of which load-time checks {t_checks:6.3f} s "
              f"({100 * t_checks / t_load:4.1f}%) | {n / 1e6:.0f}M backbone parameters, float32")


def gpu_throughput(args: argparse.Namespace) -> None:
    """bf16 encode tokens/s for a Qwen3-0.6B-shaped model against the measured bf16 matmul ceiling."""
    dev = "cuda"
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    ceiling = 10 * 2 * 8192**3 / (time.perf_counter() - start)
    del a, b
    with tempfile.TemporaryDirectory() as tmp:
        tok = make_tokenizer(vocab_size=2000, extra_corpus=[" ".join(WORDS)] * 4)
        base = make_backbone(Path(tmp) / "base", hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8,
                             intermediate_size=3072, tokenizer=tok, seed=0)
        ckpt = make_checkpoint(Path(tmp) / "ckpt", base, alignment_dim=1024, seed=0)
        model = LLM2VecGen.from_pretrained(ckpt, device=dev, dtype="bfloat16")
        texts = mixed_texts(2048, 16, 380, seed=1)
        n_tokens = sum(len(t) for t in model.tokenize(texts))
        params = sum(p.numel() for n, p in model.lm.base_model.named_parameters() if "embed" not in n)
        model.encode(texts[:64], batch_size=64)
        for bs in (32, 128):
            t, _ = timed(lambda: model.encode(texts, batch_size=bs), repeat=2)
            achieved = 2 * params * n_tokens / t
            print(f"GPU bf16 encode (Qwen3-0.6B shape) batch {bs}: {n_tokens / t:,.0f} tok/s, "
                  f"{achieved / 1e12:.1f} TFLOP/s = {100 * achieved / ceiling:.1f}% of measured matmul "
                  f"{ceiling / 1e12:.0f} TFLOP/s")


def compile_child(args: argparse.Namespace) -> None:
    """One process: eager and compiled encoders on the same texts, timed in alternation (best and median of
    ``--rounds`` each, so load from other processes hits both alike); prints one JSON line."""
    import statistics

    from ragen.encoders.base import length_sorted_batches
    from ragen.encoders.compiled import bucket_batch, bucket_length

    texts = mixed_texts(args.texts, args.min_words, args.max_words)
    eager = LLM2VecGen.from_pretrained(args.compile_child, device=args.device)
    model = LLM2VecGen.from_pretrained(args.compile_child, device=args.device, compile=True)
    if not model.compiled:
        print(json.dumps({"error": model._compiled.fallback_reason}))
        return
    lengths = [len(t) for t in model.tokenize(model._apply_instruction(texts, model.document_instruction))]
    bs = args.batch_size
    batches = [[lengths[i] for i in idx] for idx in length_sorted_batches(lengths, bs)]
    eager_positions = sum(len(b) * max(b) for b in batches)
    compiled_positions = sum(bucket_batch(len(b), bs) * bucket_length(max(b), model.max_input_length) for b in batches)
    eager.encode_documents(texts[:bs], batch_size=bs)  # warm-up outside the timings
    t_first, v_comp = timed(lambda: model.encode_documents(texts, batch_size=bs))  # compiles every shape
    t_e, t_c, diff = [], [], float(np.abs(v_comp - eager.encode_documents(texts, batch_size=bs)).max())
    for _ in range(args.rounds):
        te, v_e = timed(lambda: eager.encode_documents(texts, batch_size=bs))
        tc, v_c = timed(lambda: model.encode_documents(texts, batch_size=bs))
        t_e.append(te), t_c.append(tc)
        diff = max(diff, float(np.abs(v_c - v_e).max()))
    print(json.dumps({"first_call_s": t_first, "eager_s": min(t_e), "compiled_s": min(t_c),
                      "eager_median_s": statistics.median(t_e), "compiled_median_s": statistics.median(t_c),
                      "tokens": sum(lengths), "eager_positions": eager_positions,
                      "compiled_positions": compiled_positions,
                      "shapes": sorted(s[0][:2] for s in model._compiled.shapes), "compiled": model.compiled,
                      "max_abs_diff": diff, "threads": torch.get_num_threads(), "device": args.device}))


def compile_comparison(args: argparse.Namespace) -> None:
    """Eager vs compile=True in two fresh processes sharing one empty inductor cache: cold, then warm."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = _bench_checkpoint(Path(tmp), args)
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(Path(tmp) / "inductor-cache"))
        cmd = [sys.executable, __file__, "--compile-child", str(ckpt), "--rounds", str(args.rounds), "--texts",
               str(args.texts), "--min-words",
               str(args.min_words), "--max-words", str(args.max_words), "--batch-size", str(args.batch_size),
               "--device", args.device]
        print(f"compile: model hidden {args.hidden}, {args.layers} layers; {args.texts} texts of "
              f"{args.min_words}..{args.max_words} words, batch {args.batch_size}, device {args.device}")
        for run in ("cold cache", "warm cache"):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                print(f"compile ({run}) failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
                return
            r = json.loads(lines[-1])
            if "error" in r:
                print(f"compile unavailable here: {r['error']}")
                return
            print(f"compile ({run}): first call {r['first_call_s']:6.1f} s ({len(r['shapes'])} bucketed shapes "
                  f"{r['shapes']}) | best of {args.rounds}: eager {r['eager_s']:6.2f} s "
                  f"({r['tokens'] / r['eager_s']:6.0f} tok/s), compiled {r['compiled_s']:6.2f} s "
                  f"({r['tokens'] / r['compiled_s']:6.0f} tok/s): speed-up {r['eager_s'] / r['compiled_s']:4.2f}x "
                  f"(median {r['eager_median_s'] / r['compiled_median_s']:4.2f}x) | positions computed: bucket padding "
                  f"+{100 * (r['compiled_positions'] / r['eager_positions'] - 1):.0f}% | max |diff| "
                  f"{r['max_abs_diff']:.1e} | {r['threads']} threads")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--max-words", type=int, default=300, help="texts get 4..N words (mixed lengths)")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--decode-texts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--skip-cpu", action="store_true")
    p.add_argument("--load-only", action="store_true", help="only measure load time and the load-time checks")
    p.add_argument("--compile", action="store_true", help="also compare eager with compile=True")
    p.add_argument("--compile-only", action="store_true", help="only compare eager with compile=True")
    p.add_argument("--min-words", type=int, default=4, help="compile comparison: texts get MIN..--max-words words")
    p.add_argument("--batch-size", type=int, default=32, help="compile comparison: encode batch size")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="compile comparison: device")
    p.add_argument("--rounds", type=int, default=5, help="compile comparison: timed rounds of each, alternating")
    p.add_argument("--compile-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.compile_child:
        compile_child(args)
        return
    if args.load_only:
        load_overhead(args)
        return
    if args.compile_only:
        compile_comparison(args)
        return
    if not args.skip_cpu:
        cpu_comparison(args)
        load_overhead(args)
    if args.compile:
        compile_comparison(args)
    if torch.cuda.is_available():
        gpu_throughput(args)
    else:
        print("no CUDA device: GPU throughput not measured")


if __name__ == "__main__":
    main()
