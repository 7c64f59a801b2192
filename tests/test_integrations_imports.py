"""Integrations stay optional: importing ragen imports neither framework; a missing extra names what to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def test_import_ragen_imports_no_framework():
    proc = _run(
        "import sys, ragen, ragen.integrations\n"
        "assert ragen.RagenError and ragen.Hit\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('llama_index', 'langchain_core', 'langchain'))\n"
        "print('LOADED', bad)\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout


LI, LC = 'pip install "ragen-toolkit[llama-index]"', 'pip install "ragen-toolkit[langchain]"'


@pytest.mark.parametrize("module, blocked, extra, attr", [
    ("ragen.integrations.llama_index", "llama_index", LI, "LLM2VecGenEmbedding"),
    ("ragen.integrations.llama_index", "llama_index.vector_stores.faiss", LI,
     "RagenLlamaIndexRetriever"),
    ("ragen.integrations.langchain", "langchain_core", LC, "LLM2VecGenEmbeddings"),
    ("ragen.integrations.langchain", "langchain_core", LC, "RagenLangChainRetriever"),
    ("ragen.integrations.llama_index_llm", "llama_index", LI, "LLM2VecGenLLM"),
    ("ragen.integrations.langchain_chat", "langchain_core", LC, "ChatLLM2VecGen"),
])
def test_missing_extra_names_what_to_install(module, blocked, extra, attr):
    code = (f"import sys\nsys.modules[{blocked!r}] = None\n"
            "import ragen\n"
            "for how in ('direct', 'lazy'):\n"
            "    try:\n"
            f"        __import__({module!r}, fromlist=['x']) if how == 'direct' else getattr(ragen, {attr!r})\n"
            "    except ImportError as exc:\n"
            "        print(how, 'ERR', exc)\n"
            "    else:\n"
            "        print(how, 'NO ERROR')\n")
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert "ERR" in line and extra in line, line


def test_lazy_exports_are_the_integration_classes():
    pytest.importorskip("llama_index.core")
    pytest.importorskip("langchain_core")
    import ragen
    from ragen.integrations import langchain, llama_index

    assert ragen.LLM2VecGenEmbedding is llama_index.LLM2VecGenEmbedding
    assert ragen.RagenLlamaIndexRetriever is llama_index.RagenLlamaIndexRetriever
    assert ragen.LLM2VecGenEmbeddings is langchain.LLM2VecGenEmbeddings
    assert ragen.RagenLangChainRetriever is langchain.RagenLangChainRetriever
    from ragen.integrations import sentence_transformers

    assert ragen.LLM2VecGenSentenceTransformer is sentence_transformers.LLM2VecGenSentenceTransformer
