"""Cross-check against the reference package: checkpoints written by ragen load in llm2vec-gen 0.1.3 and
give the same embeddings.

The reference needs transformers 4.x and peft, which cannot share an environment with ragen
(transformers 5.x), so it runs in a second virtual environment:

    python3 -m venv "$REFVENV" && "$REFVENV"/bin/pip install torch==2.13.0 \\
        && "$REFVENV"/bin/pip install transformers==4.56.2 peft==0.18.0 pyyaml \\
        && "$REFVENV"/bin/pip install --no-deps llm2vec-gen==0.1.3
    python benchmarks/reference_compat.py --reference-python "$REFVENV"/bin/python

Checks: (1) the reference-format fixture re-saved by ragen, (2) a fresh model from
``LLM2VecGen.initialize`` on a random backbone, (3) the fixture as a bf16 run (``torch_dtype`` and both
heads bfloat16), each text encoded alone, against ``numerics="reference"`` (expected: bit-identical) and the
default float32 heads, (4) the logit lens (both heads removed, ``lm_head`` on the raw final-layer states,
top 5 per position, as ``scripts/logit_lens_analysis.py``) against ``top_tokens``. Prints the max abs
difference per checkpoint and the share of identical lens tokens.

Instead of a full torch install, the reference venv may borrow ragen's torch: put a ``.pth`` file holding
ragen's site-packages directory into the reference venv's site-packages (its own transformers 4.x,
tokenizers and huggingface_hub<1 then shadow ragen's).
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
import json, sys, numpy as np
from llm2vec_gen.models import LLM2VecGenModel
import torch
spec = json.load(open(sys.argv[1]))
for name, path in spec["checkpoints"].items():
    model = LLM2VecGenModel.from_pretrained(path)
    model.model.eval()
    if name in spec.get("single", []):
        got = np.stack([model.encode([t]).float().numpy()[0] for t in spec["texts"]])
    else:
        got = model.encode(spec["texts"]).float().numpy()
    for key, ours in spec["embeddings"][name].items():
        diff = float(np.abs(got - np.array(ours)).max())
        print(json.dumps({"checkpoint": name, "ragen": key, "max_abs_diff": diff,
                          "bit_identical": bool(np.array_equal(got, np.array(ours, dtype=np.float32)))}))
    if name in spec.get("lens", {}):
        model.model.alignment_mlp = None
        model.model.reconstruction_mlp = None
        agree = total = 0
        for text, ours in zip(spec["texts"], spec["lens"][name]):
            _, dec = model.encode([text], get_recon_hidden_states=True)
            ids = torch.topk(model.model.decoder_model.lm_head(dec), k=5, dim=-1).indices[0]
            theirs = [[model.tokenizer.decode([int(i)]) for i in row] for row in ids]
            agree += sum(a == b for pa, pb in zip(theirs, ours) for a, b in zip(pa, pb))
            total += sum(len(p) for p in theirs)
        print(json.dumps({"checkpoint": name, "lens_tokens_identical": agree, "lens_tokens": total}))
"""


def _singles(model, texts: list[str]) -> list[list[float]]:
    """Each text encoded alone (no padding), so bf16 results do not depend on batch composition."""
    import numpy as np

    return np.stack([model.encode([text])[0] for text in texts]).tolist()


def _as_bf16_run(src: Path, dst: Path) -> Path:
    """A copy of a checkpoint as a bf16 training run writes it: run_config torch_dtype and heads bfloat16."""
    import shutil

    import torch
    import yaml

    shutil.copytree(src, dst)
    cfg = yaml.safe_load((dst / "run_config.yml").read_text())
    cfg["torch_dtype"] = "bfloat16"
    (dst / "run_config.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    for name in ("reconstruction_mlp", "alignment_mlp"):
        blob = torch.load(dst / name, weights_only=True)
        blob["config"]["dtype"] = "torch.bfloat16"
        torch.save(blob, dst / name)
    return dst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference-python", required=True, help="python of a venv with llm2vec-gen 0.1.3 installed")
    args = p.parse_args()
    from ragen import LLM2VecGen
    from ragen.testing import make_backbone, make_checkpoint

    fixture = ROOT / "tests" / "fixtures" / "llm2vec-gen-tiny"
    texts = ["why is the sky blue?", "", "the quick brown fox " * 200, "paris"]
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        resaved = LLM2VecGen.from_pretrained(fixture / "checkpoint", base_model=str(fixture / "base"), device="cpu")
        resaved.save_pretrained(t / "fixture_resaved")
        init = LLM2VecGen.from_pretrained(make_checkpoint(t / "init", make_backbone(t / "base", seed=3), seed=4),
                                          device="cpu")
        bf16_dir = _as_bf16_run(t / "fixture_resaved", t / "fixture_bf16")
        ref_bf16 = LLM2VecGen.from_pretrained(bf16_dir, device="cpu", numerics="reference")
        fp32_heads = LLM2VecGen.from_pretrained(bf16_dir, device="cpu", dtype="bfloat16")
        lens = resaved.top_tokens(texts)
        spec = {"texts": texts,
                "checkpoints": {"fixture_resaved": str(t / "fixture_resaved"), "init": str(t / "init"),
                                "fixture_bf16": str(bf16_dir)},
                "single": ["fixture_bf16"],
                "embeddings": {"fixture_resaved": {"default": resaved.encode(texts).tolist()},
                               "init": {"default": init.encode(texts).tolist()},
                               "fixture_bf16": {"numerics=reference": _singles(ref_bf16, texts),
                                                "numerics=fp32": _singles(fp32_heads, texts)}},
                "lens": {"fixture_resaved": [[[tok for tok, _ in pos] for pos in row] for row in lens]}}
        (t / "spec.json").write_text(json.dumps(spec))
        (t / "reader.py").write_text(READER)
        proc = subprocess.run([args.reference_python, str(t / "reader.py"), str(t / "spec.json")], cwd=tmp,
                              capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
        if proc.returncode != 0:
            sys.exit(f"reference failed:\n{proc.stderr[-2000:]}")
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                if "lens_tokens" in row:
                    print(f"{row['checkpoint']:>16}: logit lens, reference vs top_tokens: "
                          f"{row['lens_tokens_identical']}/{row['lens_tokens']} tokens identical")
                else:
                    print(f"{row['checkpoint']:>16}: reference vs ragen ({row['ragen']}) max |diff| = "
                          f"{row['max_abs_diff']:.2e}, bit-identical: {row['bit_identical']}")


if __name__ == "__main__":
    main()
