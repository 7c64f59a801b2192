"""LLM2Vec-Gen encoder behaviour: batching, truncation, instructions, round trips, fingerprints, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from ragen import LLM2VecGen, load_encoder
from ragen.encoders import DEFAULT_DOCUMENT_INSTRUCTION, DEFAULT_QUERY_INSTRUCTION, Encoder
from ragen.errors import CheckpointError, EncoderSpecError, RagenError

from .conftest import FIXTURE

TEXTS = ["why is the sky blue?", "a", "", "the theorem follows from induction on the length of the proof. " * 3,
         "retrieval augmented generation finds documents", "0123456789 " * 20]


def test_is_an_encoder(tiny_model):
    assert isinstance(tiny_model, Encoder)
    assert tiny_model.dim == 32  # alignment head output (the teacher's dimension)
    assert tiny_model.reconstruction_dim == tiny_model.hidden_size == 64


def test_rows_in_input_order_and_batch_invariant(tiny_model):
    alone = np.stack([tiny_model.encode([t])[0] for t in TEXTS])
    for batch_size in (1, 2, 32):
        assert np.abs(tiny_model.encode(TEXTS, batch_size=batch_size) - alone).max() < 1e-5
    perm = [3, 0, 5, 1, 4, 2]
    shuffled = tiny_model.encode([TEXTS[i] for i in perm])
    assert np.abs(shuffled - alone[perm]).max() < 1e-5
    assert len({round(float(v[0]), 6) for v in alone}) == len(TEXTS), "distinct texts give distinct vectors"


def test_empty_input_list_and_empty_string(tiny_model):
    assert tiny_model.encode([]).shape == (0, tiny_model.dim)
    v = tiny_model.encode([""])
    assert v.shape == (1, tiny_model.dim) and np.isfinite(v).all()


def test_rejects_a_bare_string(tiny_model):
    with pytest.raises(TypeError, match="sequence of strings"):
        tiny_model.encode("not a list")


def test_normalize(tiny_model):
    v = tiny_model.encode(TEXTS, normalize=True)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_instructions_are_prefixes(tiny_model):
    q = tiny_model.encode_queries(["why is the sky blue?"])
    assert np.allclose(q, tiny_model.encode([DEFAULT_QUERY_INSTRUCTION + "why is the sky blue?"]), atol=1e-6)
    d = tiny_model.encode_documents(["rayleigh scattering"])
    assert np.allclose(d, tiny_model.encode([DEFAULT_DOCUMENT_INSTRUCTION + "rayleigh scattering"]), atol=1e-6)
    custom = tiny_model.encode_queries(["x"], instruction="Q: ")
    assert np.allclose(custom, tiny_model.encode(["Q: x"]), atol=1e-6)
    assert not np.allclose(q, tiny_model.encode(["why is the sky blue?"]), atol=1e-4)


def test_truncation_keeps_special_tokens_and_cuts_the_text(tiny_model):
    long = "the quick brown fox jumps over the lazy dog. " * 200
    full = tiny_model.tokenizer(long, add_special_tokens=True)["input_ids"]
    for max_length in (16, 64, 512):
        ids = tiny_model.tokenize([long], max_length=max_length)[0]
        assert len(ids) == max_length
        assert ids[-10:] == tiny_model.special_ids
        assert ids[:-10] == full[: max_length - 10]
    # Texts far beyond the limit are tokenized through a prefix; the result must be the same.
    huge = "photosynthesis turns light into sugar " * 3000
    assert tiny_model.tokenize([huge], max_length=64)[0][:-10] == tiny_model.tokenizer(huge)["input_ids"][:54]
    assert tiny_model.encode([long], max_length=64).shape == (1, tiny_model.dim)
    with pytest.raises(RagenError, match="max_length"):
        tiny_model.tokenize(["x"], max_length=10)


def test_special_token_text_inside_input_uses_trained_row(tiny_model):
    # A literal special token in the text is embedded with its trained row (as the reference does).
    ids = tiny_model.tokenize(["before <question3> after"])[0]
    assert ids.count(tiny_model.special_ids[2]) == 2
    x = tiny_model._embed_ids(torch.tensor([ids]))
    pos = ids.index(tiny_model.special_ids[2])
    assert torch.equal(x[0, pos], tiny_model._special_rows[2])


def test_save_load_round_trip_is_exact(fixture_model, tmp_path, golden):
    out = fixture_model.save_pretrained(tmp_path / "saved")
    for rel in ("run_config.yml", "encoder/adapter_config.json", "encoder/adapter_model.safetensors",
                "encoder/config.json", "reconstruction_mlp", "alignment_mlp", "encoder_decoder_config.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / rel).is_file(), rel
    head = torch.load(out / "alignment_mlp", weights_only=True)
    assert set(head["state_dict"]) == {"projection.weight", "projection.bias"}
    assert head["config"]["output_dim"] == 48
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["additional_special_tokens"][0] == "<question1>"  # what transformers 4.x (the reference) reads
    again = LLM2VecGen.from_pretrained(out, device="cpu")  # base model path was recorded in run_config.yml
    texts = golden["texts"]
    assert np.array_equal(again.encode(texts), fixture_model.encode(texts))
    assert again.fingerprint == fixture_model.fingerprint
    assert again.has_base_layer


def test_initialized_checkpoint_round_trip(tiny_checkpoint, tiny_model, tmp_path):
    saved = tiny_model.save_pretrained(tmp_path / "copy")
    again = LLM2VecGen.from_pretrained(saved, device="cpu")
    assert np.array_equal(again.encode(TEXTS), tiny_model.encode(TEXTS))


def test_fingerprint_is_stable_across_dtype_and_differs_across_models(fixture_model, tiny_model):
    bf16 = LLM2VecGen.from_pretrained(FIXTURE / "checkpoint", base_model=str(FIXTURE / "base"), device="cpu",
                                      dtype="bfloat16")
    assert bf16.fingerprint == fixture_model.fingerprint
    assert bf16.encode(["hello"]).dtype == np.float32
    assert tiny_model.fingerprint != fixture_model.fingerprint
    assert len(fixture_model.fingerprint) == 16


def test_top_tokens(tiny_model):
    top = tiny_model.top_tokens(["why is the sky blue?", "fox"], k=3)
    assert len(top) == 2 and len(top[0]) == tiny_model.num_pooled and len(top[0][0]) == 3
    probs = [p for _, p in top[0][0]]
    assert probs == sorted(probs, reverse=True) and all(0 < p <= 1 for p in probs)


def test_generate_from_states_validates_shape(tiny_model):
    with pytest.raises(RagenError, match="shape"):
        tiny_model.generate_from_states(np.zeros((1, 10, 7), dtype=np.float32))


# ---------------------------------------------------------------------------------------------------------
# errors a user can hit
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture()
def broken_copy(tmp_path):
    def make():
        dst = tmp_path / "ckpt"
        shutil.copytree(FIXTURE / "checkpoint", dst)
        return dst

    return make


def test_missing_run_config(broken_copy):
    ckpt = broken_copy()
    (ckpt / "run_config.yml").unlink()
    with pytest.raises(CheckpointError, match="run_config.yml"):
        LLM2VecGen.from_pretrained(ckpt, base_model=str(FIXTURE / "base"))


def test_unknown_encoding_mode(broken_copy):
    ckpt = broken_copy()
    (ckpt / "encoder_decoder_config.json").write_text('{"encoding_mode": "mean_pool", "save_decoder": false}')
    with pytest.raises(CheckpointError, match="encoding_mode 'mean_pool'.*last_N_tokens"):
        LLM2VecGen.from_pretrained(ckpt, base_model=str(FIXTURE / "base"))
    (ckpt / "encoder_decoder_config.json").write_text('{"encoding_mode": "last_11_tokens"}')
    with pytest.raises(CheckpointError, match="10 special tokens"):
        LLM2VecGen.from_pretrained(ckpt, base_model=str(FIXTURE / "base"))


def test_tokenizer_without_special_tokens(broken_copy):
    ckpt = broken_copy()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(FIXTURE / "base" / name, ckpt / name)
    with pytest.raises(CheckpointError, match="special tokens|token_indices"):
        LLM2VecGen.from_pretrained(ckpt, base_model=str(FIXTURE / "base"))


def test_missing_or_corrupt_adapter_and_heads(broken_copy):
    ckpt = broken_copy()
    (ckpt / "alignment_mlp").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="alignment_mlp"):
        LLM2VecGen.from_pretrained(ckpt, base_model=str(FIXTURE / "base"))
    (ckpt / "alignment_mlp").unlink()
    (ckpt / "encoder" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        LLM2VecGen.from_pretrained(ckpt, base_model=str(FIXTURE / "base"))
    (ckpt / "encoder" / "adapter_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="adapter_model.safetensors: missing"):
        LLM2VecGen.from_pretrained(ckpt, base_model=str(FIXTURE / "base"))


def test_heads_are_optional(broken_copy, fixture_model):
    ckpt = broken_copy()
    (ckpt / "alignment_mlp").unlink()
    model = LLM2VecGen.from_pretrained(ckpt, base_model=str(FIXTURE / "base"))
    assert model.dim == 64  # reconstruction states pooled directly
    assert model.fingerprint != fixture_model.fingerprint


def test_wrong_base_model(tiny_backbone):
    with pytest.raises(CheckpointError, match="hidden size|another backbone"):
        LLM2VecGen.from_pretrained(FIXTURE / "checkpoint", base_model=str(tiny_backbone))


def test_missing_base_model_says_how_to_pass_it(broken_copy):
    ckpt = broken_copy()  # run_config says model_name_or_path: base, which is not beside the copy
    with pytest.raises(CheckpointError, match="base_model"):
        LLM2VecGen.from_pretrained(ckpt)


def test_hub_id_offline_gives_a_local_path_hint():
    with pytest.raises(CheckpointError, match="local directory"):
        LLM2VecGen.from_pretrained("McGill-NLP/LLM2Vec-Gen-Qwen3-06B-does-not-exist")


def test_not_a_directory_nor_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        LLM2VecGen.from_pretrained(str(tmp_path / "nope" / "deeper"))


def test_load_encoder_specs(tiny_checkpoint, tiny_backbone):
    assert load_encoder(str(tiny_checkpoint), device="cpu").spec == str(tiny_checkpoint)
    mean = load_encoder(f"mean:{tiny_backbone}", device="cpu")
    assert mean.spec == f"mean:{tiny_backbone}" and mean.dim == 64
    for bad in ("", "nope:thing", "st:", "mean:"):
        with pytest.raises(EncoderSpecError):
            load_encoder(bad)
    with pytest.raises(EncoderSpecError, match="valid forms.*minilm.*st:.*mean:"):
        load_encoder("nope:thing")


def test_sentence_transformers_dir_hint(minilm):
    from ragen.encoders.baselines import minilm_path

    with pytest.raises(EncoderSpecError, match="use st:"):
        load_encoder(str(minilm_path()))


def test_unknown_device_is_a_clear_error():
    from ragen.encoders.base import resolve_device

    with pytest.raises(RagenError, match="unknown device 'xyz'"):
        resolve_device("xyz")
    assert resolve_device("cpu") == "cpu"
