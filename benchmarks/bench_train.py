"""Training throughput and peak memory of one LLM2Vec-Gen optimizer step at a realistic shape.

    PYTHONPATH=. python benchmarks/bench_train.py                 # CPU: hidden 768, 12 layers, batch 4 x (128 + 128)
    PYTHONPATH=. python benchmarks/bench_train.py --preset qwen3-0.6b   # CUDA: Qwen3-0.6B shape, batch 32 x (512 + 512)

Random weights (nothing is downloaded); the step is the real one (``TrainableLLM2VecGen``: backbone
forward over query + K specials, reconstruction head, soft-prompt decoder pass over the response, chunked
cross-entropy, alignment MSE, backward into the K rows and heads, AdamW). Tokens/s counts query and
response tokens. Peak memory: CUDA max allocated, or the process's peak RSS on CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PRESETS = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab, batch, query_len, response_len)
    "cpu-small": (768, 12, 12, 4, 2048, 32000, 4, 128, 128),
    "qwen3-0.6b": (1024, 28, 16, 8, 3072, 151936, 32, 512, 512),
}


def build_backbone(directory: Path, hidden: int, layers: int, heads: int, kv: int, inter: int, vocab: int) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ragen.testing import make_tokenizer

    tok = make_tokenizer(512)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, head_dim=hidden // heads, intermediate_size=inter,
                      max_position_embeddings=4096, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen3ForCausalLM(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="default: qwen3-0.6b on CUDA, cpu-small otherwise")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    ap.add_argument("--micro-batch", type=int, default=None, help="examples per forward (gradient accumulation)")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    args = ap.parse_args()

    from ragen import LLM2VecGen
    from ragen.training.data import Batch
    from ragen.training.loop import TrainableLLM2VecGen, _enable_gradient_checkpointing

    cuda = torch.cuda.is_available()
    preset = args.preset or ("qwen3-0.6b" if cuda else "cpu-small")
    hidden, layers, heads, kv, inter, vocab, batch, qlen, rlen = PRESETS[preset]
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    gc_on = args.gradient_checkpointing if args.gradient_checkpointing is not None else cuda
    micro = args.micro_batch or batch
    k, teacher_dim = 10, 384

    with tempfile.TemporaryDirectory() as tmp:
        backbone = build_backbone(Path(tmp) / "lm", hidden, layers, heads, kv, inter, vocab)
        model = LLM2VecGen.initialize(str(backbone), num_special_tokens=k, alignment_dim=teacher_dim, device=device,
                                      dtype=dtype, seed=0)
    if gc_on:
        _enable_gradient_checkpointing(model.lm)
    trainable = TrainableLLM2VecGen(model)
    opt = torch.optim.AdamW(trainable.parameters(), lr=3e-4)
    gen = torch.Generator().manual_seed(0)
    low = 3  # skip the tokenizer's special ids
    q = torch.randint(low, 500, (batch, qlen - k), generator=gen)
    q = torch.cat([q, torch.tensor(model.special_ids).expand(batch, k)], dim=1)  # (B, qlen) specials last
    r = torch.randint(low, vocab, (batch, rlen), generator=gen)  # (B, rlen)
    teacher = torch.randn((batch, teacher_dim), generator=gen)
    ones = torch.ones_like(q)
    chunks = [slice(i, i + micro) for i in range(0, batch, micro)]
    tokens = batch * (qlen + rlen)
    n_resp = batch * rlen

    def step() -> float:
        total = 0.0
        for c in chunks:
            b = Batch(q[c].to(device), ones[c].to(device), r[c].to(device), torch.ones_like(r[c]).to(device),
                      teacher[c].to(device))
            loss, rec, _ = trainable(b, 1.0 / n_resp, 1.0 / (batch * teacher_dim), gc_on)
            loss.backward()
            total += float(rec)
        torch.nn.utils.clip_grad_norm_(trainable.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total / n_resp

    step()  # warm-up (allocator, kernels)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
        where = f"CUDA max allocated ({torch.cuda.get_device_name()})"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
        where = f"CPU peak RSS ({torch.get_num_threads()} threads)"
    params = sum(p.numel() for p in model.lm.parameters())
    result = {"preset": preset, "device": device, "dtype": str(dtype).replace("torch.", ""),
              "backbone_params_m": round(params / 1e6, 1), "trainable_params_m": round(sum(p.numel() for p in trainable.parameters()) / 1e6, 3),
              "batch": batch, "micro_batch": micro, "query_len": qlen, "response_len": rlen, "K": k,
              "gradient_checkpointing": gc_on, "step_s": round(sec, 3), "tokens_per_s": round(tokens / sec, 1),
              "examples_per_s": round(batch / sec, 2), "peak_memory_gib": round(peak, 2), "peak_memory_kind": where}
    print(json.dumps(result, indent=2))
    print(f"{preset}: {tokens / sec:,.0f} training tokens/s ({sec:.2f} s/step, batch {batch} x ({qlen}+{rlen})), "
          f"peak memory {peak:.2f} GiB [{where}]", file=sys.stderr)


if __name__ == "__main__":
    main()
