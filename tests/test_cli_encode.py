"""`ragen encode` / `ragen decode` through typer's runner and a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from typer.testing import CliRunner

from ragen.cli import app

runner = CliRunner()


def test_encode_prints_json_lines_equal_to_the_api(tiny_checkpoint, tiny_model):
    res = runner.invoke(app, ["encode", "why is the sky blue?", "fox", "--model", str(tiny_checkpoint), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    assert [r["text"] for r in rows] == ["why is the sky blue?", "fox"]
    expected = tiny_model.encode_queries(["why is the sky blue?", "fox"])
    assert np.allclose(np.array([r["embedding"] for r in rows]), expected, atol=1e-6)


def test_encode_documents_from_file(tiny_checkpoint, tiny_model, tmp_path):
    f = tmp_path / "texts.txt"
    f.write_text("first line\n\nsecond line\n")
    res = runner.invoke(app, ["encode", "--file", str(f), "--kind", "document", "--normalize",
                              "--model", str(tiny_checkpoint)])
    assert res.exit_code == 0, res.output
    vecs = np.array([json.loads(line)["embedding"] for line in res.stdout.splitlines()])
    assert vecs.shape == (2, tiny_model.dim)
    assert np.allclose(vecs, tiny_model.encode_documents(["first line", "second line"], normalize=True), atol=1e-6)


def test_decode_shows_a_table(tiny_checkpoint, tiny_model):
    res = runner.invoke(app, ["decode", "why is the sky blue?", "--model", str(tiny_checkpoint), "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    assert "decoded embedding" in res.stdout


def test_bad_input_is_one_line_and_nonzero(tmp_path):
    for args in (["encode", "x", "--model", "nope:spec"], ["encode", "--model", "minilm"],
                 ["encode", "x", "--model", str(tmp_path / "missing")], ["encode", "--file", str(tmp_path / "nofile")],
                 ["encode", "x", "--kind", "other", "--model", "minilm"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 1, (args, res.output)
        assert "Traceback" not in res.output
        assert res.stderr.strip().startswith("error:") and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_console_script_runs_as_a_subprocess(tiny_checkpoint):
    proc = subprocess.run([sys.executable, "-m", "ragen", "encode", "hello", "--model", str(tiny_checkpoint)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip())["text"] == "hello"
    proc = subprocess.run([sys.executable, "-m", "ragen", "encode", "hello", "--model", "McGill-NLP/nope-nope"],
                          capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "local directory" in proc.stderr
