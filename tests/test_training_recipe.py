"""The reference recipe: LR schedule, response generation settings, prompt budget, finished runs, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ragen.errors import DataError
from ragen.training import Example, config_from_dict, fit, load_config, read_queries
from ragen.training.config import QueriesConfig, ResponsesConfig, TrainConfig
from ragen.training.loop import lr_factor, rec_loss_scale, run_pipeline
from ragen.training.responses import answer, build_prompt, fit_prompt, generate_responses, load_generator

from .test_training import _PAIRS, _examples, _metric_losses, _model


def _train_cfg(backbone: Path, **train):
    base = {"num_special_tokens": 4, "learning_rate": 1e-2, "warmup_steps": 2, "schedule_steps": 20, "max_steps": 4,
            "batch_size": 4, "max_length": 64, "max_response_length": 24, "save_every": 1000, "eval_every": 1000}
    base.update(train)
    return config_from_dict({"base_model": str(backbone), "queries": {"source": "unused.txt"}, "train": base})


# --------------------------------------------------------------------------------------------------------
# 1. schedule: warm-up + linear decay over schedule_steps, stop at max_steps
# --------------------------------------------------------------------------------------------------------
def test_reference_schedule_values_at_steps_0_100_5000():
    from transformers import get_linear_schedule_with_warmup

    t = TrainConfig()  # defaults: the reference's 100 warm-up steps, 20,000-step horizon, stop at 5,000
    assert (t.warmup_steps, t.schedule_steps, t.max_steps) == (100, 20000, 5000)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = get_linear_schedule_with_warmup(opt, num_warmup_steps=100, num_training_steps=20000)
    ref_factor = ref.lr_lambdas[0]
    for step in (0, 1, 50, 99, 100, 101, 4999, 5000, 19999, 20000):
        assert lr_factor(t, step) == pytest.approx(ref_factor(step), abs=1e-12)
    assert lr_factor(t, 0) == 0.0
    assert lr_factor(t, 100) == 1.0
    assert lr_factor(t, 5000) == pytest.approx(15000 / 19900)  # ~75% of peak at the stop
    applied = sum(lr_factor(t, s) for s in range(5000))
    old = TrainConfig(schedule_steps=5000)  # the previous behaviour: decay to 0 at the stop
    assert sum(lr_factor(old, s) for s in range(5000)) / applied == pytest.approx(0.58, abs=0.01)


def test_resume_with_another_max_steps_continues_the_same_curve(tmp_path, tiny_backbone):
    straight = fit(_model(tiny_backbone), _examples(), [], _train_cfg(tiny_backbone, max_steps=6), tmp_path / "a")
    fit(_model(tiny_backbone), _examples(), [], _train_cfg(tiny_backbone, max_steps=4), tmp_path / "b")
    more = fit(_model(tiny_backbone), _examples(), [], _train_cfg(tiny_backbone, max_steps=6), tmp_path / "b")
    assert more.losses == straight.losses[4:]  # steps 5..6 continue from the step-4 checkpoint, bit-exact
    assert _metric_losses(tmp_path / "b") == _metric_losses(tmp_path / "a")
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    t = _train_cfg(tiny_backbone).train
    assert lrs == pytest.approx([1e-2 * lr_factor(t, s) for s in range(6)])
    with pytest.raises(DataError, match="train.schedule_steps"):
        fit(_model(tiny_backbone), _examples(), [], _train_cfg(tiny_backbone, max_steps=8, schedule_steps=40),
            tmp_path / "b")


def test_rerunning_a_finished_run_reports_it_instead_of_nan(tmp_path, tiny_backbone):
    cfg = _train_cfg(tiny_backbone, max_steps=3)
    first = fit(_model(tiny_backbone), _examples(), [], cfg, tmp_path / "r")
    again = fit(_model(tiny_backbone), _examples(), [], cfg, tmp_path / "r")
    assert again.already_finished and again.steps == 3 and again.final_loss == first.final_loss
    from ragen.training.loop import finished_run

    done = finished_run(cfg, tmp_path / "r")  # what run_pipeline checks before loading any model
    assert done is not None and done.final_loss == first.final_loss and done.model_dir == tmp_path / "r" / "model"
    assert finished_run(_train_cfg(tiny_backbone, max_steps=5), tmp_path / "r") is None


def test_loss_normalisation_global_or_per_rank():
    t = TrainConfig()
    # global: every process divides by the global batch's tokens (x world size, as DDP averages gradients)
    assert rec_loss_scale(t, 100, 30, 2) == pytest.approx(2 / 100)
    # per_rank: the reference's per-device token mean, averaged by DDP
    per_rank = TrainConfig(loss_normalization="per_rank")
    assert rec_loss_scale(per_rank, 100, 30, 2) == pytest.approx(1 / 30)
    assert rec_loss_scale(per_rank, 100, 100, 1) == rec_loss_scale(t, 100, 100, 1)
    with pytest.raises(DataError, match="loss_normalization"):
        _train_cfg(Path("x"), loss_normalization="mean")


def test_all_empty_unfinished_responses_do_not_divide_by_zero(tmp_path, tiny_backbone):
    rng = np.random.default_rng(0)
    empty = [Example(f"q{i}", q, "", rng.standard_normal(16).astype(np.float32), ended=False)
             for i, (q, _) in enumerate(_PAIRS)]
    result = fit(_model(tiny_backbone), empty, [], _train_cfg(tiny_backbone, max_steps=2), tmp_path / "r")
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))


def test_bad_batch_settings_and_bad_bytes_are_one_line(tmp_path):
    with pytest.raises(DataError, match="micro_batch_size=8 must be <= train.batch_size=4"):
        _train_cfg(Path("x"), micro_batch_size=8)
    with pytest.raises(DataError, match="schedule_steps=2 must exceed train.warmup_steps=2"):
        _train_cfg(Path("x"), schedule_steps=2)
    with pytest.raises(DataError, match="max_steps=30 exceeds train.schedule_steps=20"):
        _train_cfg(Path("x"), max_steps=30)
    assert _train_cfg(Path("x"), max_steps=2, warmup_steps=100, schedule_steps=20000).train.max_steps == 2
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"base_model: x\nqueries: q\xff.txt\n")
    with pytest.raises(DataError, match="bad.yaml: not UTF-8 text"):
        load_config(bad)
    (tmp_path / "q.txt").write_bytes(b"fine\ncaf\xe9\n")
    with pytest.raises(DataError, match="q.txt: not UTF-8 text"):
        read_queries(QueriesConfig(source=str(tmp_path / "q.txt")))
    (tmp_path / "q.jsonl").write_bytes(b'{"query": "ok"}\n{"query": "caf\xe9"}\n')
    with pytest.raises(DataError, match="q.jsonl: not UTF-8 text"):
        read_queries(QueriesConfig(source=str(tmp_path / "q.jsonl")))


def test_chat_queries_keep_exactly_two_message_conversations(tmp_path):
    rows = [{"id": "a", "messages": [{"role": "user", "content": "two"}, {"role": "assistant", "content": "x"}]},
            {"id": "b", "messages": [{"role": "user", "content": "alone"}]},
            {"id": "c", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                     {"role": "assistant", "content": "a"}]},
            {"id": "d", "messages": [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
                                     {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]}]
    (tmp_path / "tulu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [(q.id, q.text) for q in read_queries(QueriesConfig(source=str(tmp_path / "tulu.jsonl")))] == [("a", "two")]


# --------------------------------------------------------------------------------------------------------
# 2. response generation: the model's generation_config by default, explicit overrides, prompt budget
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sampling_backbone(tmp_path_factory):
    """A tiny backbone whose generation_config.json says: sample (as Qwen3's does)."""
    from transformers import GenerationConfig

    from ragen.testing import make_backbone

    path = make_backbone(tmp_path_factory.mktemp("sampling"), hidden_size=32, num_layers=1, seed=3)
    GenerationConfig(do_sample=True, temperature=1.3, top_k=0, top_p=1.0).save_pretrained(path)
    return path


def test_generation_follows_the_models_generation_config_by_default(tmp_path, sampling_backbone):
    (tmp_path / "q.txt").write_text("\n".join(q for q, _ in _PAIRS[:4]) + "\n")

    def cfg(**responses):
        return config_from_dict({"base_model": str(sampling_backbone), "queries": {"source": str(tmp_path / "q.txt")},
                                 "seed": 5, "responses": {"max_new_tokens": 12, "batch_size": 4, **responses}})

    lm, tok = load_generator(str(sampling_backbone), "cpu", torch.float32)
    queries = [q for q, _ in _PAIRS[:4]]
    default = answer(lm, tok, queries, cfg().responses, seed=11)
    assert default == answer(lm, tok, queries, cfg().responses, seed=11)  # seeded: reproducible
    assert default != answer(lm, tok, queries, cfg().responses, seed=12)  # ...and really sampled
    greedy = answer(lm, tok, queries, cfg(do_sample=False).responses, seed=11)
    assert greedy == answer(lm, tok, queries, cfg(do_sample=False).responses, seed=12) != default
    # the same as transformers' generate with the model's own settings and the same seed
    enc = tok([build_prompt(tok, q, cfg().responses) for q in queries], add_special_tokens=False, padding=True,
              return_tensors="pt")
    torch.manual_seed(11)
    ref = lm.generate(**enc, max_new_tokens=12, pad_token_id=tok.pad_token_id, eos_token_id=[tok.eos_token_id])
    ref_text = [tok.decode([t for t in row if t != tok.pad_token_id][:12], skip_special_tokens=True).strip()
                for row in ref[:, enc["input_ids"].shape[1]:].tolist()]
    assert [r["response"] for r in default] == [t.split(tok.eos_token)[0].strip() for t in ref_text]

    out = tmp_path / "run"
    generate_responses(cfg(repetition_penalty=1.2, top_k=7), out)
    settings = json.loads((out / "responses.settings.json").read_text())
    assert settings["effective"] == {"do_sample": True, "temperature": 1.3, "top_p": 1.0, "top_k": 7,
                                     "repetition_penalty": 1.2, "max_new_tokens": 12, "seed": 5}
    assert settings["responses"]["do_sample"] is None  # what was asked: the model's choice
    out2 = tmp_path / "greedy"
    generate_responses(cfg(do_sample=False), out2)
    eff = json.loads((out2 / "responses.settings.json").read_text())["effective"]
    assert eff["do_sample"] is False and eff["temperature"] is None and eff["seed"] is None


def test_prompt_budget_cuts_the_query_never_the_template(tiny_backbone):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_backbone))
    cfg = ResponsesConfig(max_prompt_length=40, system_prompt="be brief")
    long_query = " ".join(q for q, _ in _PAIRS) * 4
    prompt = fit_prompt(tok, long_query, cfg)
    assert len(tok(prompt, add_special_tokens=False)["input_ids"]) <= 40
    assert prompt.startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n")
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")  # the generation prompt survives
    kept = prompt.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    assert kept and long_query.startswith(kept)  # the query's start is kept, its end cut
    short = "what is the capital of france?"
    assert fit_prompt(tok, short, cfg) == build_prompt(tok, short, cfg)
    with pytest.raises(DataError, match="max_prompt_length=16: the chat template alone"):
        fit_prompt(tok, long_query, ResponsesConfig(max_prompt_length=16, system_prompt="be brief " * 10))
    assert ResponsesConfig().max_prompt_length == 1024  # the reference's budget


# --------------------------------------------------------------------------------------------------------
# 4. published responses (McGill-NLP/llm2vec-gen-tulu rows: id, question, answer) skip stage 1
# --------------------------------------------------------------------------------------------------------
_HUB_ROWS = [{"id": "tulu_1", "question": " what is the capital of france? ", "answer": "Paris is the capital."},
             {"id": "tulu_2", "question": "why is the sky blue?", "answer": "Rayleigh scattering."},
             {"id": "tulu_3", "question": "count to five.", "answer": ""}]


def _published_cfg(tmp_path: Path, backbone: Path, source: Path, **responses):
    return config_from_dict({"base_model": str(backbone), "responses": {"source": str(source), **responses},
                             "teacher": {"model": f"hf:{backbone}", "pooling": "mean"},
                             "train": {"num_special_tokens": 4, "warmup_steps": 1, "schedule_steps": 10, "max_steps": 2,
                                       "batch_size": 2, "max_length": 32, "max_response_length": 16}})


def test_published_responses_from_jsonl_and_parquet_skip_generation(tmp_path, tiny_backbone, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ragen.training.responses import import_responses, read_published_responses, responses_complete

    jsonl = tmp_path / "Qwen3_8B.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in _HUB_ROWS))
    parquet = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(_HUB_ROWS), parquet)
    want = [{"id": r["id"], "query": r["question"], "response": r["answer"], "finish_reason": "stop"} for r in _HUB_ROWS]
    for src in (jsonl, parquet):
        cfg = _published_cfg(tmp_path, tiny_backbone, src)
        assert not cfg.queries.source  # no queries needed
        assert read_published_responses(cfg) == want
    # no model may be loaded for stage 1
    import ragen.training.responses as responses_mod

    monkeypatch.setattr(responses_mod, "load_generator", lambda *a, **k: pytest.fail("generation ran"))
    result = run_pipeline(_published_cfg(tmp_path, tiny_backbone, parquet), tmp_path / "run")
    assert len(result.losses) == 2 and result.model_dir is not None
    lines = [json.loads(x) for x in (tmp_path / "run" / "responses.jsonl").read_text().splitlines()]
    assert lines == want
    assert responses_complete(_published_cfg(tmp_path, tiny_backbone, parquet), tmp_path / "run")
    with pytest.raises(DataError, match="other settings \\(responses\\)"):  # another source: refused, not mixed
        import_responses(_published_cfg(tmp_path, tiny_backbone, jsonl), tmp_path / "run")
    # other field names, a limit, and clear errors
    (tmp_path / "own.jsonl").write_text(json.dumps({"prompt_text": "q", "reply": "r"}) + "\n")
    own = _published_cfg(tmp_path, tiny_backbone, tmp_path / "own.jsonl", query_field="prompt_text", response_field="reply")
    assert read_published_responses(own) == [{"id": "0", "query": "q", "response": "r", "finish_reason": "stop"}]
    with pytest.raises(DataError, match="own.jsonl\\[0\\]: no query field"):
        read_published_responses(_published_cfg(tmp_path, tiny_backbone, tmp_path / "own.jsonl"))
    limited = config_from_dict({"base_model": str(tiny_backbone), "queries": {"limit": 2},
                                "responses": {"source": str(jsonl)}})
    assert [r["id"] for r in read_published_responses(limited)] == ["tulu_1", "tulu_2"]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="bad.parquet: not a readable parquet file"):
        read_published_responses(_published_cfg(tmp_path, tiny_backbone, tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match="queries.source .* or responses.source"):
        config_from_dict({"base_model": "x"})


def test_published_responses_from_the_hub_use_the_backbones_split(tmp_path, tiny_backbone, monkeypatch):
    import datasets

    from ragen.training.responses import read_published_responses

    calls = []

    def fake_load(name, split=None, **kw):
        calls.append((name, split))
        return datasets.Dataset.from_list(_HUB_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = config_from_dict({"base_model": "x", "responses": {"source": "McGill-NLP/llm2vec-gen-tulu", "split": "Qwen3_8B"}})
    assert [r["query"] for r in read_published_responses(cfg)] == [r["question"] for r in _HUB_ROWS]
    assert calls == [("McGill-NLP/llm2vec-gen-tulu", "Qwen3_8B")]


# --------------------------------------------------------------------------------------------------------
# 5. smaller items: BOS on responses, the literal end marker, special-token rows, trainable dtype
# --------------------------------------------------------------------------------------------------------
def test_responses_get_the_tokenizers_bos_and_optionally_the_literal_end_marker(tiny_backbone):
    from tokenizers import processors

    from ragen.training.data import Collator

    model = _model(tiny_backbone)
    tok = model.tokenizer
    bos = tok.convert_tokens_to_ids("<|im_start|>")  # stands in for Llama's <|begin_of_text|>
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                                  special_tokens=[("<|im_start|>", bos)])
    ended = Example("a", "q", " paris is the capital ", np.zeros(16, np.float32), ended=True)
    cut = Example("b", "q", "paris is the capital", np.zeros(16, np.float32), ended=False)
    plain = tok("paris is the capital", add_special_tokens=False)["input_ids"]
    ref = Collator(model, max_length=64, max_response_length=64)  # defaults: the reference's BOS, real EOS
    assert ref.response_tokens(ended) == [bos] + plain + [ref.eos_id]
    no_bos = Collator(model, max_length=64, max_response_length=64, response_bos=False)
    assert no_bos.response_tokens(ended) == plain + [ref.eos_id]
    literal = Collator(model, max_length=64, max_response_length=64, response_end="reference")
    want = tok("paris is the capital<|end_of_text|>")["input_ids"]
    assert literal.response_tokens(ended) == want == literal.response_tokens(cut)  # always, as the reference
    assert ref.eos_id not in want
    short = Collator(model, max_length=64, max_response_length=4, response_end="reference")
    assert short.response_tokens(ended) == want[:4]  # truncation cuts the marker too, as the reference
    with pytest.raises(DataError, match="response_end"):
        _train_cfg(Path("x"), response_end="literal")
    assert ref.query_tokens("  paris is the capital \n") == ref.query_tokens("paris is the capital")  # stripped


def test_special_rows_start_as_resize_token_embeddings_leaves_them(tmp_path, tiny_backbone):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragen import LLM2VecGen
    from ragen.training.loop import reference_special_rows

    # Llama-like: the table is exactly the vocabulary, so the K tokens are new rows (mean-resizing)
    model = _model(tiny_backbone)
    rows = reference_special_rows(model, seed=0)
    emb = model.lm.get_input_embeddings().weight.detach().float()
    mean, spread = emb.mean(0), (1e-9 * emb.var(0)).sqrt()
    assert rows.shape == (4, emb.shape[1])
    assert torch.all((rows - mean).abs() < 6 * spread + 1e-7)  # N(mean, 1e-9 cov): within a few sigmas
    assert not torch.equal(rows[0], rows[1])  # drawn, not all the mean
    assert torch.equal(rows, reference_special_rows(model, seed=0))
    lm = AutoModelForCausalLM.from_pretrained(str(tiny_backbone))
    tok = AutoTokenizer.from_pretrained(str(tiny_backbone))
    n0 = len(tok)
    tok.add_special_tokens({"additional_special_tokens": [f"<question{i + 1}>" for i in range(4)]})
    torch.manual_seed(0)
    lm.resize_token_embeddings(len(tok))  # what the reference does
    hf_rows = lm.get_input_embeddings().weight[n0:].detach().float()
    assert torch.all((hf_rows - mean).abs() < 6 * spread + 1e-7)
    old = model.trained_rows()  # the previous initialisation: mean + N(0, std^2), a thousand-fold wider
    assert (old - mean).abs().mean() > 1000 * (rows - mean).abs().mean()
    # Qwen-like: the checkpoint has reserved rows beyond the tokenizer, so the K tokens keep those rows
    big = tmp_path / "reserved"
    lm = AutoModelForCausalLM.from_pretrained(str(tiny_backbone))
    lm.resize_token_embeddings(n0 + 16, mean_resizing=False)
    with torch.no_grad():
        lm.get_input_embeddings().weight[n0:] = torch.randn(16, emb.shape[1])
    lm.save_pretrained(big)
    AutoTokenizer.from_pretrained(str(tiny_backbone)).save_pretrained(big)
    qwen_like = LLM2VecGen.initialize(str(big), num_special_tokens=4, alignment_dim=16, device="cpu", dtype="float32")
    table = qwen_like.lm.get_input_embeddings().weight.detach().float()
    assert torch.equal(reference_special_rows(qwen_like, seed=0), table[qwen_like.special_ids])
    with pytest.raises(DataError, match="special_token_init"):
        _train_cfg(Path("x"), special_token_init="zeros")


def test_trainable_tensors_in_float32_or_the_backbone_dtype(tmp_path, tiny_backbone):
    from safetensors.torch import load_file

    from ragen import LLM2VecGen

    def run(name, **train):
        model = LLM2VecGen.initialize(str(tiny_backbone), num_special_tokens=4, alignment_dim=16, device="cpu",
                                      dtype="bfloat16", seed=0)
        fit(model, _examples(), [], _train_cfg(tiny_backbone, max_steps=2, save_every=1, **train), tmp_path / name)
        saved = load_file(str(tmp_path / name / "checkpoints" / "step-000001" / "trainable.safetensors"))
        assert all(p.dtype == torch.float32 for h in (model.reconstruction_head, model.alignment_head)
                   for p in h.parameters())  # handed back as float32 heads either way
        assert model.encode(["paris"]).shape == (1, 16)
        return {k: v.dtype for k, v in saved.items() if not k.startswith("rng.")}

    assert set(run("fp32").values()) == {torch.float32}
    assert set(run("model", trainable_dtype="model").values()) == {torch.bfloat16}  # the reference's bf16


# --------------------------------------------------------------------------------------------------------
# 6. recipes: one per published backbone, dry-run offline
# --------------------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parent.parent
_RECIPES = {  # file: (backbone, reference LR, hidden size, responses split)
    "qwen3-0.6b": ("Qwen/Qwen3-0.6B", 3e-4, 1024, "Qwen3_06B"),
    "qwen3-1.7b": ("Qwen/Qwen3-1.7B", 3e-4, 2048, "Qwen3_17B"),
    "qwen3-4b": ("Qwen/Qwen3-4B", 3e-4, 2560, "Qwen3_4B"),
    "qwen3-8b": ("Qwen/Qwen3-8B", 3e-4, 4096, "Qwen3_8B"),
    "qwen2.5-0.5b": ("Qwen/Qwen2.5-0.5B-Instruct", 5e-4, 896, "Qwen25_05B_Instruct"),
    "qwen2.5-1.5b": ("Qwen/Qwen2.5-1.5B-Instruct", 5e-4, 1536, "Qwen25_15B_Instruct"),
    "qwen2.5-3b": ("Qwen/Qwen2.5-3B-Instruct", 5e-4, 2048, "Qwen25_3B_Instruct"),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B-Instruct", 5e-4, 3584, "Qwen25_7B_Instruct"),
    "llama3.2-1b": ("meta-llama/Llama-3.2-1B-Instruct", 5e-4, 2048, "Llama_32_1B_Instruct"),
    "llama3.2-3b": ("meta-llama/Llama-3.2-3B-Instruct", 5e-4, 3072, "Llama_32_3B_Instruct"),
}


def test_every_recipe_follows_the_reference_and_dry_runs_offline(monkeypatch, tmp_path):
    import transformers
    from typer.testing import CliRunner

    from ragen.cli import app

    assert sorted(p.stem for p in (ROOT / "pipelines" / "recipes").glob("*.yaml")) == sorted(_RECIPES)
    for cls in ("AutoModel", "AutoModelForCausalLM", "AutoTokenizer"):  # a dry run loads no model
        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained",
                            classmethod(lambda *a, **k: pytest.fail("a model was loaded")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for name, (backbone, lr, hidden, split) in _RECIPES.items():
        path = ROOT / "pipelines" / "recipes" / f"{name}.yaml"
        cfg = load_config(path)
        t = cfg.train
        assert (cfg.base_model, t.learning_rate, t.num_special_tokens, t.batch_size) == (backbone, lr, 10, 32)
        assert (t.warmup_steps, t.schedule_steps, t.max_steps, t.max_length, cfg.seed) == (100, 20000, 5000, 512, 42)
        assert (cfg.responses.source, cfg.responses.split) == ("McGill-NLP/llm2vec-gen-tulu", split)
        assert cfg.teacher.model.startswith("llm2vec:McGill-NLP/LLM2Vec-") and cfg.teacher.model.endswith("-mntp-unsup-simcse")
        big = name in ("qwen3-8b", "qwen2.5-7b")
        assert t.micro_batch_size == (16 if big else 32)
        if big:
            assert "torchrun --nproc_per_node 2" in path.read_text()  # the reference's 2 x 16 launch
        res = runner.invoke(app, ["train", str(path), "--dry-run"])
        assert res.exit_code == 0, res.output
        text = " ".join(res.output.split())
        assert f"split {split} (no generation)" in text
        assert f"peak LR {lr:g}, LR at the stop" in text and "(75% of peak)" in text
        trainable = 10 * hidden + hidden * hidden + hidden + hidden * hidden + hidden
        assert f"({trainable:,})" in text, text
        assert f"output: runs/{name}" in text
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_v2_teacher_spelling_is_bge_m3_unsupervised_with_cls_pooling(monkeypatch, tmp_path):
    import ragen.training.teacher as teacher_mod
    from ragen.training.plan import build_plan

    cfg = config_from_dict({"base_model": "Qwen/Qwen3-0.6B", "responses": {"source": "McGill-NLP/llm2vec-gen-tulu",
                                                                           "split": "Qwen3_06B"},
                            "teacher": {"model": "hf:BAAI/bge-m3-unsupervised", "pooling": "cls"}})
    seen = {}

    class FakePooled:
        def __init__(self, name, **kw):
            seen.update(name=name, **kw)

    monkeypatch.setattr(teacher_mod, "PooledEncoder", FakePooled)
    teacher_mod.load_teacher(cfg.teacher, device="cpu")
    assert seen["name"] == "BAAI/bge-m3-unsupervised" and seen["pooling"] == "cls" and seen["max_length"] == 512
    text = dict(build_plan(cfg, tmp_path / "run").lines)["2 teacher"]
    assert text.startswith("BAAI/bge-m3-unsupervised (cls pooling")
    with pytest.raises(DataError, match="needs teacher.pooling"):
        config_from_dict({"base_model": "x", "queries": "q.txt", "teacher": {"model": "hf:BAAI/bge-m3-unsupervised"}})


def test_cli_reports_bad_configs_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from ragen.cli import app

    runner = CliRunner()
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"base_model: x\nqueries: q\xff.txt\n")
    micro = tmp_path / "micro.yaml"
    micro.write_text("base_model: x\nqueries: q.txt\ntrain: {batch_size: 4, micro_batch_size: 8}\n")
    for path, msg in ((bad, "not UTF-8 text"), (micro, "micro_batch_size=8 must be <= train.batch_size=4")):
        for cmd in (["train", str(path)], ["train", str(path), "--dry-run"], ["generate-responses", str(path)]):
            res = runner.invoke(app, cmd)
            assert res.exit_code == 1 and msg in res.output and "Traceback" not in res.output, (cmd, res.output)
            assert [line for line in res.output.splitlines() if line.startswith("error:")] != []


def test_responses_dtype_overrides_the_generation_dtype_only(tmp_path, monkeypatch):
    import ragen.training.responses as responses_mod

    (tmp_path / "q.txt").write_text("why is the sky blue?\n")
    seen = []

    def fake_load(base, device, dtype):
        seen.append(dtype)
        raise DataError("stop here")

    monkeypatch.setattr(responses_mod, "load_generator", fake_load)
    for dtype, want in ((None, torch.bfloat16), ("float16", torch.float16)):
        cfg = config_from_dict({"base_model": "x", "queries": str(tmp_path / "q.txt"), "responses": {"dtype": dtype}})
        with pytest.raises(DataError, match="stop here"):
            generate_responses(cfg, tmp_path / f"run-{dtype}", dtype=torch.bfloat16)
    assert seen == [torch.bfloat16, torch.float16]
    with pytest.raises(DataError, match="responses.dtype"):
        config_from_dict({"base_model": "x", "queries": "q.txt", "responses": {"dtype": "fp8"}})
