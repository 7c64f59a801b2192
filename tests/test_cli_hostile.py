"""The CLI against hostile text and as tools people know behave (issues 14 and 15): escaped rich markup,
stripped terminal escapes, one-line usage errors, SIGTERM, --version/-h, recorded build settings, no model
load on an unchanged re-run, --list-skipped, info's largest sources, plain progress off a terminal."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ragen.cli import app

from ._hash_encoder import HashEncoder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def runner(monkeypatch):
    monkeypatch.delenv("RAGEN_MODEL", raising=False)
    monkeypatch.setenv("RAGEN_PROGRESS_INTERVAL", "0")
    return CliRunner()


@pytest.fixture()
def loads(monkeypatch):
    """Replace model loading with the hash encoder; the list records every spec loaded."""
    import ragen.cli.index as cli_index

    seen: list[str] = []

    def load(spec, device, base_model=None, **options):
        seen.append(spec)
        enc = HashEncoder()
        enc.spec = spec
        enc.fingerprint = f"hash-{spec}"
        return enc

    monkeypatch.setattr(cli_index, "_load", load)
    return seen


@pytest.fixture()
def docs(tmp_path) -> Path:
    d = tmp_path / "docs"
    d.mkdir()
    (d / "plants.txt").write_text("Photosynthesis lets green plants turn sunlight into sugar.")
    (d / "orbit.md").write_text("# Orbits\n\nA satellite falls around the Earth as fast as it drops.")
    (d / "llama.md").write_text("The prompt format wraps text in [INST] and [/INST] tags. [bold]not bold[/]")
    (d / "evil.txt").write_text("x \x1b]0;PWNED\x07 title \x1b[31mred\x1b[0m \x9b2J done")
    return d


def _index(runner, docs, idx, *extra):
    return runner.invoke(app, ["index", str(docs), "--index", str(idx), "--model", "m1", *extra])


def _one_error_line(result, code=1) -> str:
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------- markup, escapes
def test_markup_in_queries_paths_and_chunks_is_printed_literally(runner, docs, tmp_path, loads):
    idx = tmp_path / "idx [/] [bold]x"
    res = _index(runner, docs, idx)
    assert res.exit_code == 0, res.output
    assert "[/]" in res.stdout  # the index path, literally
    res = runner.invoke(app, ["query", "what does [/] mean", "--index", str(idx), "-k", "4"])
    assert res.exit_code == 0, res.output
    assert "what does [/] mean" in res.stdout and "[/INST]" in res.stdout and "[bold]not bold[/]" in res.stdout
    assert "chunk" in res.stdout.splitlines()[1] + res.stdout.splitlines()[2]  # the column holds chunk ids


def test_terminal_escapes_never_reach_the_terminal(runner, docs, tmp_path, loads):
    os.symlink(docs / "plants.txt", docs / "name\x1b]0;PWNED\x07.txt")
    idx = tmp_path / "idx"
    assert _index(runner, docs, idx, "--list-skipped").exit_code == 0
    res = runner.invoke(app, ["query", "title red done \x1b[2J", "--index", str(idx), "-k", "5"])
    assert res.exit_code == 0, res.output
    assert "title" in res.stdout and "red" in res.stdout and "done" in res.stdout
    for bad in ("\x1b", "\x07", "\x9b", "PWNED\x07"):
        assert bad not in res.output
    info = runner.invoke(app, ["info", "--index", str(idx)])
    assert info.exit_code == 0 and "\x1b" not in info.output and "\x07" not in info.output


def test_error_messages_with_markup_and_escapes_are_one_clean_line(runner, tmp_path, loads):
    res = runner.invoke(app, ["index", str(tmp_path / "[/]no\x1b[2Jpe"), "--index", str(tmp_path / "i")])
    line = _one_error_line(res)
    assert "[/]no" in line and "\x1b" not in line and "no such file" in line
    res = runner.invoke(app, ["query", "x", "--index", str(tmp_path / "[red]missing")])
    assert "[red]missing" in _one_error_line(res)


def test_query_with_lone_surrogates_is_handled(runner, docs, tmp_path, loads):
    idx = tmp_path / "idx"
    assert _index(runner, docs, idx).exit_code == 0
    res = runner.invoke(app, ["query", "caf\udce9 plants \ud83d", "--index", str(idx), "--json"])
    assert res.exit_code == 0, res.output
    assert "not valid UTF-8" in res.stderr and json.loads(res.stdout)


# ---------------------------------------------------------------------------------------------- conventions
def test_usage_errors_are_one_error_line(runner):
    for args in (["index"], ["index", "x", "--bogus"], ["query", "q", "-k", "zero"], ["nonsense"]):
        line = _one_error_line(runner.invoke(app, args), code=2)
        assert "╭" not in line


def test_version_short_help_and_no_bool_metavars(runner):
    from ragen import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"ragen {__version__}"
    res = runner.invoke(app, ["index", "-h"])
    assert res.exit_code == 0 and "--include" in res.stdout and "--list-skipped" in res.stdout
    assert "<bool>" not in res.stdout and "╭" not in res.stdout
    assert "<bool>" not in runner.invoke(app, ["query", "--help"]).stdout


def test_sigterm_says_interrupted_like_sigint(tmp_path):
    code = ("import time\nfrom ragen.cli import app\nfrom ragen.cli._common import run_command\n"
            "@app.command()\ndef sleepy():\n    print('ready', flush=True)\n    run_command(lambda: time.sleep(60))\n"
            "app(['sleepy'])\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for sig, rc in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
        assert "interrupted" in stderr and "Traceback" not in stderr
        assert proc.returncode == rc
        if sig == signal.SIGTERM:
            assert "SIGTERM" in stderr


# ---------------------------------------------------------------------------------------------- settings
def _manifest(runner, idx) -> dict:
    res = runner.invoke(app, ["info", "--index", str(idx), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_a_plain_rerun_reuses_recorded_settings_and_skips_the_model(runner, docs, tmp_path, loads):
    idx = tmp_path / "idx"
    res = _index(runner, docs, idx, "--chunk-size", "300", "--chunk-overlap", "50", "--exclude", "evil.txt",
                 "--max-file-size", "1MB")
    assert res.exit_code == 0, res.output
    assert loads == ["m1"]
    res = runner.invoke(app, ["index", str(docs), "--index", str(idx)])
    assert res.exit_code == 0, res.output
    assert loads == ["m1"]  # unchanged: finished without loading the model
    assert "up to date, model not loaded" in res.stdout and "3 indexed" in res.stdout
    chunking = _manifest(runner, idx)["chunking"]
    assert (chunking["chunk_size"], chunking["chunk_overlap"]) == (300, 50)
    assert chunking["files"] == {"include": [], "exclude": ["evil.txt"], "gitignore": True, "max_file_size": 1024 ** 2}

    (docs / "new.txt").write_text("a new file about bread and yeast")
    res = runner.invoke(app, ["index", str(docs), "--index", str(idx)])  # changed: the recorded model loads
    assert res.exit_code == 0 and loads == ["m1", "m1"] and "4 indexed" in res.stdout
    assert "rebuilding" not in res.stderr
    assert _manifest(runner, idx)["chunking"]["chunk_size"] == 300

    res = runner.invoke(app, ["index", str(docs), "--index", str(idx), "--chunk-size", "400"])
    assert res.exit_code == 0, res.output
    assert "rebuilding" in res.stderr and "chunk size 300 -> 400" in res.stderr
    assert _manifest(runner, idx)["chunking"]["chunk_size"] == 400

    res = runner.invoke(app, ["index", str(docs), "--index", str(idx), "--model", "m2"])
    assert res.exit_code == 0, res.output
    assert "model m1 -> m2" in res.stderr and _manifest(runner, idx)["encoder"]["spec"] == "m2"
    res = runner.invoke(app, ["index", str(docs), "--index", str(idx), "--exclude", ""])  # '' clears patterns
    assert res.exit_code == 0 and "5 indexed" in res.stdout
    assert _manifest(runner, idx)["chunking"]["files"]["exclude"] == []


def test_rerun_after_interrupting_a_first_run_needs_no_model_flag(runner, docs, tmp_path, monkeypatch):
    import ragen.cli.index as cli_index

    for i in range(6):
        (docs / f"extra{i}.txt").write_text(f"extra document number {i} about topic {i}")
    seen = []

    class Interrupting(HashEncoder):
        def encode_documents(self, texts, batch_size=32, normalize=True):
            if self.calls == 1:  # the second batch: Ctrl-C
                raise KeyboardInterrupt
            return super().encode_documents(texts, batch_size, normalize)

    def load(spec, device, base_model=None, **options):
        seen.append(spec)
        enc = Interrupting() if len(seen) == 1 else HashEncoder()
        enc.spec, enc.fingerprint = spec, f"hash-{spec}"
        return enc

    monkeypatch.setattr(cli_index, "_load", load)
    idx = tmp_path / "idx"
    res = runner.invoke(app, ["index", str(docs), "--index", str(idx), "--model", "mine", "--batch-size", "2"])
    assert res.exit_code == 130 and "interrupted" in res.stderr, res.output
    res = runner.invoke(app, ["index", str(docs), "--index", str(idx), "--batch-size", "2"])
    assert res.exit_code == 0, res.output
    assert seen == ["mine", "mine"] and _manifest(runner, idx)["encoder"]["spec"] == "mine"


def test_list_skipped_names_every_file_and_folder(runner, docs, tmp_path, loads):
    (docs / "image.bin").write_bytes(b"\x00\x01")
    (docs / "blob.txt").write_bytes(b"abc\x00\x01")
    (docs / ".hidden").mkdir()
    os.mkfifo(docs / "pipe.txt")
    idx = tmp_path / "idx"
    res = _index(runner, docs, idx)
    assert res.exit_code == 0, res.output
    assert "skipped 1 file: unsupported type" in res.stderr and "image.bin" not in res.stderr
    assert "skipped 1 folder: hidden folder (not entered)" in res.stderr
    res = runner.invoke(app, ["index", str(docs), "--index", str(idx), "--list-skipped", "--rebuild"])
    assert res.exit_code == 0, res.output
    for line in ("skipped file image.bin: unsupported type", "skipped file blob.txt: binary content",
                 "skipped file pipe.txt: not a regular file", "skipped folder .hidden/: hidden folder"):
        assert line in res.stderr, res.stderr


def test_info_shows_largest_sources(runner, docs, tmp_path, loads):
    (docs / "big.md").write_text("\n\n".join(f"paragraph {i} " + "words " * 60 for i in range(30)))
    idx = tmp_path / "idx"
    assert _index(runner, docs, idx).exit_code == 0
    res = runner.invoke(app, ["info", "--index", str(idx)])
    assert res.exit_code == 0 and "largest sources" in res.stdout and "big.md:" in res.stdout
    largest = _manifest(runner, idx)["largest_sources"]
    assert largest[0]["path"] == "big.md" and largest[0]["chunks"] > 1 and 0.5 < largest[0]["share_of_chunks"] <= 1


def test_ivf_falling_back_to_flat_is_announced(runner, docs, tmp_path, loads):
    res = _index(runner, docs, tmp_path / "idx", "--index-type", "ivf")
    assert res.exit_code == 0, res.output
    assert "--index-type ivf needs more vectors" in res.stderr and "built flat" in res.stderr


def test_index_folder_equal_to_the_corpus_is_refused(runner, docs, loads):
    line = _one_error_line(runner.invoke(app, ["index", str(docs), "--index", str(docs)]))
    assert "is the folder being indexed" in line and loads == []


def test_plain_progress_lines_off_a_terminal(runner, docs, tmp_path, loads):
    res = _index(runner, docs, tmp_path / "idx")
    assert res.exit_code == 0
    assert "files 4/4 (100%)" in res.stderr and "chunks " in res.stderr and "━" not in res.stderr


# ---------------------------------------------------------------------------------------------- fuzz
def test_fuzz_random_names_contents_and_queries(runner, tmp_path, loads):
    rng = random.Random(15)
    root = tmp_path / "fuzz"
    root.mkdir()
    raw_root = os.fsencode(root)
    for i in range(40):
        name = bytes(rng.choice([b for b in range(1, 256) if b not in (0x2F,)]) for _ in range(rng.randint(1, 12)))
        if name in (b".", b".."):
            continue
        ext = rng.choice([b".txt", b".md", b".json", b".jsonl", b".html", b".pdf", b""])
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 400)))
        if rng.random() < 0.5:
            data = data.replace(b"\x00", b"")
        with open(os.path.join(raw_root, name + ext), "wb") as f:
            f.write(data)
    (root / "anchor.txt").write_text("an anchor document that always exists")
    idx = tmp_path / "idx"
    res = _index(runner, root, idx, "--list-skipped")
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    before = _manifest(runner, idx)["counts"]
    res = runner.invoke(app, ["index", str(root), "--index", str(idx)])
    assert res.exit_code == 0 and "up to date" in res.stdout, res.output
    alphabet = [chr(c) for c in range(0, 0x250)] + ["\udce9", "\ud83d", "[/]", "[bold]", "\x1b[2J", "\u202e"]
    for _ in range(25):
        q = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        res = runner.invoke(app, ["query", q, "--index", str(idx), "-k", "3"])
        assert "Traceback" not in res.output and "\x1b" not in res.output
        if res.exit_code != 0:
            _one_error_line(res)
    assert _manifest(runner, idx)["counts"] == before  # the index is intact


# ---------------------------------------------------------------------------------------------- imports
@pytest.mark.parametrize("args", [["--help"], ["--version"], ["info", "--index", "{idx}"], ["info", "-h"]])
def test_model_free_commands_import_neither_torch_nor_transformers(tmp_path, args):
    from ragen.retriever import build_index

    idx = tmp_path / "idx"
    if "{idx}" in args:
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "a.txt").write_text("alpha beta")
        build_index(tmp_path / "d", idx, encoder=HashEncoder())
    argv = [a.replace("{idx}", str(idx)) for a in args]
    code = ("import sys\nfrom ragen.cli import app\ncode = app(%r, standalone_mode=False)\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules)\n"
            "print('HEAVY', heavy, code)\n") % (argv,)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert "HEAVY [] " in res.stdout, (res.stdout, res.stderr)


# ---------------------------------------------------------------------------------------------- progress helper
def test_progress_helper_prints_plain_periodic_lines_off_a_terminal(monkeypatch):
    import io

    from rich.console import Console

    from ragen.cli import _progress

    clock = [100.0]
    monkeypatch.setattr(_progress.time, "monotonic", lambda: clock[0])
    buf = io.StringIO()
    console = Console(file=buf, width=200)
    assert not console.is_terminal
    with _progress.progress_display(console, interval=10) as p:
        task = p.add("chunks", 1000, unit="vec")
        resumed = p.add("train", 100, completed=50)
        for done in range(100, 1001, 100):
            clock[0] += 3  # 100 vectors every 3 s
            p.update(task, done)
        clock[0] += 10
        p.update(resumed, 60, detail="loss 0.5\x1b[2J [bold]")
    lines = buf.getvalue().splitlines()
    assert lines[0] == "chunks 100/1,000 (10%) 33.3 vec/s ETA 27s"  # the first report, then one per 10 s
    assert "chunks 500/1,000 (50%) 33.3 vec/s ETA 15s" in lines
    assert lines[-2] == "chunks 1,000/1,000 (100%) 33.3 vec/s done in 30s"  # a finished step always reports
    assert lines[-1] == "train 60/100 (60%) 0.2/s ETA 2m40s loss 0.5 [bold]"  # rate from resumed work only
    assert len(lines) < 10
    quiet = io.StringIO()
    with _progress.progress_display(Console(file=quiet), enabled=False) as p:
        p.update(p.add("x", 2), 2)
    assert quiet.getvalue() == ""


def test_library_warnings_are_hidden_unless_verbose():
    code = ("import warnings\nfrom ragen.cli import app\nfrom ragen.cli._common import run_command\n"
            "@app.command()\ndef noisy():\n"
            "    run_command(lambda: warnings.warn('numba: the reflected list is deprecated', FutureWarning))\n"
            "import sys\napp(sys.argv[1:])\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("RAGEN_VERBOSE", None)
    quiet = subprocess.run([sys.executable, "-c", code, "noisy"], capture_output=True, text=True, env=env, timeout=60)
    assert quiet.returncode == 0 and "deprecated" not in quiet.stderr, quiet.stderr
    loud = subprocess.run([sys.executable, "-c", code, "--verbose", "noisy"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert loud.returncode == 0 and "FutureWarning: numba: the reflected list is deprecated" in loud.stderr


def test_json_output_and_log_lines_are_terminal_safe(runner, tmp_path, loads):
    import logging

    from ragen.cli._common import _CleanFormatter, clean, json_line

    d = tmp_path / "d"
    d.mkdir()
    (d / "c1.txt").write_text("csi \x9b2J and bidi \u202eevil\u202c and esc \x1b[31m red")
    assert _index(runner, d, tmp_path / "idx").exit_code == 0
    res = runner.invoke(app, ["query", "csi bidi red", "--index", str(tmp_path / "idx"), "--json"])
    assert res.exit_code == 0, res.output
    for raw in ("\x9b", "\u202e", "\x1b"):
        assert raw not in res.stdout
    assert json.loads(res.stdout)[0]["text"] == "csi \x9b2J and bidi \u202eevil\u202c and esc \x1b[31m red"  # data intact
    assert json.loads(json_line({"t": "\u2028\x85"})) == {"t": "\u2028\x85"}

    record = logging.LogRecord("ragen.corpus", logging.WARNING, __file__, 1, "%s: skipped %d line(s)",
                               ("bad\x1b]0;PWNED\x07.jsonl", 2), None)
    line = _CleanFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert line == "WARNING ragen.corpus: bad.jsonl: skipped 2 line(s)"
    assert clean("a\x1b[2Jb\x07c\x9b1mD\u202eE\udce9") == "abcDE\\xe9"


def test_nothing_selected_says_why_before_loading_a_model(runner, docs, tmp_path, loads):
    line = _one_error_line(runner.invoke(app, ["index", str(docs), "--index", str(tmp_path / "i"), "--include", "*.xyz"]))
    assert "none of the 4 files is selected (4 does not match --include)" in line and loads == []


def test_a_hand_edited_build_record_never_gives_a_traceback(runner, docs, tmp_path, loads):
    import sqlite3

    idx = tmp_path / "idx"
    assert _index(runner, docs, idx).exit_code == 0
    con = sqlite3.connect(idx / "chunks.sqlite")
    manifest = json.loads(con.execute("SELECT value FROM meta WHERE key='manifest'").fetchone()[0])
    manifest["chunking"] = {"chunk_size": "big", "chunk_overlap": None, "files": {"include": [1, "["], "gitignore": 3}}
    manifest["index"] = ["not", "an", "object"]
    con.execute("UPDATE meta SET value=? WHERE key='manifest'", (json.dumps(manifest),))
    con.commit()
    con.close()
    res = runner.invoke(app, ["index", str(docs), "--index", str(idx)])
    assert "Traceback" not in res.output and not isinstance(res.exception, (TypeError, AttributeError, ValueError))
    if res.exit_code:
        _one_error_line(res)


def test_fuzz_option_values_give_one_line_or_success(runner, docs, tmp_path, loads):
    rng = random.Random(14)
    idx = tmp_path / "idx"
    assert _index(runner, docs, idx).exit_code == 0
    before = _manifest(runner, idx)["counts"]
    alphabet = [chr(c) for c in range(0x20, 0x180)] + ["\udce9", "[/]", "\x1b[2J", "**", "!", "\\"]
    for i in range(30):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        option = rng.choice(["--max-file-size", "--include", "--exclude", "--chunk-size", "--index-type"])
        res = runner.invoke(app, ["index", str(docs), "--index", str(idx), option, value])
        assert "Traceback" not in res.output and "\x1b" not in res.output, (option, value, res.output)
        assert res.exception is None or isinstance(res.exception, SystemExit), (option, value, repr(res.exception))
        if res.exit_code:
            _one_error_line(res, code=res.exit_code)
    assert runner.invoke(app, ["query", "plants", "--index", str(idx)]).exit_code == 0
    assert _manifest(runner, idx)["counts"]["chunks"] >= 1 and before["chunks"] >= 1
