"""Every install of ragen-toolkit resolves to exactly one faiss distribution (two overwrite each other's
`faiss` module), and the store refuses an environment where two are installed, with the fix."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ragen.errors import StoreError
from ragen.store import faiss_index

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

# Distributions that install the top-level `faiss` package (PyPI names as of faiss 1.15).
FAISS_DISTRIBUTIONS = {"faiss-cpu", "faiss-gpu", "faiss-gpu-cu11", "faiss-gpu-cu12", "faiss-gpu-cuvs", "faiss",
                       "faiss-cpu-noavx2", "faiss-gpu-cu12-cuvs"}


def resolve(project: dict, extras: set[str]) -> set[str]:
    """The canonical names of the direct requirements an install of ``project[extras]`` pulls, following
    self-references such as ``ragen-toolkit[st,serve]`` (markers evaluated for this interpreter)."""
    name = canonicalize_name(project["name"])
    optional = project.get("optional-dependencies", {})
    wanted, seen, pulled = set(extras), set(), set()
    groups = [(None, project.get("dependencies", []))]
    while groups or wanted - seen:
        if not groups:
            extra = sorted(wanted - seen)[0]
            seen.add(extra)
            if extra not in optional:
                raise AssertionError(f"extra {extra!r} is not declared in pyproject.toml")
            groups.append((extra, optional[extra]))
        extra, reqs = groups.pop()
        for text in reqs:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": extra or ""}):
                continue
            if canonicalize_name(req.name) == name:
                wanted |= set(req.extras)
            else:
                pulled.add(canonicalize_name(req.name))
    return pulled


def faiss_of(project: dict, extras: set[str]) -> set[str]:
    return resolve(project, extras) & FAISS_DISTRIBUTIONS


def test_every_extra_resolves_to_exactly_one_faiss():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extras = sorted(project["optional-dependencies"])
    assert "gpu" in extras  # `pip install "ragen-toolkit[gpu]"` keeps working
    combos = [set()] + [{e} for e in extras] + [set(extras)]
    for combo in combos:
        found = faiss_of(project, combo)
        assert len(found) == 1, f"ragen-toolkit[{','.join(sorted(combo))}] installs {sorted(found) or 'no faiss'}"


def test_resolution_catches_the_old_gpu_extra():
    """The layout before the fix (faiss-cpu in the core, faiss-gpu-cu12 in `gpu`) is caught, and so is an
    extra reaching faiss-gpu through a self-reference."""
    old = {"name": "ragen-toolkit", "dependencies": ["numpy", "faiss-cpu>=1.8"],
           "optional-dependencies": {"gpu": ["faiss-gpu-cu12>=1.8"], "all": ["ragen-toolkit[gpu]"]}}
    assert faiss_of(old, set()) == {"faiss-cpu"}
    assert faiss_of(old, {"gpu"}) == {"faiss-cpu", "faiss-gpu-cu12"}
    assert faiss_of(old, {"all"}) == {"faiss-cpu", "faiss-gpu-cu12"}


class _Dist:
    def __init__(self, name, version, files):
        self.metadata = {"Name": name}
        self.version = version
        self.files = files

    def read_text(self, name):
        return None


def test_two_installed_faiss_distributions_are_refused_with_the_fix(monkeypatch, tmp_path):
    from importlib import metadata

    dists = [_Dist("faiss-cpu", "1.15.1", ["faiss/__init__.py"]), _Dist("faiss_gpu_cu12", "1.9.0",
                                                                         ["faiss/_swigfaiss.so"]),
             _Dist("faiss-tools", "0.1", ["faiss_tools/__init__.py"]), _Dist("numpy", "2.0", ["numpy/x.py"])]
    monkeypatch.setattr(metadata, "distributions", lambda: iter(dists))
    faiss_index.check_faiss.cache_clear()
    try:
        assert faiss_index.faiss_distributions() == [("faiss-cpu", "1.15.1"), ("faiss-gpu-cu12", "1.9.0")]
        with pytest.raises(StoreError, match=r"2 faiss distributions are installed \(faiss-cpu 1.15.1, "
                                             r"faiss-gpu-cu12 1.9.0\).*pip uninstall -y faiss-gpu-cu12"):
            faiss_index.check_faiss()
        from ragen.store import Store, StoreWriter, EncoderInfo

        with pytest.raises(StoreError, match="faiss distributions"):
            StoreWriter(tmp_path / "idx", encoder=EncoderInfo(spec="x", fingerprint="f", dim=4), chunking={})
        assert not (tmp_path / "idx").exists()
        with pytest.raises(StoreError):
            Store.open(tmp_path / "idx")
    finally:
        monkeypatch.undo()
        faiss_index.check_faiss.cache_clear()
    assert len(faiss_index.faiss_distributions()) == 1  # this environment: exactly one
    faiss_index.check_faiss()
