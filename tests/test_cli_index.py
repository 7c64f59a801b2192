"""``ragen index`` / ``query`` / ``info`` through typer's runner and through real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragen.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = {
    "plants.txt": "Photosynthesis lets green plants turn sunlight, water and carbon dioxide into sugar.",
    "space.md": "# Orbits\n\nA satellite stays in orbit because it falls around the Earth as fast as it drops.",
    "bread.html": "<html><body><h1>Bread</h1><p>Knead the dough, let the yeast rise, then bake it.</p></body></html>",
}


@pytest.fixture()
def runner(monkeypatch):
    monkeypatch.delenv("RAGEN_MODEL", raising=False)
    return CliRunner()


@pytest.fixture()
def docs(tmp_path) -> Path:
    d = tmp_path / "docs"
    d.mkdir()
    for name, text in DOCS.items():
        (d / name).write_text(text)
    (d / "image.bin").write_bytes(b"\x00\x01")
    return d


def _one_error_line(result) -> str:
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ")
    return "\n".join(lines)


def test_index_query_info_with_minilm(runner, docs, tmp_path, minilm):
    idx = str(tmp_path / "idx")
    result = runner.invoke(app, ["index", str(docs), "--index", idx, "--model", "minilm", "--device", "cpu",
                                 "--chunk-unit", "chars", "--chunk-size", "500", "--chunk-overlap", "100", "--batch-size", "2"])
    assert result.exit_code == 0, result.stderr
    assert "3 indexed" in result.stdout and "3 in index (3 embedded now" in result.stdout
    assert "skipped 1 file: unsupported type" in result.stderr

    result = runner.invoke(app, ["query", "how do satellites stay up", "--index", idx, "-k", "2", "--json"])
    assert result.exit_code == 0, result.stderr
    hits = json.loads(result.stdout)  # stdout holds the JSON array and nothing else
    assert [h["rank"] for h in hits] == [1, 2] and hits[0]["path"] == "space.md"
    assert set(hits[0]) >= {"rank", "score", "path", "chunk_id", "text"} and hits[0]["chunk_id"] == "space.md#0"
    assert hits[0]["score"] >= hits[1]["score"]

    result = runner.invoke(app, ["query", "bake bread with yeast", "--index", idx, "-k", "3"])
    assert result.exit_code == 0 and "bread.html#0" in result.stdout and "score" in result.stdout

    result = runner.invoke(app, ["query", "anything", "--index", idx, "--explain", "--json"])
    assert result.exit_code == 0 and "--explain needs an LLM2Vec-Gen model" in result.stderr
    json.loads(result.stdout)

    result = runner.invoke(app, ["info", "--index", idx])
    assert result.exit_code == 0
    for expected in ("minilm", "dim 384", "3 files, 3 chunks", "500 chars, overlap 100", "flat (exact)"):
        assert expected in result.stdout, expected
    info = json.loads(runner.invoke(app, ["info", "--index", idx, "--json"]).stdout)
    assert info["counts"]["chunks"] == 3 and info["file_types"] == {".txt": 1, ".md": 1, ".html": 1}

    # re-run: the model recorded in the index is reused, nothing is embedded again
    result = runner.invoke(app, ["index", str(docs), "--index", idx])
    assert result.exit_code == 0, result.stderr
    assert "0 embedded now" in result.stdout and "minilm" in result.stdout


def test_explain_decodes_the_query_embedding(runner, docs, tmp_path, tiny_checkpoint):
    idx = str(tmp_path / "idx")
    assert runner.invoke(app, ["index", str(docs), "--index", idx, "-m", str(tiny_checkpoint),
                               "--device", "cpu"]).exit_code == 0
    result = runner.invoke(app, ["query", "why is the sky blue", "--index", idx, "--explain", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    assert "the query embedding decodes to" in result.stdout and "rank" in result.stdout
    result = runner.invoke(app, ["query", "why", "--index", idx, "--explain", "--json", "--device", "cpu"])
    assert result.exit_code == 0 and len(json.loads(result.stdout)) == 3
    assert "decodes to" in result.stderr


def test_bad_input_is_one_line_and_exit_1(runner, docs, tmp_path, minilm, monkeypatch):
    idx = tmp_path / "idx"
    msg = _one_error_line(runner.invoke(app, ["index", str(tmp_path / "nope"), "--index", str(idx), "-m", "minilm"]))
    assert "nope: no such file or directory" in msg
    (tmp_path / "empty").mkdir()
    msg = _one_error_line(runner.invoke(app, ["index", str(tmp_path / "empty"), "--index", str(idx), "-m", "minilm"]))
    assert "no files found" in msg
    (tmp_path / "bins").mkdir()
    (tmp_path / "bins" / "x.exe").write_bytes(b"MZ")
    msg = _one_error_line(runner.invoke(app, ["index", str(tmp_path / "bins"), "--index", str(idx), "-m", "minilm"]))
    assert "none of the 1 files is a supported type" in msg
    msg = _one_error_line(runner.invoke(app, ["query", "x", "--index", str(tmp_path / "none")]))
    assert "no ragen index here" in msg
    msg = _one_error_line(runner.invoke(app, ["info", "--index", str(tmp_path / "none")]))
    assert "no ragen index here" in msg
    msg = _one_error_line(runner.invoke(app, ["index", str(docs), "--index", str(idx), "-m", "minilm",
                                              "--chunk-overlap", "900"]))
    assert "chunk overlap" in msg
    msg = _one_error_line(runner.invoke(app, ["index", str(docs), "--index", str(idx), "-m", "minilm",
                                              "--index-type", "annoy"]))
    assert "unknown index type 'annoy'" in msg

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = _one_error_line(runner.invoke(app, ["index", str(docs), "--index", str(idx), "-m", "no-such-org/no-such-model"]))
    assert "no-such-org/no-such-model" in msg and "local" in msg

    assert runner.invoke(app, ["index", str(docs), "--index", str(idx), "-m", "minilm"]).exit_code == 0
    # an index built with MiniLM cannot be queried or extended with another encoder
    msg = _one_error_line(runner.invoke(app, ["query", "x", "--index", str(idx), "-m", "mean:" + str(_tiny_backbone(tmp_path))]))
    assert "built with encoder minilm" in msg
    (idx / "seg-1-base.faiss").write_bytes(b"garbage")
    msg = _one_error_line(runner.invoke(app, ["query", "x", "--index", str(idx)]))
    assert "seg-1-base.faiss: is 7 bytes, but" in msg and "--rebuild" in msg  # the recorded size tells


def _tiny_backbone(tmp_path: Path) -> Path:
    from ragen.testing import make_backbone

    return make_backbone(tmp_path / "bb", hidden_size=32, num_layers=1)


def test_ragen_model_env_is_the_index_default(runner, docs, tmp_path, minilm, monkeypatch):
    monkeypatch.setenv("RAGEN_MODEL", "minilm")
    result = runner.invoke(app, ["index", str(docs), "--index", str(tmp_path / "idx")])
    assert result.exit_code == 0, result.stderr
    assert json.loads(runner.invoke(app, ["info", "--index", str(tmp_path / "idx"), "--json"]).stdout)["encoder"]["spec"] == "minilm"


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RAGEN_MODEL", None)
    return env


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ragen", *args], capture_output=True, text=True, env=_env(),
                          timeout=240, **kw)


def _count_vectors(db: Path) -> int:
    from ragen.testing import count_rows

    return count_rows(db, "vectors")


@pytest.mark.slow
def test_kill_9_mid_index_keeps_old_index_and_resume_embeds_the_rest(tmp_path, tiny_checkpoint, tiny_model):
    from ragen.retriever import Retriever, build_index
    from ragen.store import read_manifest

    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in DOCS.items():
        (docs / name).write_text(text)
    idx = tmp_path / "idx"
    build_index(docs, idx, encoder=tiny_model)  # same checkpoint, same fingerprint as the CLI runs load
    with Retriever.open(idx, encoder=tiny_model) as r:
        before = [h.chunk_id for h in r.search("sunlight and sugar", k=3)]

    for i in range(300):  # 300 one-chunk files, embedded 2 per batch: slow enough to kill half way
        (docs / f"extra{i:03d}.txt").write_text(f"Extra file {i} about topic {i}. " * 4)
    proc = subprocess.Popen([sys.executable, "-m", "ragen", "index", str(docs), "--index", str(idx), "-m",
                             str(tiny_checkpoint), "--device", "cpu", "--batch-size", "2"],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    committed = 0
    while time.time() < deadline and proc.poll() is None:
        committed = _count_vectors(idx / "chunks.sqlite")
        if committed >= 3 + 20:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed; make the corpus bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    # the previous index still loads and answers the same
    with Retriever.open(idx, encoder=tiny_model) as r:
        assert r.store.count == 3
        assert [h.chunk_id for h in r.search("sunlight and sugar", k=3)] == before
    assert read_manifest(idx)["counts"]["chunks"] == 3
    kept = _count_vectors(idx / "chunks.sqlite")
    assert kept >= 23

    # resume through the CLI (the dead process's lock went with it); only the rest is embedded
    resumed = _cli("index", str(docs), "--index", str(idx), "--device", "cpu")
    assert resumed.returncode == 0, resumed.stderr
    assert f"303 in index ({300 - (kept - 3)} embedded now" in " ".join(resumed.stdout.split())
    with Retriever.open(idx, encoder=tiny_model) as r:
        assert r.store.count == 303 and r.store.manifest["counts"]["files"] == 303
        text = (docs / "extra007.txt").read_text().strip()
        top = r.search_vector(tiny_model.encode_documents([text], normalize=True)[0], k=1)[0]
        assert top.path == "extra007.txt" and top.score > 0.999


@pytest.mark.slow
def test_two_writers_get_a_clear_lock_message(tmp_path, docs):
    from ragen.store import EncoderInfo, StoreWriter

    idx = tmp_path / "idx"
    with StoreWriter(idx, encoder=EncoderInfo("minilm", "x", 384), chunking={}):
        result = _cli("index", str(docs), "--index", str(idx), "-m", "minilm", "--device", "cpu")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"is being written by another process (pid {os.getpid()})" in result.stderr


def test_base_model_override_is_recorded_for_queries(tmp_path, runner):
    """Offline users keep backbones locally: --base-model at index time is remembered for queries."""
    import shutil

    from .conftest import FIXTURE

    ckpt = tmp_path / "ckpt"
    shutil.copytree(FIXTURE / "checkpoint", ckpt)  # its run_config names a relative 'base' that is not beside it
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("the quick brown fox jumps over the lazy dog")
    (docs / "b.txt").write_text("paris is the capital of france")
    idx = tmp_path / "idx"
    res = runner.invoke(app, ["index", str(docs), "--index", str(idx), "--model", str(ckpt)])
    assert res.exit_code == 1 and "base_model" in res.stderr  # the backbone cannot be found without help
    res = runner.invoke(app, ["index", str(docs), "--index", str(idx), "--model", str(ckpt),
                              "--base-model", str(FIXTURE / "base")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["query", "capital of france", "--index", str(idx), "--json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)) == 2
    res = runner.invoke(app, ["index", str(docs), "--index", str(idx)])  # re-run: recorded model and backbone
    assert res.exit_code == 0, res.output


def test_empty_or_unsupported_folder_fails_before_loading_a_model(tmp_path, runner, monkeypatch):
    import ragen.cli.index as cli_index

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a folder with nothing to index")

    monkeypatch.setattr(cli_index, "_load", no_model)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bins").mkdir()
    (tmp_path / "bins" / "x.bin").write_bytes(b"\x00\x01")
    for folder, message in (("empty", "no files found"), ("bins", "none of the 1 files is a supported type")):
        res = runner.invoke(app, ["index", str(tmp_path / folder), "--index", str(tmp_path / "idx")])
        assert res.exit_code == 1 and message in res.stderr, res.output
