"""``ragen ask`` / RagPipeline: a tiny backbone taught to answer from its sources gives a cited answer from
the right chunk, streams, shares the encoder's weights, and fails on bad input with one line."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragen.cli import app
from ragen.errors import RagenError
from ragen.rag import AskSettings, ChatGenerator, RagPipeline, build_messages, citations
from ragen.types import Hit

DOCS = {
    "geo/france.txt": "paris is the capital of france.",
    "sky.md": "rayleigh scattering makes the sky blue.",
}
QA = {
    "what is the capital of france?": ("paris", "geo/france.txt"),
    "why is the sky blue?": ("rayleigh scattering", "sky.md"),
}
SYSTEM = "cite the source."  # short prompts keep the teaching fast
SETTINGS = AskSettings(k=2, max_new_tokens=24, system_prompt=SYSTEM)
CLI = ["-k", "2", "--max-new-tokens", "24", "--system-prompt", SYSTEM, "--device", "cpu"]


def teach(backbone: Path, examples: list[tuple[list[dict], str]], *, steps: int = 1000, lr: float = 1e-2) -> float:
    """Fine-tune a tiny causal LM so that each chat prompt is answered with its text (ragen.testing)."""
    from ragen.testing import teach_answers

    return teach_answers(backbone, examples, steps=steps, lr=lr, stop_loss=0.005)


def _hit(path: str) -> Hit:
    return Hit(rank=1, score=1.0, chunk_id=f"{path}#0", path=path, text=DOCS[path], start=0, end=len(DOCS[path]))


def build_taught(tmp: Path) -> Path:
    """An index over DOCS whose LLM2Vec-Gen backbone answers every question with the fact and the number of
    the source that holds it, whatever order retrieval puts the three sources in. The session fixture
    ``taught`` (tests/conftest.py) builds it once for this module and tests/test_serve_chat.py."""
    from ragen import load_encoder
    from ragen.retriever import build_index
    from ragen.testing import make_backbone, make_checkpoint, make_tokenizer

    extra = [SYSTEM, *DOCS, *DOCS.values(), *QA, "Sources:\n\nQuestion: [1] [2]"]
    backbone = make_backbone(tmp / "lm", hidden_size=64, num_layers=2, seed=5,
                             tokenizer=make_tokenizer(600, extra_corpus=extra * 8))
    examples = []
    for order in itertools.permutations(DOCS):
        sources = [(n, _hit(p), DOCS[p]) for n, p in enumerate(order, 1)]
        for question, (fact, path) in QA.items():
            examples.append((build_messages(question, sources, SYSTEM), f"{fact} [{order.index(path) + 1}]."))
    loss = teach(backbone, examples)
    assert loss < 0.05, loss
    ckpt = make_checkpoint(tmp / "ckpt", backbone, num_special_tokens=4, alignment_dim=32, seed=2)
    docs = tmp / "docs"
    for rel, text in DOCS.items():
        (docs / rel).parent.mkdir(parents=True, exist_ok=True)
        (docs / rel).write_text(text)
    build_index(docs, tmp / "idx", encoder=load_encoder(str(ckpt), device="cpu"))
    return tmp / "idx"


def test_cited_answer_from_the_right_chunk(taught):
    with RagPipeline.open(taught, device="cpu", settings=SETTINGS) as rag:
        for question, (fact, path) in QA.items():
            answer = rag.ask(question)
            assert len(answer.sources) == 2
            right = next(s.number for s in answer.sources if s.path == path)
            assert answer.text == f"{fact} [{right}].", (question, answer.text, [s.path for s in answer.sources])
            assert answer.cited == (right,)
            assert [s.path for s in answer.cited_sources()] == [path]
            assert answer.finish_reason == "stop" and answer.completion_tokens > 0
            assert set(answer.timings) >= {"embed", "search", "retrieve", "prompt", "first_token", "generate", "total"}


def test_generation_shares_the_encoders_weights(taught):
    with RagPipeline.open(taught, device="cpu") as rag:
        enc_params = {p.data_ptr() for p in rag.retriever.encoder.lm.parameters()}
        gen_params = [p.data_ptr() for p in rag.generator.lm.parameters()]
        assert rag.generator.lm is rag.retriever.encoder.lm
        assert gen_params and set(gen_params) == enc_params  # one storage per parameter, shared


def test_stream_yields_pieces_that_make_the_answer(taught):
    with RagPipeline.open(taught, device="cpu", settings=SETTINGS) as rag:
        stream = rag.stream("why is the sky blue?")
        assert len(stream.sources) == 2  # known before the first piece, for a server to send first
        pieces = list(stream)
        assert len(pieces) > 1 and all(pieces)
        assert "".join(pieces) == stream.result.text == rag.ask("why is the sky blue?").text


def test_prompt_budget_leaves_out_sources_that_do_not_fit(taught):
    with RagPipeline.open(taught, device="cpu") as rag:
        hits = [_hit(p) for p in DOCS]
        full, _ = rag.fit_sources("why is the sky blue?", hits, 16)
        assert len(full) == 2 and not any(s.truncated for s in full)
        base = len(rag.generator.prompt_ids(build_messages("why is the sky blue?", [])))
        one = len(rag.generator.prompt_ids(build_messages("why is the sky blue?", [(1, hits[0], hits[0].text)])))
        rag.settings = AskSettings(max_prompt_tokens=one + 2)
        some, messages = rag.fit_sources("why is the sky blue?", hits, 16)
        assert [s.path for s in some] == [hits[0].path] and len(rag.generator.prompt_ids(messages)) <= one + 2
        long = Hit(rank=1, score=1.0, chunk_id="long.txt#0", path="long.txt", text=DOCS["sky.md"] * 40, start=0, end=1)
        rag.settings = AskSettings(max_prompt_tokens=base + 60)
        cut, messages = rag.fit_sources("why is the sky blue?", [long, hits[0]], 16)  # alone too long: cut
        assert len(cut) == 1 and cut[0].truncated and len(rag.generator.prompt_ids(messages)) <= base + 60
        assert DOCS["sky.md"] in messages[1]["content"]
        rag.settings = AskSettings(max_prompt_tokens=base + 2)
        with pytest.raises(RagenError, match="budget"):
            rag.fit_sources("why is the sky blue? " * 4, hits, 16)


def test_stop_strings_end_the_reply_and_never_leak(taught):
    with RagPipeline.open(taught, device="cpu", settings=SETTINGS) as rag:
        hits = [_hit(p) for p in DOCS]
        _, messages = rag.fit_sources("why is the sky blue?", hits, 24)
        full = rag.generator.stream(messages, max_new_tokens=24)
        assert full.read().startswith("rayleigh scattering [") and full.finish_reason == "stop"
        cut = rag.generator.stream(messages, max_new_tokens=24, stop=["ing ["])
        pieces = list(cut)
        assert "".join(pieces) == cut.text == "rayleigh scatter" and cut.finish_reason == "stop"
        short = rag.generator.stream(messages, max_new_tokens=2)
        assert short.read() and short.finish_reason == "length" and short.completion_tokens == 2


def test_citations_parse_only_known_numbers():
    assert citations("a [2] b [1, 3] c [2] [9] [x]", [1, 2, 3]) == (2, 1, 3)
    assert citations("no sources", [1]) == ()


def test_cli_ask_streams_the_answer_and_lists_sources(taught):
    runner = CliRunner()
    res = runner.invoke(app, ["ask", "what is the capital of france?", "--index", str(taught), *CLI])
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].startswith("paris [")
    number = lines[0].split("[")[1].split("]")[0]
    assert any(f"[{number}] geo/france.txt" in line and line.startswith("*") for line in lines), lines


def test_cli_ask_prints_each_piece_as_it_arrives(taught, monkeypatch):
    import ragen.cli.ask as cli_ask

    printed: list[str] = []
    real = cli_ask.clean

    def recording(text: str) -> str:  # every generated piece passes through clean() on its way to stdout
        printed.append(text)
        return real(text)

    monkeypatch.setattr(cli_ask, "clean", recording)
    res = CliRunner().invoke(app, ["ask", "why is the sky blue?", "--index", str(taught), *CLI])
    assert res.exit_code == 0, res.stderr
    answer = res.stdout.splitlines()[0]
    start = next(i for i, p in enumerate(printed) if p and answer.startswith(p))  # before: the model path
    pieces = printed[start: next(i for i in range(start, len(printed) + 1) if "".join(printed[start:i]) == answer)]
    assert len(pieces) > 1 and "".join(pieces) == answer and answer.startswith("rayleigh scattering [")


def test_cli_ask_json_is_one_object(taught):
    res = CliRunner().invoke(app, ["ask", "why is the sky blue?", "--index", str(taught), *CLI, "--json"])
    assert res.exit_code == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["answer"].startswith("rayleigh scattering [")
    assert [h["rank"] for h in data["hits"]] == [1, 2]
    assert set(data["hits"][0]) == {"rank", "score", "path", "chunk_id", "text", "start", "end"}
    cited = data["sources"][data["cited"][0] - 1]
    assert cited["path"] == "sky.md"
    assert data["timings"]["total"] > 0 and data["blocked"] is False


def test_cli_ask_escapes_markup_and_control_characters(taught, tmp_path):
    # A generator that echoes the user's text would reach the terminal; the CLI must print it inert.
    from ragen.cli._common import clean, shown

    assert clean("a\x1b[31mred\x07\u202eb\n\tc") == "aredb\n\tc"
    assert shown("[bold]x[/]") == "\\[bold]x\\[/]"


def test_cli_ask_errors_are_one_line(taught, tmp_path, minilm):
    runner = CliRunner()
    res = runner.invoke(app, ["ask", "q", "--index", str(tmp_path / "missing")])
    assert res.exit_code == 1 and "Traceback" not in res.stderr and "no ragen index" in res.stderr
    res = runner.invoke(app, ["ask", "  ", "--index", str(taught)])
    assert res.exit_code == 1 and "question is empty" in res.stderr
    res = runner.invoke(app, ["ask", "q", "--index", str(taught), "--llm", str(tmp_path / "nope")])
    assert res.exit_code == 1 and "no such directory" in res.stderr
    docs = tmp_path / "d"
    docs.mkdir()
    (docs / "a.txt").write_text("some text about france")
    res = runner.invoke(app, ["index", str(docs), "--index", str(tmp_path / "mini"), "--model", "minilm", "--device", "cpu"])
    assert res.exit_code == 0, res.stderr
    res = runner.invoke(app, ["ask", "q", "--index", str(tmp_path / "mini")])
    assert res.exit_code == 1 and "--llm" in res.stderr and "Traceback" not in res.stderr
    assert len([line for line in res.stderr.splitlines() if line.strip()]) == 1


def test_llm_option_answers_a_minilm_index_with_another_model(taught, tmp_path, minilm):
    """--llm: a baseline index answered by a separate local causal LM (here the taught backbone)."""
    from ragen.retriever import build_index

    docs = tmp_path / "docs"
    for rel, text in DOCS.items():
        (docs / rel).parent.mkdir(parents=True, exist_ok=True)
        (docs / rel).write_text(text)
    build_index(docs, tmp_path / "mini", encoder=minilm)
    llm = taught.parent / "lm"
    with RagPipeline.open(tmp_path / "mini", llm=llm, device="cpu", settings=SETTINGS) as rag:
        answer = rag.ask("why is the sky blue?")
        assert [s.path for s in answer.cited_sources()] == ["sky.md"]
        assert answer.text.startswith("rayleigh scattering [")
    res = CliRunner().invoke(app, ["ask", "why is the sky blue?", "--index", str(tmp_path / "mini"), "--llm", str(llm),
                                   *CLI, "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["answer"].startswith("rayleigh scattering [")


def test_generator_without_chat_template_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragen.testing import make_backbone

    lm_dir = make_backbone(tmp_path / "plain", seed=0)
    tok = AutoTokenizer.from_pretrained(str(lm_dir))
    tok.chat_template = None
    with pytest.raises(RagenError, match="no chat template"):
        ChatGenerator(AutoModelForCausalLM.from_pretrained(str(lm_dir)), tok, source=str(lm_dir))
