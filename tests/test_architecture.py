"""The dependency rule of DEVELOPERS.md, checked on the import graph of ragen/ (static, via ast)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "ragen"

# area -> areas it must never import
FORBIDDEN = {
    "types": {"ingest", "encoders", "corpus", "store", "retriever", "bench", "integrations", "cli", "training"},
    "errors": {"ingest", "encoders", "corpus", "store", "retriever", "bench", "integrations", "cli", "training"},
    "_io": {"ingest", "types", "encoders", "corpus", "store", "retriever", "bench", "integrations", "cli",
                "training"},
    "encoders": {"ingest", "store", "corpus", "guard", "retriever", "rag", "bench", "integrations", "cli", "training"},
    "store": {"ingest", "encoders", "guard", "retriever", "rag", "bench", "integrations", "cli", "training"},
    "corpus": {"ingest", "encoders", "store", "guard", "retriever", "rag", "bench", "integrations", "cli", "training"},
    "guard": {"ingest", "encoders", "corpus", "store", "retriever", "rag", "bench", "integrations", "cli", "training"},
    "ingest": {"encoders", "guard", "retriever", "rag", "bench", "integrations", "cli", "training"},
    "retriever": {"rag", "bench", "integrations", "cli", "training"},
    "rag": {"bench", "integrations", "cli", "training"},
    # the launch detection (ragen/parallel.py) sits just above errors: index (cli) and training both import it
    "parallel": {"ingest", "encoders", "corpus", "store", "guard", "retriever", "rag", "bench", "integrations", "cli",
                 "training", "serve"},
    "training": {"ingest", "store", "corpus", "guard", "retriever", "rag", "bench", "integrations", "cli"},
    "bench": {"cli", "integrations", "training"},
    "integrations": {"cli", "bench", "training"},
}


def _area(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "ragen" or len(parts) < 2:
        return None
    return parts[1]


def _imports(path: Path) -> set[str]:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
                found.add(mod)
                if not node.module:
                    found.update(".".join(base + [a.name]) for a in node.names)
            elif node.module:
                found.add(node.module)
    return found


def test_dependency_rule():
    violations = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        area = rel.parts[0].removesuffix(".py")
        for mod in _imports(path):
            target = _area(mod)
            if target and target in FORBIDDEN.get(area, set()):
                violations.append(f"ragen/{rel} imports {mod}")
    assert not violations, "\n".join(violations)


def test_nothing_imports_the_cli():
    offenders = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                 if p.relative_to(ROOT).parts[0] != "cli" and p.name != "__main__.py"
                 and any(_area(m) == "cli" for m in _imports(p))]
    assert not offenders


def test_rich_only_in_cli():
    offenders = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                 if p.relative_to(ROOT).parts[0] != "cli" and any(m == "rich" or m.startswith("rich.") for m in _imports(p))]
    assert not offenders


def test_import_ragen_is_light():
    import subprocess
    import sys

    code = ("import sys, ragen; heavy = [m for m in ('torch', 'transformers', 'faiss', 'llama_index', "
            "'langchain_core', 'sentence_transformers') if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT.parent)
    assert out.stdout.strip() == ""
