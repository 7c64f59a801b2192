"""Cross-check against the reference package: checkpoints written by ragen load in llm2vec-gen 0.1.3 and
give the same embeddings.

The reference needs transformers 4.x and peft, which cannot share an environment with ragen
(transformers 5.x), so it runs in a second virtual environment:

    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch==2.13.0 \\
        && /tmp/refvenv/bin/pip install transformers==4.56.2 peft==0.18.0 pyyaml \\
        && /tmp/refvenv/bin/pip install --no-deps llm2vec-gen==0.1.3
    python benchmarks/reference_compat.py --reference-python /tmp/refvenv/bin/python

Checks: (1) the reference-format fixture re-saved by ragen, (2) a fresh model from
``LLM2VecGen.initialize`` on a random backbone. Prints the max abs difference per checkpoint.
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
spec = json.load(open(sys.argv[1]))
for name, path in spec["checkpoints"].items():
    model = LLM2VecGenModel.from_pretrained(path)
    model.model.eval()
    got = model.encode(spec["texts"]).float().numpy()
    diff = float(np.abs(got - np.array(spec["embeddings"][name])).max())
    print(json.dumps({"checkpoint": name, "max_abs_diff": diff}))
"""


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
        spec = {"texts": texts, "checkpoints": {"fixture_resaved": str(t / "fixture_resaved"), "init": str(t / "init")},
                "embeddings": {"fixture_resaved": resaved.encode(texts).tolist(), "init": init.encode(texts).tolist()}}
        (t / "spec.json").write_text(json.dumps(spec))
        (t / "reader.py").write_text(READER)
        proc = subprocess.run([args.reference_python, str(t / "reader.py"), str(t / "spec.json")], cwd=tmp,
                              capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
        if proc.returncode != 0:
            sys.exit(f"reference failed:\n{proc.stderr[-2000:]}")
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                print(f"{row['checkpoint']:>16}: reference vs ragen max |diff| = {row['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
