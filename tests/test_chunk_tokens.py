"""Chunks that fit the encoder (issue 13): token chunking by the encoder's own tokenizer, the default size
from its input limit, truncation counted; encoder load options recorded in the manifest and reused (hub
revisions, numerics)."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from ragen.cli import app
from ragen.corpus import ChunkingConfig, Document, SourceFile, chunk_document, token_splitter
from ragen.retriever import RecordedEncoder, build_index, recorded_load_options
from ragen.store import read_manifest

from .test_encoder_loading import hub_cache  # noqa: F401 - the fixture


def _prose(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    words = ["photosynthesis", "chlorophyll", "mitochondria", "the", "of", "energy", "glucose", "cells",
             "leaves", "transpiration", "stomata", "respiration", "light", "water"]
    sentences, sentence = [], []
    for i in range(n_words):  # real words and identifiers: ~0.3 tokens per character, like code or papers
        sentence.append(rng.choice(words) if i % 2 else f"{rng.choice(words)[:3]}{rng.randint(10, 9999)}")
        if len(sentence) >= 12:
            sentences.append(" ".join(sentence).capitalize() + ".")
            sentence = []
    return " ".join(sentences)


@pytest.fixture()
def corpus(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    for i in range(3):
        (src / f"doc{i}.txt").write_text(_prose(900, i))
    return src


def test_default_chunks_fit_minilm_where_1000_characters_do_not(corpus, tmp_path, minilm):
    budget = minilm.document_token_budget()
    assert budget.limit == 256 and budget.max_text_tokens == 254  # max_seq_length minus [CLS] and [SEP]
    chars = build_index(corpus, tmp_path / "chars", encoder=minilm, chunk_unit="chars")
    assert chars.chunks_truncated > 0 and chars.token_limit == 256  # counted, never silent
    tokens = build_index(corpus, tmp_path / "tokens", encoder=minilm)
    assert tokens.chunks_truncated == 0 and tokens.chunks_embedded > 0
    chunking = read_manifest(tmp_path / "tokens")["chunking"]
    assert (chunking["unit"], chunking["chunk_size"], chunking["chunk_overlap"]) == ("tokens", 254, 50)
    import sqlite3

    texts = [t for (t,) in sqlite3.connect(tmp_path / "tokens" / "chunks.sqlite").execute("SELECT text FROM chunks")]
    assert max(budget.input_lengths(texts)) <= 256


def test_token_chunks_have_exact_offsets_and_stable_ids(minilm):
    budget = minilm.document_token_budget()
    text = "Préface — “naïve” café.\n\n" + _prose(700, 3) + "\n\n🌿 emoji line. " + _prose(200, 4)
    doc = Document(SourceFile("a.md", None, 0, 0), text)  # type: ignore[arg-type]
    config = ChunkingConfig(64, 12, unit="tokens")
    first = chunk_document(doc, config, splitter=token_splitter(config, budget.tokenizer))
    again = chunk_document(doc, config, splitter=token_splitter(config, budget.tokenizer))
    assert first == again and len(first) > 5
    assert all(text[c.start:c.end] == c.text for c in first)
    assert [c.chunk_id for c in first] == [f"a.md#{i}" for i in range(len(first))]
    assert max(len(budget.tokenizer.encode(c.text, add_special_tokens=False).ids) for c in first) <= 64
    assert all(a.start < b.start for a, b in zip(first, first[1:]))


def test_llm2vec_gen_budget_counts_instruction_and_special_tokens(tiny_model):
    budget = tiny_model.document_token_budget()
    text = "Leaves turn sunlight into sugar."
    full = tiny_model.tokenize([tiny_model.document_instruction + text], max_length=4096)[0]
    assert budget.input_lengths([text]) == [len(full)]
    assert budget.limit == min(tiny_model.max_input_length, 512)
    assert budget.overhead >= tiny_model.num_special_tokens + 1  # the instruction and the K special tokens
    assert budget.max_text_tokens == budget.limit - budget.overhead


def _flat(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


def test_cli_records_the_unit_and_a_plain_rerun_reuses_it(corpus, tmp_path, monkeypatch):
    monkeypatch.delenv("RAGEN_MODEL", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()
    idx = str(tmp_path / "idx")
    res = runner.invoke(app, ["index", str(corpus), "--index", idx, "--model", "minilm", "--chunk-size", "100"])
    assert res.exit_code == 0, res.output
    assert "0 truncated at the encoder's 256-token limit" in _flat(res.stdout)
    assert "100 tokens per chunk" in _flat(res.stdout)
    chunking = read_manifest(idx)["chunking"]
    assert (chunking["unit"], chunking["chunk_size"], chunking["chunk_overlap"]) == ("tokens", 100, 20)
    res = runner.invoke(app, ["index", str(corpus), "--index", idx])
    assert res.exit_code == 0 and "up to date, model not loaded" in res.stdout and "rebuilding" not in res.stderr
    (corpus / "doc0.txt").write_text(_prose(400, 9))  # a changed file: the recorded unit and size are reused
    res = runner.invoke(app, ["index", str(corpus), "--index", idx])
    assert res.exit_code == 0 and "rebuilding" not in res.stderr, res.output
    assert read_manifest(idx)["chunking"] == chunking
    res = runner.invoke(app, ["index", str(corpus), "--index", idx, "--chunk-unit", "chars", "--chunk-size", "4000",
                              "--chunk-overlap", "0"])
    assert res.exit_code == 0, res.output
    assert "rebuilding" in res.stderr and "chunk unit tokens -> chars" in _flat(res.stderr)
    assert "were longer than the encoder's 256-token input" in _flat(res.stderr)  # truncation reported, not silent
    assert read_manifest(idx)["chunking"]["unit"] == "chars"
    res = runner.invoke(app, ["info", "--index", idx])
    assert res.exit_code == 0 and "4000 chars, overlap 0" in _flat(res.stdout)
    res = runner.invoke(app, ["index", str(corpus), "--index", idx, "--chunk-unit", "words"])
    assert res.exit_code != 0 and "expected tokens or chars" in res.stderr


def test_an_encoder_without_a_tokenizer_chunks_by_characters(corpus, tmp_path):
    from ragen.errors import DataError

    from ._hash_encoder import HashEncoder

    stats = build_index(corpus, tmp_path / "idx", encoder=HashEncoder())
    assert stats.chunks_truncated is None and stats.chunking["unit"] == "chars"
    with pytest.raises(DataError, match="exposes no tokenizer"):
        build_index(corpus, tmp_path / "idx2", encoder=HashEncoder(), chunk_unit="tokens")


# ---------------------------------------------------------------------------------------------- load options
def test_manifest_records_load_options_and_queries_reuse_the_pinned_commit(hub_cache, corpus, tmp_path,  # noqa: F811
                                                                          monkeypatch):
    monkeypatch.delenv("RAGEN_MODEL", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()
    idx = str(tmp_path / "idx")
    old = hub_cache["old"]
    res = runner.invoke(app, ["index", str(corpus), "--index", idx, "--model", "test-org/tiny-gen", "--revision", old,
                              "--numerics", "reference"])
    assert res.exit_code == 0, res.output
    enc = read_manifest(idx)["encoder"]
    assert enc["revision"] == old and enc["numerics"] == "reference" and enc["trust_remote_code"] is False
    assert enc["resolved_revisions"] == {"checkpoint": old, "base_model": hub_cache["base"]}
    assert recorded_load_options(enc)["revision"] == old
    # main now points at a replaced model (another dimension): the query must load the recorded commit
    res = runner.invoke(app, ["query", "sugar in leaves", "--index", idx, "--json", "-k", "2"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)) == 2
    res = runner.invoke(app, ["info", "--index", idx])
    assert res.exit_code == 0 and f"checkpoint {old}" in _flat(res.stdout)
    assert f"revision {old}" in _flat(res.stdout) and "numerics reference" in _flat(res.stdout)
    res = runner.invoke(app, ["info", "--index", idx, "--json"])
    assert json.loads(res.stdout)["encoder"]["resolved_revisions"]["checkpoint"] == old
    # an explicit --revision on query wins (here: the replaced model, which the index refuses)
    res = runner.invoke(app, ["query", "sugar", "--index", idx, "--revision", hub_cache["new"]])
    assert res.exit_code == 1 and "error:" in res.stderr


def test_recorded_encoder_round_trips_through_the_manifest(corpus, tmp_path, tiny_model):
    build_index(corpus, tmp_path / "idx", encoder=tiny_model, load_options={"numerics": "reference"})
    enc = read_manifest(tmp_path / "idx")["encoder"]
    rec = RecordedEncoder.from_manifest({**enc, "unknown_key": 1})
    assert rec.numerics == "reference" and rec.resolved_revisions == {"checkpoint": None, "base_model": None}
    opts = recorded_load_options(enc)
    assert opts["numerics"] == "reference" and opts["revision"] is None and opts["trust_remote_code"] is False


def test_explain_notice_prints_the_encoder_spec_literally(corpus, tmp_path, monkeypatch):
    import ragen.cli.index as cli_index

    from ._hash_encoder import HashEncoder

    def load(spec, device, base_model=None, **options):
        enc = HashEncoder()
        enc.spec, enc.fingerprint = spec, "hash-evil"
        return enc

    monkeypatch.setattr(cli_index, "_load", load)
    monkeypatch.delenv("RAGEN_MODEL", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()
    idx = str(tmp_path / "idx")
    spec = "st:[red]evil[/red]"
    assert runner.invoke(app, ["index", str(corpus), "--index", idx, "--model", spec]).exit_code == 0
    res = runner.invoke(app, ["query", "leaves", "--index", idx, "--explain", "--json"])
    assert res.exit_code == 0, res.output
    assert f"needs an LLM2Vec-Gen model; {spec} embeds" in _flat(res.stderr)


@pytest.mark.parametrize("command", ["ask", "query"])
def test_ask_and_query_load_the_encoder_as_the_index_recorded(corpus, tmp_path, tiny_model, monkeypatch, command):
    import ragen.encoders

    from ragen.errors import RagenError

    build_index(corpus, tmp_path / "idx", encoder=tiny_model,
                load_options={"numerics": "reference", "trust_remote_code": True})
    seen: list[dict] = []

    def load_encoder(spec, **kwargs):
        seen.append(kwargs)
        raise RagenError("stop here")

    monkeypatch.setattr(ragen.encoders, "load_encoder", load_encoder)
    res = CliRunner().invoke(app, [command, "what do leaves do?", "--index", str(tmp_path / "idx")])
    assert res.exit_code == 1 and "stop here" in res.stderr
    assert seen[0]["numerics"] == "reference" and seen[0]["trust_remote_code"] is True
    res = CliRunner().invoke(app, [command, "what do leaves do?", "--index", str(tmp_path / "idx"),
                                   "--numerics", "fp32", "--no-trust-remote-code"])
    assert seen[1]["numerics"] == "fp32" and seen[1]["trust_remote_code"] is False  # given explicitly: wins
