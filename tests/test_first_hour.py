"""The README's main-job command, run as a new user runs it: in a fresh clone, against the Hugging Face hub
code path. The hub is simulated by a local cache (HF_HOME) that holds the tiny reference-format fixture under
the default model's hub id and its backbone under the backbone's hub id; HF_HUB_OFFLINE=1 makes the hub
client resolve both from that cache, exactly as it does for a user who downloaded them once."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "llm2vec-gen-tiny"
DEFAULT_MODEL = "McGill-NLP/LLM2Vec-Gen-Qwen3-06B"
DEFAULT_BACKBONE = "Qwen/Qwen3-0.6B"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(hub: Path, repo_id: str, files_from: Path, edit=None) -> None:
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    shutil.copytree(files_from, snap)
    if edit:
        edit(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)


def _point_at_backbone(snap: Path) -> None:
    cfg = snap / "run_config.yml"
    text = cfg.read_text()
    assert "model_name_or_path: base" in text
    cfg.write_text(text.replace("model_name_or_path: base", f"model_name_or_path: {DEFAULT_BACKBONE}"))


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("hf-home")
    hub = home / "hub"
    _cache_repo(hub, DEFAULT_MODEL, FIXTURE / "checkpoint", edit=_point_at_backbone)
    _cache_repo(hub, DEFAULT_BACKBONE, FIXTURE / "base")
    return home


def readme_main_job() -> list[list[str]]:
    """The `ragen ...` commands of the README's install-and-main-job line, as argument lists."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = [ln for ln in readme.splitlines() if "ragen index" in ln and "pip install" in ln]
    assert lines, "the README has no install + main-job command line"
    steps = [s.strip() for s in lines[0].split("&&")]
    commands = [shlex.split(s) for s in steps if s.startswith("ragen ")]
    assert [c[1] for c in commands] == ["index", "query"], commands
    return commands


def _fresh_clone(dest: Path) -> Path:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: cannot make a fresh clone")
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed")
    subprocess.run([git, "clone", "-q", str(ROOT), str(dest)], check=True, capture_output=True)
    return dest


def _env(hub_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAGEN_", "HF_"))}
    env.update(HF_HOME=str(hub_home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", NO_COLOR="1",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


@pytest.mark.slow
def test_readme_main_job_runs_in_a_fresh_clone_through_the_hub_cache(tmp_path, hub_home, monkeypatch):
    clone = _fresh_clone(tmp_path / "clone")
    assert (clone / "docs").is_dir(), "docs/ must be committed: the README's first command indexes it"
    env = _env(hub_home)
    index_cmd, query_cmd = readme_main_job()

    run = subprocess.run([sys.executable, "-m", *index_cmd], cwd=clone, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    manifest = json.loads((clone / "indexes" / "default" / "manifest.json").read_text())
    assert DEFAULT_MODEL in json.dumps(manifest)  # built with the default model, resolved through the hub cache

    # The query runs through the typer app in this process, with the same surroundings (working directory the
    # clone, no RAGEN_* variables, the hub client pointed at the same cache): a second cold `python -m ragen`
    # cost ~7 s of imports and proved nothing the index run above does not.
    from huggingface_hub import constants
    from typer.testing import CliRunner

    from ragen.cli import app

    for name in [k for k in os.environ if k.startswith("RAGEN_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HOME", str(hub_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_home / "hub"))
    monkeypatch.chdir(clone)
    assert query_cmd[0] == "ragen"
    res = CliRunner().invoke(app, [*query_cmd[1:], "--json"])
    assert res.exit_code == 0, res.output
    hits = json.loads(res.stdout)
    assert hits and all(h["path"].endswith(".md") for h in hits)
    docs = {p.name for p in (clone / "docs").glob("*.md")}
    assert {Path(h["path"]).name for h in hits} <= docs


def test_readme_question_is_answered_by_the_shipped_docs():
    """The example question must be one the shipped docs answer: the key phrase of the question appears in
    a docs/ page (a random tiny model cannot rank, so this checks the docs, not the ranking)."""
    (_, query_cmd) = readme_main_job()
    question = query_cmd[2].lower()
    text = " ".join(p.read_text(encoding="utf-8").lower() for p in (ROOT / "docs").glob("*.md"))
    words = [w for w in re.findall(r"[a-z]+", question) if len(w) > 4]
    assert words and all(w in text for w in words), (question, [w for w in words if w not in text])
    assert "keeping an index up to date" in text
