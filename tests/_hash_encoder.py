"""A model-free encoder for CLI and indexing tests."""

from __future__ import annotations

import hashlib

import numpy as np


class HashEncoder:
    """A deterministic bag-of-words encoder: no model, milliseconds per call."""

    spec = "hash-test"
    fingerprint = "hash-test-v1"
    dim = 32

    def __init__(self) -> None:
        self.calls = 0

    def _vec(self, text: str) -> np.ndarray:
        v = np.zeros(self.dim, dtype=np.float32)
        for word in text.lower().split():
            v[int(hashlib.md5(word.encode("utf-8", "replace")).hexdigest(), 16) % self.dim] += 1.0
        v[0] += 1e-3
        return v / np.linalg.norm(v)

    def encode_documents(self, texts, batch_size=32, normalize=True):
        self.calls += 1
        return np.stack([self._vec(t) for t in texts])

    def encode_queries(self, texts, batch_size=32, normalize=True):
        return np.stack([self._vec(t) for t in texts])
