"""The LLM2Vec teacher (bidirectional backbone + merged MNTP LoRA + SimCSE LoRA, masked mean) against an
independent computation: merged weights and a hand-written bidirectional Qwen3 forward in float64."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ragen.errors import CheckpointError, DataError
from ragen.training.config import TeacherConfig
from ragen.training.teacher import load_teacher, teacher_config_key

_TEXTS = ["  the quick brown fox jumps over the lazy dog.  ", "paris is the capital of france.",
          "a cache stores recent results so that repeated questions are answered faster."]
_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _write_lora(directory: Path, backbone: Path, targets, r: int, alpha: float, seed: int, prefix: str) -> dict:
    """A PEFT LoRA adapter on disk exactly as PEFT saves one; returns {module: (A, B, scale)}."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(backbone)
    hidden, inter, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {"q_proj": (cfg.num_attention_heads * hd, hidden), "k_proj": (cfg.num_key_value_heads * hd, hidden),
              "v_proj": (cfg.num_key_value_heads * hd, hidden), "o_proj": (hidden, cfg.num_attention_heads * hd),
              "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    g = torch.Generator().manual_seed(seed)
    tensors, layers = {}, {}
    for layer in range(cfg.num_hidden_layers):
        for t in targets:
            block = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            name = f"layers.{layer}.{block}.{t}"
            out_f, in_f = shapes[t]
            a = torch.randn((r, in_f), generator=g) * 0.3
            b = torch.randn((out_f, r), generator=g) * 0.3
            tensors[f"{prefix}{name}.lora_A.weight"] = a
            tensors[f"{prefix}{name}.lora_B.weight"] = b
            layers[name] = (a.double(), b.double(), alpha / r)
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": str(backbone), "r": r, "lora_alpha": alpha,
        "lora_dropout": 0.05, "target_modules": list(targets), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "task_type": None}))
    return layers


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def _manual_mean(sd: dict, cfg, ids: list[int], *, causal: bool = False) -> np.ndarray:
    """Qwen3 forward written out in float64, attention over all tokens (or causal), mean over tokens."""
    hd, nh, nkv, eps = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rms_norm_eps
    theta = cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta
    x = sd["embed_tokens.weight"][ids]
    s = len(ids)
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = torch.arange(s, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        h = _rms(x, sd[p + "input_layernorm.weight"], eps)
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(s, nh, hd)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(s, nkv, hd)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(s, nkv, hd)
        q, k = _rms(q, sd[p + "self_attn.q_norm.weight"], eps), _rms(k, sd[p + "self_attn.k_norm.weight"], eps)
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / hd ** 0.5
        if causal:
            scores = scores.masked_fill(torch.ones(s, s).triu(1).bool(), float("-inf"))
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(s, nh * hd)
        x = x + attn @ sd[p + "self_attn.o_proj.weight"].T
        h = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        gate, up = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    return _rms(x, sd["norm.weight"], eps).mean(0).numpy()


@pytest.fixture(scope="module")
def llm2vec_parts(tmp_path_factory):
    from ragen.testing import make_backbone

    root = tmp_path_factory.mktemp("llm2vec")
    backbone = make_backbone(root / "base", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, seed=4)
    mntp = _write_lora(root / "mntp", backbone, _ALL, r=4, alpha=8, seed=1, prefix="base_model.model.")
    simcse = _write_lora(root / "simcse", backbone, ("q_proj", "v_proj", "down_proj"), r=2, alpha=16, seed=2,
                         prefix="base_model.model.model.")
    return backbone, root / "mntp", root / "simcse", mntp, simcse


def _expected(backbone: Path, adapters: list[dict], texts, causal: bool = False) -> np.ndarray:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(backbone)
    raw = load_file(str(backbone / "model.safetensors"))
    sd = {k.removeprefix("model."): v.double() for k, v in raw.items()}
    for layers in adapters:
        for name, (a, b, scale) in layers.items():
            sd[name + ".weight"] = sd[name + ".weight"] + scale * (b @ a)
    tok = AutoTokenizer.from_pretrained(backbone)
    return np.stack([_manual_mean(sd, cfg, tok(t.strip())["input_ids"], causal=causal) for t in texts])


def test_llm2vec_teacher_equals_an_independent_bidirectional_computation(llm2vec_parts):
    backbone, mntp_dir, simcse_dir, mntp, simcse = llm2vec_parts
    teacher = load_teacher(TeacherConfig(model=f"llm2vec:{mntp_dir}+{simcse_dir}"), device="cpu")
    got = teacher.encode_documents(_TEXTS, batch_size=3)  # one left-padded batch of three lengths
    want = _expected(backbone, [mntp, simcse], _TEXTS)
    assert teacher.dim == 32 and got.shape == (3, 32)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(teacher.encode_documents(_TEXTS, batch_size=1), got, rtol=1e-5, atol=1e-6)
    causal = _expected(backbone, [mntp, simcse], _TEXTS, causal=True)
    assert np.abs(got - causal).max() > 100 * np.abs(got - want).max()  # really without the causal mask
    without_simcse = _expected(backbone, [mntp], _TEXTS)
    assert np.abs(got - without_simcse).max() > 100 * np.abs(got - want).max()  # the SimCSE LoRA counts
    # The explicit three-part spelling (base, MNTP, SimCSE) computes the same.
    explicit = load_teacher(TeacherConfig(model=f"llm2vec:{backbone}+{mntp_dir}+{simcse_dir}"), device="cpu")
    np.testing.assert_allclose(explicit.encode_documents(_TEXTS), got, rtol=1e-6)
    # A plain base as the first part: bidirectional, no MNTP.
    base_only = load_teacher(TeacherConfig(model=f"llm2vec:{backbone}+{simcse_dir}"), device="cpu")
    np.testing.assert_allclose(base_only.encode_documents(_TEXTS), _expected(backbone, [simcse], _TEXTS),
                               rtol=1e-4, atol=1e-5)
    assert teacher.fingerprint != base_only.fingerprint


def test_llm2vec_teacher_refuses_bad_adapters_in_one_line(tmp_path, llm2vec_parts):
    backbone, mntp_dir, simcse_dir, _, _ = llm2vec_parts
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((mntp_dir / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="no adapter_model.safetensors.*pickled adapter_model.bin is not read"):
        load_teacher(TeacherConfig(model=f"llm2vec:{pickled}+{simcse_dir}"), device="cpu")
    dora = tmp_path / "dora"
    dora.mkdir()
    cfg = json.loads((mntp_dir / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(CheckpointError, match="DoRA"):
        load_teacher(TeacherConfig(model=f"llm2vec:{dora}"), device="cpu")
    other = tmp_path / "other"
    from ragen.testing import make_backbone

    make_backbone(other, hidden_size=48, num_layers=2, seed=5)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_teacher(TeacherConfig(model=f"llm2vec:{other}+{mntp_dir}+{simcse_dir}"), device="cpu")
    with pytest.raises(DataError, match="expected llm2vec:MNTP\\+SIMCSE"):
        load_teacher(TeacherConfig(model="llm2vec:a++b"), device="cpu")
    with pytest.raises(DataError, match="pool by masked mean"):
        load_teacher(TeacherConfig(model=f"llm2vec:{mntp_dir}", pooling="cls"), device="cpu")


def test_llm2vec_teacher_cache_key_resolves_each_part(tmp_path, llm2vec_parts, monkeypatch):
    _, mntp_dir, simcse_dir, _, _ = llm2vec_parts
    monkeypatch.chdir(mntp_dir.parent)
    rel = teacher_config_key(TeacherConfig(model="llm2vec:mntp+simcse"))
    assert rel == teacher_config_key(TeacherConfig(model=f"llm2vec:{mntp_dir}+{simcse_dir}"))
    assert rel != teacher_config_key(TeacherConfig(model=f"llm2vec:{mntp_dir}"))


@pytest.mark.parametrize("family", ["qwen3", "llama", "qwen2"])
def test_every_published_backbone_family_runs_bidirectionally(tmp_path, family):
    """Qwen3, Llama and Qwen2 (Qwen2.5): the first position sees the last token, and a left-padded batch
    equals each text alone."""
    from ragen.testing import make_backbone, make_tokenizer
    from ragen.training.llm2vec_teacher import LLM2VecTeacher, bidirectional_mask

    if family == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        tok = make_tokenizer(512)
        torch.manual_seed(0)
        Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=64, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path / "b")
        tok.save_pretrained(tmp_path / "b")
        path = tmp_path / "b"
    else:
        path = make_backbone(tmp_path / "b", family=family, hidden_size=32, num_layers=2, seed=0)
    teacher = LLM2VecTeacher(f"llm2vec:{path}", device="cpu")
    ids = torch.tensor([[5, 9, 13, 21], [5, 9, 13, 40]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hidden = teacher.model(input_ids=ids, attention_mask=bidirectional_mask(mask, torch.float32)).last_hidden_state
    assert not torch.allclose(hidden[0, 0], hidden[1, 0])  # position 0 depends on the last token
    alone = np.stack([teacher.encode_documents([t])[0] for t in _TEXTS])
    np.testing.assert_allclose(teacher.encode_documents(_TEXTS, batch_size=3), alone, rtol=1e-4, atol=1e-5)
