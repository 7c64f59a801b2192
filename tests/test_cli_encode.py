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


def test_encode_file_that_is_not_utf8_is_one_line(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    res = runner.invoke(app, ["encode", "--file", str(f), "--model", "minilm"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "latin1.txt: not valid UTF-8 (byte 3)" in lines[0], res.stderr


def test_lone_surrogates_never_reach_the_tokenizer(tiny_model, tiny_backbone, tiny_checkpoint):
    from ragen import load_encoder

    bad, clean = ["caf\udce9 \ud800x"], ["caf\ufffd \ufffdx"]
    assert np.array_equal(tiny_model.encode(bad), tiny_model.encode(clean))
    assert np.array_equal(tiny_model.encode(["a"], instruction="\udcff: "), tiny_model.encode(["a"], instruction="\ufffd: "))
    assert tiny_model.tokenize(bad) == tiny_model.tokenize(clean)  # training tokenizes JSONL queries directly
    mean = load_encoder(f"mean:{tiny_backbone}", device="cpu")
    assert np.array_equal(mean.encode_queries(bad), mean.encode_queries(clean))
    # An undecodable byte in a command-line argument arrives as a lone surrogate (surrogateescape).
    proc = subprocess.run([sys.executable, "-m", "ragen", "encode", b"caf\xe9", "--model", str(tiny_checkpoint)],
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    row = json.loads(proc.stdout)
    assert np.allclose(row["embedding"], tiny_model.encode_queries(["caf\ufffd"])[0], atol=1e-6)


def test_lone_surrogates_with_sentence_transformers(minilm):
    assert np.array_equal(minilm.encode_queries(["caf\udce9"]), minilm.encode_queries(["caf\ufffd"]))


def test_decode_json_uses_the_shared_instruction_rule(tiny_checkpoint, tiny_model):
    from ragen.encoders import decode_instruction

    assert decode_instruction(tiny_model) == tiny_model.query_instruction
    assert decode_instruction(tiny_model, kind="document") == tiny_model.document_instruction
    assert decode_instruction(tiny_model, "") == "" and decode_instruction(tiny_model, "Q: ") == "Q: "

    class NoInstructions:
        pass

    assert decode_instruction(NoInstructions()) == ""
    texts = ["why is the sky blue?", "fox"]
    res = runner.invoke(app, ["decode", *texts, "--model", str(tiny_checkpoint), "--max-new-tokens", "6", "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    assert [r["text"] for r in rows] == texts
    assert all(r["instruction"] == tiny_model.query_instruction for r in rows)
    assert [r["decoded"] for r in rows] == tiny_model.decode(texts, instruction=tiny_model.query_instruction,
                                                             max_new_tokens=6)
    res = runner.invoke(app, ["decode", texts[0], "--model", str(tiny_checkpoint), "--max-new-tokens", "6", "--json",
                              "--instruction", ""])
    row = json.loads(res.stdout)
    assert row["instruction"] == "" and row["decoded"] == tiny_model.decode(texts[:1], max_new_tokens=6)[0]


def test_encode_refuses_to_print_nan(monkeypatch):
    import ragen.encoders as encoders

    class NaNEncoder:
        dim, fingerprint, spec = 2, "x", "nan"

        def encode_queries(self, texts, *, batch_size=32, normalize=False):
            return np.array([[0.5, 0.5], [float("nan"), 1.0]], dtype=np.float32)[: len(texts)]

        encode_documents = encode_queries

    monkeypatch.setattr(encoders, "load_encoder", lambda *a, **k: NaNEncoder())
    res = runner.invoke(app, ["encode", "fine", "broken", "--model", "whatever"])
    assert res.exit_code == 1 and res.stdout == ""
    assert "NaN/inf for 1 of 2 text(s) (first: text 2)" in res.stderr
