"""LLM2Vec-Gen computes exactly what the reference computes: golden outputs written by llm2vec-gen 0.1.3."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ragen import LLM2VecGen

TOL = 1e-5


def test_each_text_alone_matches_reference(fixture_model, golden):
    expected = np.array(golden["embeddings_single"], dtype=np.float32)
    for i, text in enumerate(golden["texts"]):
        got = fixture_model.encode([text])
        assert got.shape == (1, expected.shape[1]) and got.dtype == np.float32
        assert np.abs(got[0] - expected[i]).max() < TOL, f"text {i} differs"


@pytest.mark.parametrize("batch_size", [32, 4, 1])
def test_batched_matches_reference(fixture_model, golden, batch_size):
    got = fixture_model.encode(golden["texts"], batch_size=batch_size)
    assert np.abs(got - np.array(golden["embeddings_batch"])).max() < TOL
    assert np.abs(got - np.array(golden["embeddings_single"])).max() < TOL


def test_decode_ids_match_reference(fixture_model, golden):
    text = golden["texts"][golden["decode_text_index"]]
    ids = fixture_model.decode_ids([text], max_new_tokens=len(golden["decode_greedy_ids"]))
    assert ids == [golden["decode_greedy_ids"]]


def test_fixture_shape_facts(fixture_model, golden):
    assert fixture_model.dim == len(golden["embeddings_single"][0]) == 48
    assert fixture_model.num_special_tokens == 10
    assert fixture_model.special_tokens[0] == "<question1>"
    # The long text is truncated to max_length with all special tokens kept at the end.
    ids = fixture_model.tokenize(golden["texts"], max_length=golden["max_length"])
    assert max(len(row) for row in ids) == golden["max_length"]
    for row in ids:
        assert row[-10:] == fixture_model.special_ids


def _reference_greedy(model: LLM2VecGen, text: str, steps: int) -> list[int]:
    """The reference's decoding loop: no KV cache, the whole prefix recomputed every step, batch size 1."""
    states = torch.from_numpy(model.reconstruction_states([text])).to(model.dtype)  # (1, n, hidden)
    table = model.lm.get_input_embeddings()
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model.lm(inputs_embeds=states, attention_mask=torch.ones(states.shape[:2], dtype=torch.long)).logits
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if nxt in model._stop_ids:
                break
            states = torch.cat([states, table(torch.tensor([[nxt]]))], dim=1)
    return out


def test_cached_batched_decode_equals_cacheless_loop(tiny_model):
    texts = ["why is the sky blue?", "the quick brown fox", "", "paris is the capital of france. " * 5]
    expected = [_reference_greedy(tiny_model, t, 12) for t in texts]
    assert len({tuple(e) for e in expected}) > 1, "texts should decode differently for the test to mean anything"
    assert tiny_model.decode_ids(texts, max_new_tokens=12, batch_size=3) == expected
    assert tiny_model.decode_ids(texts, max_new_tokens=12, batch_size=1) == expected
    decoded = tiny_model.decode(texts, max_new_tokens=12)
    assert decoded[0] == tiny_model.tokenizer.decode(expected[0], skip_special_tokens=True).strip()


def test_decode_stops_at_end_of_response(tiny_model):
    # Force an immediate stop: a model whose stop set contains every token stops after one step.
    saved = tiny_model._stop_ids
    try:
        tiny_model._stop_ids = list(range(len(tiny_model.tokenizer)))
        ids = tiny_model.decode_ids(["hello", "world"], max_new_tokens=20)
    finally:
        tiny_model._stop_ids = saved
    assert [len(r) for r in ids] == [1, 1]
