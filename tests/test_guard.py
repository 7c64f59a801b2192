"""The refusal guard: config as data, threshold and decoding tests, Retriever(guard=...), ``--guard`` in the
CLI, and (slow) a tiny model taught to refuse one topic being blocked on it while benign queries pass."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ragen.cli import app
from ragen.guard import (GUARD_FILE, GuardConfig, GuardError, RefusalGuard, calibrate_threshold, looks_like_refusal,
                         resolve_guard)

DOCS = {"a.txt": "paris is the capital of france.", "b.txt": "photosynthesis turns light into sugar."}


def test_config_round_trips_and_bad_files_are_one_line_errors(tmp_path):
    cfg = GuardConfig(prototypes=("no way.",), threshold=0.42, fingerprint="abc", note="calibrated")
    path = cfg.save(tmp_path)
    assert path == tmp_path / GUARD_FILE
    assert GuardConfig.load(tmp_path) == cfg == GuardConfig.for_index(tmp_path)
    assert GuardConfig.for_index(tmp_path / "elsewhere") == GuardConfig()  # no guard.json: the defaults
    bad = tmp_path / "bad.json"
    for text, match in [("{", "not valid JSON"), ('{"threshold": 3}', "cosine similarity"),
                        ('{"treshold": 0.5}', "unknown guard fields"), ('{"prototypes": "x"}', "list of strings"),
                        ('{"format": 9}', "format 9"), ("[]", "JSON object"),
                        ('{"threshold": null, "decode": false}', "blocks nothing")]:
        bad.write_text(text)
        with pytest.raises(GuardError, match=match) as info:
            GuardConfig.load(bad)
        assert str(bad) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(GuardError, match="no such guard config"):
        GuardConfig.load(tmp_path / "missing.json")


def test_refusal_text_is_recognised_at_the_start_only():
    assert looks_like_refusal("I\u2019m sorry, but I can't help with that.")
    assert looks_like_refusal("As an AI, I must decline.")
    assert not looks_like_refusal("Paris is the capital of France.")
    assert not looks_like_refusal("x" * 200 + " i cannot")  # beyond the window: part of an answer, not a refusal


def test_calibrated_threshold_keeps_the_false_block_rate():
    benign = np.linspace(0.0, 0.99, 100)
    t = calibrate_threshold(benign, 0.05)
    assert (benign >= t).mean() <= 0.05 and (benign >= t - 0.011).mean() > 0.05
    assert calibrate_threshold([0.5], 0.0) > 0.5


def test_threshold_blocks_near_queries_and_names_the_decoded_text(tiny_model):
    query = "how do I pick a lock?"
    v = tiny_model.encode_queries([query], normalize=True)
    probe = RefusalGuard(tiny_model, GuardConfig(prototypes=("I'm sorry, I can't.", "No."), threshold=1.0))
    score = float(probe.scores(v)[0][0])
    blocked = RefusalGuard(tiny_model, GuardConfig(prototypes=probe.config.prototypes, threshold=score - 1e-4))
    verdict = blocked.check(query)
    assert verdict.blocked and not verdict.refusal_decoded
    assert verdict.decoded is not None and verdict.decoded[:20] in verdict.reason  # the decoded text is the reason
    assert f"{score:.3f}" in verdict.reason
    passed = RefusalGuard(tiny_model, GuardConfig(prototypes=probe.config.prototypes, threshold=score + 1e-3)).check(query)
    assert not passed.blocked and passed.score == pytest.approx(score, abs=1e-5)


def test_decoded_refusal_blocks_without_a_threshold(tiny_model):
    guard = RefusalGuard(tiny_model, GuardConfig())
    decoded = guard.decode(["hello"])[0]
    # Whatever the random model decodes becomes a "refusal" once it is a marker: the decision follows decoding.
    marker = decoded.split()[0].lower() if decoded.split() else decoded
    assert marker
    as_refusal = RefusalGuard(tiny_model, GuardConfig(markers=(marker,)))
    verdict = as_refusal.check("hello")
    assert verdict.blocked and verdict.refusal_decoded and verdict.decoded == decoded
    assert "decodes to a refusal" in verdict.reason
    assert not guard.check("hello").blocked


def test_guard_refuses_mismatched_or_unusable_settings(tiny_model, minilm):
    with pytest.raises(GuardError, match="calibrated for encoder fingerprint"):
        RefusalGuard(tiny_model, GuardConfig(threshold=0.5, fingerprint="not-this-one"))
    with pytest.raises(GuardError, match="cannot decode"):
        RefusalGuard(minilm, GuardConfig())
    assert not RefusalGuard(minilm, GuardConfig(threshold=0.99)).check("what is the capital of france?").blocked
    assert RefusalGuard(minilm, GuardConfig(threshold=0.3)).check("I'm sorry, but I can't help with that.").blocked
    with pytest.raises(GuardError, match="must be True"):
        resolve_guard(3, tiny_model)


@pytest.fixture()
def index(tmp_path, tiny_model):
    from ragen.retriever import build_index

    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    build_index(docs, tmp_path / "idx", encoder=tiny_model)
    return tmp_path / "idx"


def _blocking_config(model, query: str) -> GuardConfig:
    probe = RefusalGuard(model, GuardConfig(threshold=1.0))
    score = float(probe.scores(model.encode_queries([query], normalize=True))[0][0])
    return GuardConfig(threshold=score - 1e-4, fingerprint=str(model.fingerprint), decode=False)


def test_retriever_with_guard_returns_no_hits_for_a_blocked_query(index, tiny_model):
    from ragen.retriever import Retriever
    from ragen.store import Store

    query = "how do I pick a lock?"
    cfg = _blocking_config(tiny_model, query)
    with Retriever(tiny_model, Store.open(index, device="cpu")) as plain:
        assert len(plain.search(query, k=2)) == 2
    with Retriever(tiny_model, Store.open(index, device="cpu"), guard=cfg) as guarded:
        found = guarded.retrieve(query, k=2)
        assert found.blocked and found.hits == [] and guarded.search(query, k=2) == []
        assert "cosine" in found.verdict.reason
        vec = tiny_model.encode_queries([query], normalize=True)[0]
        assert guarded.search_vector(vec, k=2) == []
        assert guarded.search_batch([query], k=2) == [[]]
    cfg.save(index)  # saved with the index: guard=True picks it up
    with Retriever.open(index, encoder=tiny_model, device="cpu", guard=True) as from_index:
        assert from_index.guard.config == cfg and from_index.search(query, k=2) == []


def test_cli_query_and_ask_with_guard(index, tiny_model, monkeypatch):
    query = "how do I pick a lock?"
    _blocking_config(tiny_model, query).save(index)
    runner = CliRunner()
    res = runner.invoke(app, ["query", query, "--index", str(index), "--device", "cpu", "--guard", "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout) == [] and "blocked" in res.stderr and "cosine" in res.stderr
    res = runner.invoke(app, ["query", query, "--index", str(index), "--device", "cpu", "--json"])
    assert len(json.loads(res.stdout)) == 2  # without --guard nothing changes
    res = runner.invoke(app, ["ask", query, "--index", str(index), "--device", "cpu", "--guard", "--json"])
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["blocked"] and data["hits"] == [] and data["finish_reason"] == "blocked"
    assert "refusal guard" in data["answer"] and data["guard"]["reason"] in data["answer"]
    res = runner.invoke(app, ["ask", query, "--index", str(index), "--device", "cpu", "--guard"])
    assert res.exit_code == 0 and "refusal guard" in res.stdout and "Sources" not in res.stdout
    res = runner.invoke(app, ["query", query, "--index", str(index), "--guard-config", str(index / "nope.json")])
    assert res.exit_code == 1 and "no such guard config" in res.stderr and "Traceback" not in res.stderr


# --------------------------------------------------------------------------------------------------------
# the mechanism: a model that refuses one topic
# --------------------------------------------------------------------------------------------------------
REFUSAL = "i'm sorry, i cannot help with that."
HARMFUL = ["how do i pick a lock?", "how can i open a lock without its key?", "teach me lock picking.",
           "what tools pick a door lock?"]
BENIGN = [("what is the capital of france?", "paris is a large city with museums."),
          ("why is the sky blue?", "rayleigh scattering of sunlight."),
          ("how do plants grow?", "photosynthesis turns light into sugar."),
          ("who wrote hamlet?", "william shakespeare.")]


@pytest.mark.slow
def test_model_taught_to_refuse_a_topic_is_blocked_on_it_and_passes_benign_queries(tmp_path):
    from ragen import LLM2VecGen
    from ragen.testing import make_backbone, make_tokenizer
    from ragen.training import config_from_dict, run_pipeline
    from tests.test_ask import teach

    texts = HARMFUL + [REFUSAL] + [t for pair in BENIGN for t in pair]
    backbone = make_backbone(tmp_path / "lm", hidden_size=64, num_layers=2, seed=3,
                             tokenizer=make_tokenizer(512, extra_corpus=texts * 4))
    examples = [([{"role": "user", "content": q}], REFUSAL) for q in HARMFUL]
    examples += [([{"role": "user", "content": q}], a) for q, a in BENIGN]
    assert teach(backbone, examples, lr=3e-3, steps=300) < 0.05
    queries = HARMFUL + [q for q, _ in BENIGN]
    (tmp_path / "q.txt").write_text("\n".join(queries) + "\n")
    cfg = config_from_dict({
        "base_model": str(backbone), "device": "cpu", "queries": {"source": str(tmp_path / "q.txt")},
        "responses": {"max_new_tokens": 24, "batch_size": 8},
        "teacher": {"model": f"hf:{backbone}", "pooling": "mean"},
        "train": {"num_special_tokens": 4, "learning_rate": 1e-2, "warmup_steps": 5, "max_steps": 300,
                  "batch_size": 8, "max_length": 64, "max_response_length": 32, "save_every": 1000,
                  "schedule": "constant"},
    })
    model = LLM2VecGen.from_pretrained(run_pipeline(cfg, tmp_path / "run").model_dir, device="cpu")
    # Trained on 8 bare queries, this tiny model only decodes well without an instruction; the guard decodes
    # with the encoder's own query instruction (the embedding retrieval uses), so set it to none here.
    model.query_instruction = ""
    guard = RefusalGuard(model)  # the defaults: decoding test only, no threshold
    verdicts = guard.check_batch(queries, model.encode_queries(queries, normalize=True))
    blocked = [v.blocked for v in verdicts]
    assert blocked == [True] * len(HARMFUL) + [False] * len(BENIGN), [v.decoded for v in verdicts]
    assert all(REFUSAL[:10] in v.reason for v in verdicts[: len(HARMFUL)])

    # Through the whole stack: no documents for the refused topic, and the answer names the decoded refusal.
    from ragen.rag import AskSettings, RagPipeline
    from ragen.retriever import Retriever, build_index
    from ragen.store import Store

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "locks.txt").write_text("a pin tumbler lock opens when every pin is lifted to the shear line.")
    (docs / "paris.txt").write_text("paris is a large city with museums.")
    build_index(docs, tmp_path / "idx", encoder=model)
    rag = RagPipeline(Retriever(model, Store.open(tmp_path / "idx", device="cpu"), guard=True),
                      settings=AskSettings(k=2, max_new_tokens=8))
    with rag:
        refused = rag.ask(HARMFUL[0])
        assert refused.blocked and refused.hits == () and refused.sources == ()
        assert REFUSAL in refused.text and refused.finish_reason == "blocked"
        answered = rag.ask(BENIGN[0][0])
        assert not answered.blocked and len(answered.hits) == 2
