"""The logit lens, reference numerics and decoding, each against an independent computation written the
way the reference package (llm2vec-gen) computes it."""

from __future__ import annotations

import json
import shutil
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ragen import LLM2VecGen
from ragen.errors import RagenError

from .conftest import FIXTURE

BASE = FIXTURE / "base"
CKPT = FIXTURE / "checkpoint"


class ReferenceWay:
    """The reference's encoder on the fixture, written from its description: the backbone with the vocabulary
    resized and the trained rows put in place (PEFT trainable tokens), ``text + specials`` tokenized with
    truncation and the specials forced into the last K positions, final hidden states of the last K
    positions, heads as ``nn.Linear`` in the checkpoint dtype, mean in that dtype."""

    def __init__(self, ckpt, dtype: torch.dtype) -> None:
        import yaml

        self.dtype = dtype
        self.tok = AutoTokenizer.from_pretrained(str(ckpt))
        self.specials = yaml.safe_load((ckpt / "run_config.yml").read_text())["special_tokens"]
        self.lm = AutoModelForCausalLM.from_pretrained(str(BASE), dtype=dtype).eval()
        tensors = load_file(str(ckpt / "encoder" / "adapter_model.safetensors"))
        indices = json.loads((ckpt / "encoder" / "adapter_config.json").read_text())["token_indices"]
        table = tensors["base_model.model.embed_tokens.base_layer.weight"].clone()
        table[indices] = tensors["base_model.model.embed_tokens.trainable_tokens_delta"]
        self.table = table.to(dtype)
        self.special_ids = torch.tensor(self.tok.convert_tokens_to_ids(self.specials))
        self.heads = []
        for name in ("reconstruction_mlp", "alignment_mlp"):
            blob = torch.load(ckpt / name, weights_only=True)
            head_dtype = getattr(torch, blob["config"]["dtype"].replace("torch.", ""))
            lin = torch.nn.Linear(blob["config"]["input_dim"], blob["config"]["output_dim"]).to(head_dtype)
            lin.load_state_dict({k.replace("projection.", ""): v for k, v in blob["state_dict"].items()})
            self.heads.append(lin)

    @torch.no_grad()
    def raw_states(self, text: str) -> torch.Tensor:
        batch = self.tok([text + "".join(self.specials)], truncation=True, max_length=512, return_tensors="pt")
        ids = batch["input_ids"]
        if int(torch.isin(ids, self.special_ids).sum()) < len(self.specials):
            ids[0, -len(self.specials):] = self.special_ids
        x = torch.nn.functional.embedding(ids, self.table)
        out = self.lm.model(inputs_embeds=x, attention_mask=batch["attention_mask"])
        return out.last_hidden_state[:, -len(self.specials):]  # (1, K, hidden), backbone dtype

    @torch.no_grad()
    def embedding(self, text: str) -> np.ndarray:
        h = self.raw_states(text)
        for lin in self.heads:
            h = lin(h)
        return h.mean(dim=1).float().numpy()[0]

    @torch.no_grad()
    def lens(self, text: str, k: int = 5) -> list[list[str]]:
        logits = self.lm.lm_head(self.raw_states(text))[0]  # (K, vocab)
        return [[self.tok.decode([int(i)]) for i in row] for row in logits.topk(k, dim=-1).indices]


# ---------------------------------------------------------------------------------------------------------
# logit lens
# ---------------------------------------------------------------------------------------------------------
def test_top_tokens_is_the_reference_logit_lens(fixture_model, golden):
    ref = ReferenceWay(CKPT, torch.float32)
    texts = golden["texts"][:6]
    got = fixture_model.top_tokens(texts)  # default k=5, like the reference script
    for text, per_position in zip(texts, got):
        assert len(per_position) == fixture_model.num_pooled
        assert [[tok for tok, _ in pos] for pos in per_position] == ref.lens(text)
        for pos in per_position:
            probs = [p for _, p in pos]
            assert len(pos) == 5 and probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1
    # Not the post-reconstruction-head view the old top_tokens gave.
    recon = torch.from_numpy(fixture_model.reconstruction_states(texts[:1]))[0]
    post_head = fixture_model.lm.get_output_embeddings()(recon).topk(5, dim=-1).indices
    post_tokens = [[fixture_model.tokenizer.decode([int(i)]) for i in row] for row in post_head]
    assert post_tokens != [[tok for tok, _ in pos] for pos in got[0]]


def test_top_tokens_batch_invariant_and_validated(fixture_model, golden):
    texts = golden["texts"][:5]
    batched = fixture_model.top_tokens(texts, k=3, batch_size=2)
    alone = [fixture_model.top_tokens([t], k=3)[0] for t in texts]
    assert [[[t for t, _ in pos] for pos in row] for row in batched] == [[[t for t, _ in pos] for pos in row] for row in alone]
    with pytest.raises(RagenError, match="positive integer"):
        fixture_model.top_tokens(["x"], k=0)


# ---------------------------------------------------------------------------------------------------------
# numerics="reference": heads and mean in the checkpoint dtype, bit for bit
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """The fixture as a bf16 run: run_config torch_dtype and both heads' recorded dtype are bfloat16 (the
    published checkpoints' setting)."""
    import yaml

    dst = tmp_path_factory.mktemp("bf16") / "ckpt"
    shutil.copytree(CKPT, dst)
    cfg = yaml.safe_load((dst / "run_config.yml").read_text())
    cfg["torch_dtype"] = "bfloat16"
    (dst / "run_config.yml").write_text(yaml.safe_dump(cfg))
    for name in ("reconstruction_mlp", "alignment_mlp"):
        blob = torch.load(dst / name, weights_only=True)
        blob["config"]["dtype"] = "torch.bfloat16"
        torch.save(blob, dst / name)
    return dst


def test_reference_numerics_reproduce_bf16_vectors_bit_for_bit(bf16_checkpoint, golden):
    ref = ReferenceWay(bf16_checkpoint, torch.bfloat16)
    model = LLM2VecGen.from_pretrained(bf16_checkpoint, base_model=str(BASE), device="cpu", numerics="reference")
    assert model.dtype == torch.bfloat16  # the checkpoint's torch_dtype, as the reference loads it
    texts = golden["texts"]
    expected = np.stack([ref.embedding(t) for t in texts])
    got = np.stack([model.encode([t])[0] for t in texts])
    assert got.dtype == np.float32
    assert np.array_equal(got, expected)
    assert np.array_equal(got, torch.from_numpy(got).to(torch.bfloat16).float().numpy()), "bf16 values"
    # The default numerics keep heads and mean in float32 on the same bf16 backbone: close, not equal.
    fp32 = LLM2VecGen.from_pretrained(bf16_checkpoint, base_model=str(BASE), device="cpu", dtype="bfloat16")
    default = np.stack([fp32.encode([t])[0] for t in texts])
    assert not np.array_equal(default, expected)
    cos = (default * expected).sum(1) / np.linalg.norm(default, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() > 0.99
    assert model.fingerprint == fp32.fingerprint  # same function, different rounding
    # Decoding and the lens work in reference numerics too: the reconstruction states are bf16 values.
    states = model.reconstruction_states(texts[:2])
    assert states.dtype == np.float32
    assert np.array_equal(states, torch.from_numpy(states).to(torch.bfloat16).float().numpy())
    assert len(model.decode_ids(texts[:2], max_new_tokens=3)) == 2 and len(model.top_tokens(texts[:1])[0]) == 10


def test_reference_numerics_in_float32_equal_the_default(fixture_model, golden):
    model = LLM2VecGen.from_pretrained(CKPT, base_model=str(BASE), device="cpu", numerics="reference")
    assert model.dtype == torch.float32  # the fixture was trained in float32
    assert np.abs(model.encode(golden["texts"]) - np.array(golden["embeddings_batch"])).max() < 1e-5
    with pytest.raises(RagenError, match="unknown numerics"):
        LLM2VecGen.from_pretrained(CKPT, base_model=str(BASE), device="cpu", numerics="fast")


# ---------------------------------------------------------------------------------------------------------
# decoding survives transformers' past_key_values -> cache rename
# ---------------------------------------------------------------------------------------------------------
class _Wrapper(torch.nn.Module):
    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.generation_config = inner.generation_config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()


class NewNameLM(_Wrapper):
    """A causal LM whose forward knows only ``cache`` (transformers 5.40 onwards)."""

    def forward(self, inputs_embeds=None, attention_mask=None, cache=None, use_cache=None, logits_to_keep=0):
        return self.inner(inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache,
                          use_cache=use_cache, logits_to_keep=logits_to_keep)


class _OldOutput(dict):
    """An output with the old field name (transformers' own ModelOutput now renames it on construction)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class OldNameLM(_Wrapper):
    """A causal LM whose forward knows only ``past_key_values`` (transformers before 5.24)."""

    def forward(self, inputs_embeds=None, attention_mask=None, past_key_values=None, use_cache=None, logits_to_keep=0):
        out = self.inner(inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=past_key_values,
                         use_cache=use_cache, logits_to_keep=logits_to_keep)
        return _OldOutput(logits=out.logits, past_key_values=out["cache"])


def test_decoding_works_on_both_sides_of_the_cache_rename(tiny_model):
    texts = ["why is the sky blue?", "the quick brown fox", "paris is the capital of france. " * 3]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expected = tiny_model.decode_ids(texts, max_new_tokens=10, batch_size=2)
    assert not [w for w in caught if "past_key_values" in str(w.message)], "decoding uses a deprecated name"
    states = tiny_model.reconstruction_states(texts)
    real = tiny_model.lm
    try:
        for wrapper in (NewNameLM, OldNameLM):
            tiny_model.lm = wrapper(real)
            assert tiny_model.generate_from_states(states, max_new_tokens=10, batch_size=2) == expected, wrapper.__name__
    finally:
        tiny_model.lm = real
