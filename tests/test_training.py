"""Training: config, responses, teacher cache, and the loop (loss, frozen backbone, resume, round trip)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ragen.errors import DataError
from ragen.training import (Example, TrainCallback, config_from_dict, fit, global_batch_indices, load_config,
                            read_queries, read_responses)
from ragen.training.config import QueriesConfig, ResponsesConfig, TeacherConfig
from ragen.training.responses import build_prompt, generate_responses, merge_responses
from ragen.training.teacher import compute_teacher_vectors, load_teacher

ROOT = Path(__file__).resolve().parent.parent

_PAIRS = [
    ("what is the capital of france?", "paris is the capital of france."),
    ("why is the sky blue?", "rayleigh scattering makes short wavelengths scatter more."),
    ("how do plants grow?", "photosynthesis turns light into sugar."),
    ("what does a cache store?", "a cache stores recent results."),
    ("summarize the theorem.", "the theorem follows from induction on the length of the proof."),
    ("what jumps over the dog?", "the quick brown fox jumps over the lazy dog."),
    ("how does retrieval help?", "retrieval augmented generation finds documents and answers with them."),
    ("count to five.", "0 1 2 3 4 5"),
]


def _cfg(backbone: Path, **train) -> object:
    base = {"num_special_tokens": 4, "learning_rate": 1e-2, "warmup_steps": 2, "max_steps": 12, "batch_size": 4,
            "max_length": 64, "max_response_length": 24, "save_every": 1000, "eval_every": 1000}
    base.update(train)
    base.setdefault("schedule_steps", max(base["max_steps"], base["warmup_steps"] + 1))  # decay to 0 at the stop, unless a test says otherwise
    return config_from_dict({"base_model": str(backbone), "queries": {"source": "unused.txt"}, "train": base})


def _examples(dim: int = 16, seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    return [Example(f"q{i}", q, r, rng.standard_normal(dim).astype(np.float32)) for i, (q, r) in enumerate(_PAIRS)]


def _model(backbone: Path, dim: int = 16, k: int = 4):
    from ragen import LLM2VecGen

    return LLM2VecGen.initialize(str(backbone), num_special_tokens=k, alignment_dim=dim, device="cpu",
                                 dtype="float32", seed=0)


def _metric_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


# --------------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------------
def test_tiny_pipeline_config_resolves_paths_relative_to_the_file():
    cfg = load_config(ROOT / "pipelines" / "train-tiny.yaml")
    assert Path(cfg.base_model) == ROOT / "tests" / "fixtures" / "llm2vec-gen-tiny" / "base"
    assert Path(cfg.queries.source).is_file()
    assert cfg.teacher.model == "minilm"
    assert cfg.train.batch_size % cfg.train.micro_batch_size == 0


def test_config_toml_equals_yaml_and_rejects_bad_keys(tmp_path):
    (tmp_path / "q.txt").write_text("a\nb\n")
    (tmp_path / "p.toml").write_text('base_model = "m"\n[queries]\nsource = "q.txt"\n[train]\nlearning_rate = 5e-4\n'
                                     'adam_betas = [0.9, 0.95]\n')
    (tmp_path / "p.yaml").write_text("base_model: m\nqueries: {source: q.txt}\ntrain: {learning_rate: 5e-4, "
                                     "adam_betas: [0.9, 0.95]}\n")
    a, b = load_config(tmp_path / "p.toml"), load_config(tmp_path / "p.yaml")
    assert a.fingerprint() == b.fingerprint()
    assert a.train.learning_rate == 5e-4 and a.train.adam_betas == (0.9, 0.95)
    assert a.queries.source == str((tmp_path / "q.txt").resolve())
    assert a.train.warmup_steps == 100 and a.train.num_special_tokens == 10 and a.train.batch_size == 32
    (tmp_path / "bad.yaml").write_text("base_model: m\nqueries: {source: q.txt}\ntrain: {learning_rat: 1}\n")
    with pytest.raises(DataError, match=r"unknown key.*learning_rat"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text("base_model: m\nqueries: {source: q.txt}\ntrain: {max_steps: many}\n")
    with pytest.raises(DataError, match=r"train.max_steps: expected an integer"):
        load_config(tmp_path / "bad2.yaml")
    with pytest.raises(DataError, match="no such pipeline file"):
        load_config(tmp_path / "missing.yaml")


def test_batch_order_is_a_pure_function_of_step_and_covers_each_epoch():
    first_epoch = [i for s in range(5) for i in global_batch_indices(10, 2, s, seed=3)]
    assert sorted(first_epoch) == list(range(10))
    assert global_batch_indices(10, 4, 7, seed=3) == global_batch_indices(10, 4, 7, seed=3)
    assert global_batch_indices(10, 4, 7, seed=3) != global_batch_indices(10, 4, 7, seed=4)
    assert len(global_batch_indices(3, 8, 0, seed=0)) == 8  # batches larger than the data wrap epochs


# --------------------------------------------------------------------------------------------------------
# stage 1: queries and responses
# --------------------------------------------------------------------------------------------------------
def test_read_queries_txt_jsonl_and_chat_messages(tmp_path):
    (tmp_path / "q.txt").write_text("first\n\n second \nfirst\n")
    qs = read_queries(QueriesConfig(source=str(tmp_path / "q.txt")))
    assert [q.text for q in qs] == ["first", "second", "first"]
    assert len({q.id for q in qs}) == 3  # duplicates get distinct, stable ids
    assert qs[0].id == read_queries(QueriesConfig(source=str(tmp_path / "q.txt")))[0].id
    rows = [{"id": "a", "messages": [{"role": "user", "content": "single turn"}, {"role": "assistant", "content": "x"}]},
            {"id": "b", "messages": [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
                                     {"role": "user", "content": "u2"}]},
            {"id": "c", "prompt": "a prompt"}]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    qs = read_queries(QueriesConfig(source=str(tmp_path / "q.jsonl")))
    assert [(q.id, q.text) for q in qs] == [("a", "single turn"), ("c", "a prompt")]  # multi-turn skipped
    with pytest.raises(DataError, match="no field 'question'"):
        read_queries(QueriesConfig(source=str(tmp_path / "q.jsonl"), field="question"))
    with pytest.raises(DataError, match="no such file"):
        read_queries(QueriesConfig(source=str(tmp_path / "nope.txt")))


def test_chat_template_passes_enable_thinking_only_where_the_template_uses_it(tiny_backbone):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_backbone))
    plain = build_prompt(tok, "hi", ResponsesConfig())
    assert plain.endswith("<|im_start|>assistant\n") and "hi" in plain
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<A>{% if enable_thinking is defined and not enable_thinking %}"
                         "<think></think>{% endif %}{% endif %}")
    assert build_prompt(tok, "hi", ResponsesConfig(enable_thinking=False)) == "hi<A><think></think>"
    assert build_prompt(tok, "hi", ResponsesConfig(enable_thinking=True)) == "hi<A>"


def test_responses_resume_after_a_torn_write_and_merge_across_shards(tmp_path, tiny_backbone):
    (tmp_path / "q.txt").write_text("\n".join(q for q, _ in _PAIRS) + "\n")
    cfg = config_from_dict({"base_model": str(tiny_backbone), "queries": {"source": str(tmp_path / "q.txt")},
                            "responses": {"max_new_tokens": 3, "batch_size": 3}})
    out = tmp_path / "run"
    assert generate_responses(cfg, out, shard=(0, 2)) == 4
    shard0 = out / "responses.shard-0-of-2.jsonl"
    good = shard0.read_text()
    shard0.write_text(good + '{"id": "torn", "que')  # an interrupted append
    with pytest.raises(DataError, match="4 of 8 queries have no response"):
        merge_responses(cfg, out)
    assert generate_responses(cfg, out, shard=(0, 2)) == 0  # nothing pending for shard 0
    assert shard0.read_text() == good  # torn tail cut off
    assert generate_responses(cfg, out, shard=(1, 2)) == 4
    merged = read_responses(merge_responses(cfg, out))
    assert [r["query"] for r in merged] == [q for q, _ in _PAIRS]
    assert all(r["finish_reason"] in ("stop", "length") and r["num_tokens"] <= 3 for r in merged)
    assert not list(out.glob("responses.shard-*"))
    assert generate_responses(cfg, out) == 0  # complete: a rerun generates nothing


def test_responses_of_other_settings_or_queries_are_never_reused(tmp_path, tiny_backbone):
    from ragen.training.responses import responses_complete

    q = tmp_path / "q.txt"
    q.write_text("\n".join(x for x, _ in _PAIRS[:4]) + "\n")
    cfg = config_from_dict({"base_model": str(tiny_backbone), "queries": {"source": str(q)},
                            "responses": {"max_new_tokens": 2, "batch_size": 4}})
    out = tmp_path / "run"
    generate_responses(cfg, out)
    merge_responses(cfg, out)
    assert responses_complete(cfg, out)
    hotter = config_from_dict({"base_model": str(tiny_backbone), "queries": {"source": str(q)},
                               "responses": {"max_new_tokens": 2, "batch_size": 4, "temperature": 0.7}})
    with pytest.raises(DataError, match="other settings \\(responses\\)"):
        responses_complete(hotter, out)
    with pytest.raises(DataError, match="other settings"):
        generate_responses(hotter, out)
    # fewer queries than were answered: not complete, and the merge keeps exactly the current ones
    q.write_text("\n".join(x for x, _ in _PAIRS[:2]) + "\n")
    assert not responses_complete(cfg, out)
    assert [r["query"] for r in read_responses(merge_responses(cfg, out))] == [x for x, _ in _PAIRS[:2]]
    assert responses_complete(cfg, out)


# --------------------------------------------------------------------------------------------------------
# stage 2: teacher vectors
# --------------------------------------------------------------------------------------------------------
class _CountingTeacher:
    def __init__(self, teacher):
        self.inner, self.calls = teacher, 0

    dim = property(lambda self: self.inner.dim)
    fingerprint = property(lambda self: self.inner.fingerprint)

    def encode_documents(self, texts, *, batch_size=32, normalize=False):
        self.calls += 1
        return self.inner.encode_documents(texts, batch_size=batch_size, normalize=normalize)


def test_teacher_vectors_cached_by_teacher_and_responses(tmp_path, tiny_backbone):
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps({"id": str(i), "query": q, "response": r}) + "\n"
                                 for i, (q, r) in enumerate(_PAIRS)))
    cfg = TeacherConfig(model=f"hf:{tiny_backbone}", pooling="mean")
    teacher = _CountingTeacher(load_teacher(cfg, device="cpu"))
    v1, path = compute_teacher_vectors(responses, cfg, tmp_path / "cache", teacher=teacher)
    v2, path2 = compute_teacher_vectors(responses, cfg, tmp_path / "cache", teacher=teacher)
    assert teacher.calls == 1 and path == path2 and np.array_equal(v1, v2)
    assert v1.shape == (len(_PAIRS), 64) and v1.dtype == np.float32
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["ids"] == [str(i) for i in range(len(_PAIRS))] and meta["teacher_fingerprint"] == teacher.fingerprint
    np.load(path, allow_pickle=False)  # plain array, no pickle
    import ragen.training.teacher as teacher_module

    def no_load(*args, **kwargs):
        raise AssertionError("a cache hit must not load the teacher model")

    original = teacher_module.load_teacher
    teacher_module.load_teacher = no_load
    try:  # reruns, resumes and non-main ranks: the file is read, the (possibly large) teacher never loaded
        v_hit, _ = compute_teacher_vectors(responses, cfg, tmp_path / "cache")
    finally:
        teacher_module.load_teacher = original
    assert np.array_equal(v_hit, v1)
    other, _ = compute_teacher_vectors(responses, TeacherConfig(model=f"hf:{tiny_backbone}", pooling="cls"),
                                       tmp_path / "cache")
    assert not np.allclose(other, v1)  # another pooling is another cache entry
    responses.write_text(responses.read_text().replace("paris", "lyon"))
    v3, path3 = compute_teacher_vectors(responses, cfg, tmp_path / "cache", teacher=teacher)
    assert teacher.calls == 2 and path3 != path and not np.array_equal(v1[0], v3[0]) and np.array_equal(v1[1], v3[1])
    cls = load_teacher(TeacherConfig(model=f"hf:{tiny_backbone}", pooling="cls"), device="cpu")
    assert cls.fingerprint != teacher.fingerprint
    assert not np.allclose(cls.encode_documents(["a b c"]), teacher.encode_documents(["a b c"]))
    with pytest.raises(DataError, match="needs a model name and teacher.pooling"):
        load_teacher(TeacherConfig(model=f"hf:{tiny_backbone}"))


# --------------------------------------------------------------------------------------------------------
# stage 3: the loop
# --------------------------------------------------------------------------------------------------------
def test_training_lowers_the_loss_leaves_the_backbone_untouched_and_round_trips(tmp_path, tiny_backbone):
    from ragen import LLM2VecGen

    model = _model(tiny_backbone)
    before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    rows0 = model.trained_rows()
    cfg = _cfg(tiny_backbone, max_steps=30, eval_size=0)
    result = fit(model, _examples(), [], cfg, tmp_path / "run")
    # A random tiny LM caps how low the reconstruction CE can go (its logits are tiny); a clear drop suffices.
    assert np.mean(result.losses[-5:]) < 0.9 * np.mean(result.losses[:3])
    after = model.lm.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "backbone weights changed"
    assert not all(p.requires_grad for p in model.lm.parameters())
    assert not torch.equal(rows0, model.trained_rows())  # the K rows did train
    texts = [q for q, _ in _PAIRS]
    loaded = LLM2VecGen.from_pretrained(result.model_dir, device="cpu")
    assert loaded.special_tokens == model.special_tokens
    assert np.array_equal(loaded.encode(texts), model.encode(texts))
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 31))
    assert {"loss", "rec", "align", "lr", "grad_norm", "tokens_per_s"} <= set(metrics[0])
    # linear warm-up over 2 steps as transformers' scheduler (the reference's): the first step has rate 0
    assert [metrics[0]["lr"], metrics[1]["lr"], metrics[2]["lr"]] == pytest.approx([0.0, 0.5e-2, 1e-2])
    assert metrics[-1]["lr"] < metrics[5]["lr"]  # then linear decay
    ckpt = tmp_path / "run" / "checkpoints" / "step-000030" / "model"
    assert np.array_equal(LLM2VecGen.from_pretrained(ckpt, device="cpu").encode(texts), model.encode(texts))


def test_reconstruction_loss_equals_the_causal_lms_own_loss(tiny_backbone):
    """Pin the label alignment: our summed CE equals HF's loss with labels -100 on the soft prompt and
    padding, times the number of response tokens (an off-by-one shift would still 'go down')."""
    from ragen.training.losses import reconstruction_loss_sum

    model = _model(tiny_backbone)
    torch.manual_seed(0)
    prompt = torch.randn(2, 4, model.hidden_size)  # (B, K, H)
    ids = torch.tensor([[5, 9, 13, 2], [7, 11, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    ours = reconstruction_loss_sum(model.lm, prompt, ids, mask)
    embeds = torch.cat([prompt, model.lm.get_input_embeddings()(ids)], dim=1)
    labels = torch.cat([torch.full((2, 4), -100), ids.masked_fill(mask == 0, -100)], dim=1)
    full_mask = torch.cat([torch.ones(2, 4, dtype=torch.long), mask], dim=1)
    with torch.no_grad():
        hf = model.lm(inputs_embeds=embeds, attention_mask=full_mask, labels=labels).loss
    assert float(ours) == pytest.approx(float(hf) * int(mask.sum()), rel=1e-5)


def test_only_responses_that_really_ended_get_eos(tiny_backbone):
    from ragen.training.data import Collator, build_examples

    model = _model(tiny_backbone)
    collator = Collator(model, max_length=64, max_response_length=32)
    records = [{"id": "a", "query": "q", "response": "paris is the capital", "finish_reason": "stop"},
               {"id": "b", "query": "q", "response": "paris is the capital", "finish_reason": "length"}]
    stopped, cut = build_examples(records, np.zeros((2, 16), dtype=np.float32))
    plain = model.tokenizer("paris is the capital", add_special_tokens=False)["input_ids"]
    assert collator.response_tokens(stopped) == plain + [collator.eos_id]
    assert collator.response_tokens(cut) == plain  # generation hit max_new_tokens: it did not end
    short = Collator(model, max_length=64, max_response_length=2)
    assert short.response_tokens(stopped) == plain[:2]  # cut by the limit: no EOS either


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tiny_backbone):
    full = fit(_model(tiny_backbone), _examples(), [], _cfg(tiny_backbone, max_steps=3), tmp_path / "a")
    acc = fit(_model(tiny_backbone), _examples(), [], _cfg(tiny_backbone, max_steps=3, micro_batch_size=1), tmp_path / "b")
    np.testing.assert_allclose(acc.losses, full.losses, rtol=1e-5)


class _Interrupt(TrainCallback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step(self, metrics):
        if metrics["step"] == self.at:
            raise KeyboardInterrupt


def test_resume_reproduces_the_uninterrupted_loss_curve(tmp_path, tiny_backbone):
    cfg = _cfg(tiny_backbone, max_steps=10, save_every=3, eval_size=0, keep_checkpoints=5)
    straight = fit(_model(tiny_backbone), _examples(), [], cfg, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        fit(_model(tiny_backbone), _examples(), [], cfg, tmp_path / "b", callback=_Interrupt(at=8))
    assert _metric_losses(tmp_path / "b").keys() == set(range(1, 9))
    resumed = fit(_model(tiny_backbone), _examples(), [], cfg, tmp_path / "b")
    assert len(resumed.losses) == 4  # steps 7..10 from the step-6 checkpoint
    assert _metric_losses(tmp_path / "b") == _metric_losses(tmp_path / "a")  # bit-exact on CPU
    assert straight.losses[6:] == resumed.losses
    changed = _cfg(tiny_backbone, max_steps=10, save_every=3, learning_rate=1e-3)
    with pytest.raises(DataError, match="different training settings"):
        fit(_model(tiny_backbone), _examples(), [], changed, tmp_path / "b")


def test_eval_loss_on_held_out_examples_and_bad_settings(tmp_path, tiny_backbone):
    ex = _examples()
    seen = []

    class Rec(TrainCallback):
        def on_eval(self, m):
            seen.append(m)

    result = fit(_model(tiny_backbone), ex[:6], ex[6:], _cfg(tiny_backbone, max_steps=4, eval_every=2), tmp_path / "r",
                 callback=Rec())
    assert [m["step"] for m in seen] == [2, 4] and result.eval_loss == seen[-1]["eval_loss"]
    assert seen[-1]["eval_loss"] == pytest.approx(seen[-1]["eval_rec"] + seen[-1]["eval_align"])
    with pytest.raises(DataError, match="teacher vectors have 8"):
        fit(_model(tiny_backbone), _examples(dim=8), [], _cfg(tiny_backbone, max_steps=1), tmp_path / "x")
