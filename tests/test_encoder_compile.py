"""Opt-in torch.compile of the backbone: length/batch buckets, vectors unchanged by bucket padding, the
fallback to eager where compile is unavailable or fails, and (slow) one real compile against eager."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from ragen.encoders import LLM2VecGen, compiled, load_encoder
from ragen.encoders.baselines import PooledEncoder
from tests.conftest import FIXTURE

TEXTS = ["hello world", "x", "a much longer text about plants and photosynthesis, and light turning into sugar " * 3,
         "how do plants grow", "what is the capital of france", "paris", "the sky is blue because of scattering"]


@pytest.fixture(scope="module")
def fixture_path():
    return FIXTURE / "checkpoint", str(FIXTURE / "base")


def _load(fixture_path, **kw) -> LLM2VecGen:
    ckpt, base = fixture_path
    return LLM2VecGen.from_pretrained(ckpt, base_model=base, device="cpu", **kw)


@pytest.fixture
def identity_compile(monkeypatch):
    """torch.compile replaced by the identity: the bucketed path runs, eagerly, without compile cost."""
    calls = []

    def fake_compile(fn, **kwargs):
        calls.append(kwargs)
        return fn

    monkeypatch.setattr(compiled, "compile_unavailable", lambda device: None)
    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls


# ---------------------------------------------------------------------------------------------------------
# buckets
# ---------------------------------------------------------------------------------------------------------
def test_length_buckets_are_bounded_and_cover_every_length():
    buckets = [compiled.bucket_length(n, 512) for n in range(1, 513)]
    assert all(b >= n for n, b in zip(range(1, 513), buckets))
    assert sorted(set(buckets)) == [16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512]
    assert all(b - n < max(16, n / 4) for n, b in zip(range(1, 513), buckets))  # at most a quarter more
    assert buckets == sorted(buckets)  # monotone: a longer batch never gets a shorter bucket
    # a cap that is not a bucket is itself the last bucket, and never truncates
    assert compiled.bucket_length(97, 100) == 100 and compiled.bucket_length(100, 100) == 100
    assert compiled.bucket_length(120, 100) == 128  # past the cap: the ordinary (bounded) buckets
    assert {compiled.bucket_length(n, 100) for n in range(1, 101)} == {16, 32, 48, 64, 80, 96, 100}
    with pytest.raises(ValueError):
        compiled.bucket_length(0)


def test_batch_buckets_are_powers_of_two_capped_by_batch_size():
    assert sorted({compiled.bucket_batch(b, 32) for b in range(1, 33)}) == [1, 2, 4, 8, 16, 32]
    assert compiled.bucket_batch(20, 24) == 24 and compiled.bucket_batch(24, 24) == 24  # no padding past the cap
    assert compiled.bucket_batch(5) == 8


def test_pad_to_bucket_pads_on_the_encoders_side_and_repeats_the_first_row():
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    left_ids, left_mask = compiled.pad_to_bucket(ids, mask, pad_id=0, side="left", batch_size=4)
    assert left_ids.shape == (2, 16)  # 2 rows: already a power of two
    assert left_ids[:, -3:].tolist() == ids.tolist() and left_mask[:, :13].sum() == 0
    r_ids, r_mask = compiled.pad_to_bucket(ids[:1].repeat(3, 1), mask[:1].repeat(3, 1), pad_id=0, side="right",
                                          batch_size=8)
    assert r_ids.shape == (4, 16) and r_ids[:, :3].tolist() == [[0, 5, 6]] * 4 and r_mask[:, 3:].sum() == 0


# ---------------------------------------------------------------------------------------------------------
# vectors unchanged by bucket padding (eager: torch.compile replaced by the identity)
# ---------------------------------------------------------------------------------------------------------
def test_llm2vec_gen_bucket_padding_leaves_vectors_unchanged(fixture_path, identity_compile):
    eager = _load(fixture_path)
    bucketed = _load(fixture_path, compile=True)
    assert bucketed.compiled and not eager.compiled
    assert identity_compile == [{"dynamic": False}]
    for batch_size in (1, 3, 32):
        np.testing.assert_allclose(bucketed.encode_documents(TEXTS, batch_size=batch_size),
                                   eager.encode_documents(TEXTS, batch_size=batch_size), atol=1e-5, rtol=1e-5)
    # every forward ran at a bucket shape: batch a power of two or the batch_size (3), length a bucket
    shapes = {s[0][:2] for s in bucketed._compiled.shapes}
    assert shapes and all(b in (1, 2, 3, 4, 8) and compiled.bucket_length(n) == n for b, n in shapes)
    assert any(b == 8 for b, _ in shapes)  # 7 texts, batch_size 32: one batch padded to 8 rows
    np.testing.assert_allclose(bucketed.reconstruction_states(TEXTS[:3]), eager.reconstruction_states(TEXTS[:3]),
                               atol=1e-5, rtol=1e-5)
    assert bucketed.fingerprint == eager.fingerprint  # compile is a speed setting, not part of the function


def test_pooled_encoder_bucket_padding_leaves_vectors_unchanged(tiny_backbone, identity_compile):
    for pooling in ("mean", "last"):
        eager = PooledEncoder(str(tiny_backbone), pooling=pooling, device="cpu")
        bucketed = load_encoder(f"{pooling}:{tiny_backbone}", device="cpu", compile=True)
        assert bucketed.compiled
        np.testing.assert_allclose(bucketed.encode(TEXTS, batch_size=3), eager.encode(TEXTS, batch_size=3),
                                   atol=1e-5, rtol=1e-5)
        assert bucketed.fingerprint == eager.fingerprint


# ---------------------------------------------------------------------------------------------------------
# fallback: one warning, uncompiled, same vectors
# ---------------------------------------------------------------------------------------------------------
def test_unavailable_compile_warns_once_and_runs_eager(fixture_path, monkeypatch, caplog):
    monkeypatch.setattr(compiled, "compile_unavailable", lambda device: "no C++ compiler (test)")
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: pytest.fail("torch.compile must not be called"))
    eager = _load(fixture_path)
    with caplog.at_level(logging.WARNING, logger="ragen.encoders.compiled"):
        model = _load(fixture_path, compile=True)
        vectors = model.encode_documents(TEXTS)
    warnings = [r for r in caplog.records if r.name == "ragen.encoders.compiled"]
    assert len(warnings) == 1 and "running uncompiled: no C++ compiler (test)" in warnings[0].getMessage()
    assert model.compiled is False
    np.testing.assert_array_equal(vectors, eager.encode_documents(TEXTS))


def test_compile_failing_on_first_call_falls_back_once(fixture_path, monkeypatch, caplog):
    from torch._dynamo.exc import BackendCompilerFailed

    calls = []

    def failing_compile(fn, **kwargs):
        def run(*args):
            calls.append(1)
            raise BackendCompilerFailed(lambda *a: None, RuntimeError("inductor: g++ exited with status 1"), None)
        return run

    monkeypatch.setattr(compiled, "compile_unavailable", lambda device: None)
    monkeypatch.setattr(torch, "compile", failing_compile)
    eager = _load(fixture_path)
    with caplog.at_level(logging.WARNING, logger="ragen.encoders.compiled"):
        model = _load(fixture_path, compile=True)
        assert model.compiled  # the failure only shows on the first call
        first = model.encode_documents(TEXTS, batch_size=2)
        second = model.encode_documents(TEXTS, batch_size=2)
    warnings = [r for r in caplog.records if r.name == "ragen.encoders.compiled"]
    assert len(warnings) == 1 and "torch.compile failed" in warnings[0].getMessage()
    assert calls == [1] and model.compiled is False
    expected = eager.encode_documents(TEXTS, batch_size=2)
    np.testing.assert_allclose(first, expected, atol=1e-5, rtol=1e-5)  # the failed batch re-ran eager, bucket-padded
    np.testing.assert_array_equal(second, expected)  # afterwards: the plain eager path


def test_a_model_error_is_not_hidden_by_the_fallback(fixture_path, monkeypatch):
    """An error that is not a compile failure (here: out of memory) propagates unchanged."""
    def oom_compile(fn, **kwargs):
        def run(*args):
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return run

    monkeypatch.setattr(compiled, "compile_unavailable", lambda device: None)
    monkeypatch.setattr(torch, "compile", oom_compile)
    model = _load(fixture_path, compile=True)
    with pytest.raises(torch.OutOfMemoryError):
        model.encode_documents(TEXTS[:2])


def test_compile_unavailable_names_the_reason(monkeypatch):
    assert "mps" in compiled.compile_unavailable("mps")
    from torch._inductor import cpp_builder

    def no_compiler():
        raise RuntimeError("Unsupported compiler: g++ not found")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    reason = compiled.compile_unavailable("cpu")
    assert reason and "no C++ compiler" in reason and "g++ not found" in reason


def test_inductor_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    assert compiled.inductor_cache_dir() == str(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# one real compile (tens of seconds on CPU)
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_vectors_equal_eager(tiny_checkpoint):
    reason = compiled.compile_unavailable("cpu")
    if reason:
        pytest.skip(reason)
    texts = TEXTS[:4]
    eager = LLM2VecGen.from_pretrained(tiny_checkpoint, device="cpu")
    model = LLM2VecGen.from_pretrained(tiny_checkpoint, device="cpu", compile=True)
    got = model.encode_documents(texts, batch_size=4)  # one batch of 4, one bucket: exactly one compile
    assert model.compiled, model._compiled.fallback_reason
    assert len(model._compiled.shapes) == 1
    np.testing.assert_allclose(got, eager.encode_documents(texts, batch_size=4), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# CLI plumbing: --compile reaches the encoder, and is not a build setting
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def compile_spy(monkeypatch, identity_compile):
    """Names of the encoders a CompiledForward was built for (the bucketed path, torch.compile = identity)."""
    built = []
    real_init = compiled.CompiledForward.__init__

    def init(self, forward, *, device, name):
        built.append(name)
        real_init(self, forward, device=device, name=name)

    monkeypatch.setattr(compiled.CompiledForward, "__init__", init)
    monkeypatch.delenv("RAGEN_MODEL", raising=False)
    monkeypatch.delenv("RAGEN_COMPILE", raising=False)
    return built


def test_cli_encode_compile_gives_the_same_vectors(tiny_checkpoint, compile_spy):
    import json

    from typer.testing import CliRunner

    from ragen.cli import app

    runner = CliRunner()
    args = ["encode", "why is the sky blue?", "fox", "--model", str(tiny_checkpoint), "--device", "cpu"]
    plain = runner.invoke(app, args)
    assert plain.exit_code == 0 and compile_spy == []
    res = runner.invoke(app, args + ["--compile"])
    assert res.exit_code == 0, res.output
    assert compile_spy == [str(tiny_checkpoint)]
    vec = lambda r: np.array([json.loads(line)["embedding"] for line in r.stdout.splitlines() if line.strip()])
    np.testing.assert_allclose(vec(res), vec(plain), atol=1e-5)


def test_cli_index_and_query_compile_is_not_recorded(tiny_checkpoint, compile_spy, tmp_path):
    from typer.testing import CliRunner

    from ragen.cli import app

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "plants.txt").write_text("Photosynthesis lets green plants turn sunlight into sugar.")
    (docs / "space.md").write_text("A satellite stays in orbit because it falls around the Earth.")
    idx = str(tmp_path / "idx")
    runner = CliRunner()
    built = runner.invoke(app, ["index", str(docs), "--index", idx, "-m", str(tiny_checkpoint), "--device", "cpu",
                                "--compile"])
    assert built.exit_code == 0, built.stderr
    assert len(compile_spy) == 1
    import json

    from ragen.store import read_manifest

    assert "compile" not in json.dumps(read_manifest(idx))
    again = runner.invoke(app, ["index", str(docs), "--index", idx, "--device", "cpu"])  # no --compile
    assert again.exit_code == 0 and "rebuilding" not in again.stderr  # not a build setting: up to date
    query = ["query", "sunlight and sugar", "--index", idx, "--json", "--device", "cpu"]
    hits = runner.invoke(app, query + ["--compile"])
    assert hits.exit_code == 0, hits.stderr
    assert len(compile_spy) == 2
    plain = runner.invoke(app, query)
    assert plain.exit_code == 0 and len(compile_spy) == 2
    got, expected = json.loads(hits.stdout), json.loads(plain.stdout)
    assert [h["chunk_id"] for h in got] == [h["chunk_id"] for h in expected]
    np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in expected], atol=1e-4)


def test_serve_worker_batches_reach_a_compiled_encoder_at_bucketed_batch_sizes(fixture_path, identity_compile):
    """The server hands each forward batch over whole; a compiled encoder must still see bounded batch sizes
    (powers of two up to --max-batch-size), not one shape per number of waiting requests."""
    from ragen.serve.worker import InferenceWorker

    eager = _load(fixture_path)
    model = _load(fixture_path, compile=True)
    worker = InferenceWorker(model, max_batch_size=8)
    for n in (3, 5, 6, 7):
        got = worker._encode("query", None, TEXTS[:n])
        np.testing.assert_allclose(got, eager.encode_queries(TEXTS[:n], batch_size=n), atol=1e-5, rtol=1e-5)
    assert {s[0][0] for s in model._compiled.shapes} == {4, 8}
