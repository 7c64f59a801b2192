"""Cross-check ragen's native LLM2Vec teacher (``teacher.model: llm2vec:MNTP+SIMCSE``) against the
``llm2vec`` package and PEFT, computing the teacher exactly as the LLM2Vec-Gen reference does
(``scripts/train.py`` + ``llm2vec_gen/losses.py``): a bidirectional backbone, ``PeftModel`` MNTP adapter
merged, SimCSE adapter on top, masked mean of the last hidden states over the left-padded batch.

The llm2vec package needs transformers <= 4.44, so it runs in a second virtual environment that
borrows this one's torch (nothing is installed into this environment):

    L2V=../llm2vec-venv            # any directory outside the checkout
    python3 -m venv "$L2V"
    python -c "import site; print(site.getsitepackages()[0])" \
        > "$("$L2V"/bin/python -c 'import site; print(site.getsitepackages()[0])')/zz_ragen_venv.pth"
    "$L2V"/bin/pip install "transformers==4.44.2" "peft==0.12.0" "tokenizers<0.20" "huggingface-hub<0.25"
    "$L2V"/bin/pip install --no-deps llm2vec
    python benchmarks/llm2vec_teacher_compat.py --reference-python "$L2V"/bin/python

(``python`` is this environment's; the .pth line lets the second one import its torch.)

Builds a random Llama backbone (llm2vec's bidirectional classes cover Llama, Mistral, Gemma, Qwen2) and
two random LoRA adapters in PEFT's file format, embeds the same texts both ways and prints the max
absolute and relative differences (float32, CPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

READER = r"""
import json, sys, numpy as np, torch
from peft import PeftModel
from llm2vec.models import LlamaBiModel
spec = json.load(open(sys.argv[1]))
dtype = getattr(torch, spec["dtype"])
model = LlamaBiModel.from_pretrained(spec["base"], torch_dtype=dtype, attn_implementation=spec["attn"])
model = PeftModel.from_pretrained(model, spec["mntp"]).merge_and_unload()
model = PeftModel.from_pretrained(model, spec["simcse"])
model.eval()
# Token ids come from this environment (tokenizers 0.19 cannot read a tokenizer.json written by 0.23),
# made with the reference collator's call: stripped text, left padding to the longest, truncation at 512.
enc = {k: torch.tensor(v) for k, v in spec["encoded"].items()}
with torch.no_grad():
    hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
m = enc["attention_mask"].unsqueeze(-1).float()
hidden = hidden.double()
ref = ((hidden * m.double()).sum(1) / m.double().sum(1).clamp(min=1e-9)).numpy()
got = np.array(spec["ragen"])
rows = np.abs(got - ref).max(1) / np.abs(ref).max(1)
unpadded = enc["attention_mask"].all(dim=1).numpy()  # rows with no padding: identical positions both ways
print(json.dumps({"attn": spec["attn"], "dtype": spec["dtype"], "max_abs_diff": float(np.abs(got - ref).max()),
                  "max_rel_diff_unpadded_rows": float(rows[unpadded].max()),
                  "max_rel_diff": float((np.abs(got - ref).max(1) / np.abs(ref).max(1)).max()),
                  "ref_norm": float(np.linalg.norm(ref, axis=1).mean())}))
"""


def write_lora(directory: Path, backbone: Path, targets: tuple[str, ...], r: int, alpha: float, seed: int) -> None:
    """A random LoRA adapter as PEFT saves one (adapter_config.json + adapter_model.safetensors)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(backbone)
    hd = cfg.hidden_size // cfg.num_attention_heads
    shapes = {"q_proj": (cfg.num_attention_heads * hd, cfg.hidden_size),
              "k_proj": (cfg.num_key_value_heads * hd, cfg.hidden_size),
              "v_proj": (cfg.num_key_value_heads * hd, cfg.hidden_size),
              "o_proj": (cfg.hidden_size, cfg.num_attention_heads * hd),
              "gate_proj": (cfg.intermediate_size, cfg.hidden_size), "up_proj": (cfg.intermediate_size, cfg.hidden_size),
              "down_proj": (cfg.hidden_size, cfg.intermediate_size)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_hidden_layers):
        for t in targets:
            block = "self_attn" if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            out_f, in_f = shapes[t]
            key = f"base_model.model.layers.{layer}.{block}.{t}"
            tensors[key + ".lora_A.weight"] = torch.randn((r, in_f), generator=g) * 0.2
            tensors[key + ".lora_B.weight"] = torch.randn((out_f, r), generator=g) * 0.2
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": str(backbone), "r": r, "lora_alpha": alpha,
        "lora_dropout": 0.0, "target_modules": list(targets), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "task_type": None, "inference_mode": True}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference-python", required=True, help="python of a venv with llm2vec, peft, transformers 4.44")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="float64 shows the remaining float32 difference is rounding")
    args = p.parse_args()
    from ragen.testing import make_backbone

    texts = ["  why is the sky blue?  ", "paris", "the quick brown fox jumps over the lazy dog. " * 30,
             "a cache stores recent results so that repeated questions are answered faster."]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = make_backbone(root / "base", family="llama", hidden_size=args.hidden, num_layers=args.layers,
                             num_heads=8, num_kv_heads=4, seed=7)
        write_lora(root / "mntp", base, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                   r=8, alpha=16, seed=1)
        write_lora(root / "simcse", base, ("q_proj", "v_proj", "up_proj"), r=4, alpha=32, seed=2)
        import torch

        from ragen.training.llm2vec_teacher import LLM2VecTeacher

        teacher = LLM2VecTeacher(f"llm2vec:{root / 'mntp'}+{root / 'simcse'}", device="cpu",
                                 dtype=getattr(torch, args.dtype))
        ours = teacher.encode_documents(texts, batch_size=len(texts)).tolist()
        tok = teacher.tokenizer
        tok.padding_side = "left"
        enc = tok([t.strip() for t in texts], padding="longest", truncation=True, max_length=512)
        encoded = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        for attn in ("eager", "sdpa"):
            spec = root / f"spec-{attn}.json"
            spec.write_text(json.dumps({"base": str(base), "mntp": str(root / "mntp"), "simcse": str(root / "simcse"),
                                        "encoded": encoded, "ragen": ours, "attn": attn,
                                        "dtype": args.dtype}))
            res = subprocess.run([args.reference_python, "-c", READER, str(spec)], capture_output=True, text=True)
            if res.returncode != 0:
                sys.exit(f"reference run failed:\n{res.stderr[-3000:]}")
            print(res.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
