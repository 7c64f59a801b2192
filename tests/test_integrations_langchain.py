"""LLM2VecGenEmbeddings against real langchain-core objects."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

pytest.importorskip("langchain_core")

from langchain_core.embeddings import Embeddings  # noqa: E402
from langchain_core.vectorstores import InMemoryVectorStore  # noqa: E402

from ragen.encoders.base import DEFAULT_DOCUMENT_INSTRUCTION, DEFAULT_QUERY_INSTRUCTION  # noqa: E402
from ragen.errors import RagenError  # noqa: E402
from ragen.integrations.langchain import LLM2VecGenEmbeddings  # noqa: E402

TEXTS = [
    "Photosynthesis turns light into sugar in the leaves of plants.",
    "Paris is the capital of France and its largest city.",
    "Rayleigh scattering makes short wavelengths scatter more, so the sky looks blue.",
    "A cache stores recent results so that repeated questions are answered faster.",
]


class Gated:
    """A real encoder whose encode waits for a gate that only a concurrently running coroutine opens."""

    def __init__(self, inner, gate: threading.Event) -> None:
        self.inner, self.gate = inner, gate
        self.query_instruction, self.document_instruction = inner.query_instruction, inner.document_instruction
        self.batches: list[int] = []

    dim = property(lambda self: self.inner.dim)
    spec = property(lambda self: self.inner.spec)
    fingerprint = property(lambda self: self.inner.fingerprint)

    def _go(self, texts, batch_size):
        if not self.gate.wait(timeout=20):
            raise TimeoutError("gate never opened: the event loop was blocked")
        self.batches.append(batch_size)

    def encode_queries(self, texts, *, instruction=None, batch_size=32, max_length=512, normalize=False):
        self._go(texts, batch_size)
        return self.inner.encode_queries(texts, instruction=instruction, batch_size=batch_size,
                                         max_length=max_length, normalize=normalize)

    def encode_documents(self, texts, *, instruction=None, batch_size=32, max_length=512, normalize=False):
        self._go(texts, batch_size)
        return self.inner.encode_documents(texts, instruction=instruction, batch_size=batch_size,
                                           max_length=max_length, normalize=normalize)


def test_vectors_equal_ragen_with_instructions_on_the_right_side(tiny_checkpoint, tiny_model):
    emb = LLM2VecGenEmbeddings(str(tiny_checkpoint), device="cpu", batch_size=2)
    assert isinstance(emb, Embeddings) and emb.dim == tiny_model.dim
    docs = np.asarray(emb.embed_documents(TEXTS), dtype=np.float32)
    np.testing.assert_allclose(docs, tiny_model.encode_documents(TEXTS, normalize=True), atol=1e-5)
    np.testing.assert_allclose(docs, tiny_model.encode(TEXTS, instruction=DEFAULT_DOCUMENT_INSTRUCTION, normalize=True),
                               atol=1e-5)
    q = np.asarray(emb.embed_query("why is the sky blue?"), dtype=np.float32)
    np.testing.assert_allclose(q, tiny_model.encode(["why is the sky blue?"], instruction=DEFAULT_QUERY_INSTRUCTION,
                                                    normalize=True)[0], atol=1e-5)
    assert not np.allclose(emb.embed_query(TEXTS[0]), docs[0], atol=1e-3)
    custom = LLM2VecGenEmbeddings(str(tiny_checkpoint), device="cpu", query_instruction="",
                                  document_instruction="Doc: ", normalize=False)
    np.testing.assert_allclose(custom.embed_query(TEXTS[0]), tiny_model.encode([TEXTS[0]])[0], atol=1e-5)
    np.testing.assert_allclose(custom.embed_documents(TEXTS[:1]), tiny_model.encode(TEXTS[:1], instruction="Doc: "),
                               atol=1e-5)


def test_minilm_in_a_langchain_vector_store(minilm):
    emb = LLM2VecGenEmbeddings("minilm", device="cpu", document_instruction="passage: ")
    np.testing.assert_allclose(emb.embed_documents(TEXTS[:2]),
                               minilm.encode_documents(["passage: " + t for t in TEXTS[:2]], normalize=True), atol=1e-5)
    store = InMemoryVectorStore.from_texts(TEXTS, emb)
    assert store.similarity_search("what is the capital of france?", k=1)[0].page_content.startswith("Paris")


def test_async_paths_do_not_block_the_loop(tiny_model):
    gate = threading.Event()
    emb = LLM2VecGenEmbeddings(encoder=Gated(tiny_model, gate), batch_size=3)

    async def opener() -> int:
        for _ in range(5):
            await asyncio.sleep(0.01)
        gate.set()
        return 5

    async def main():
        docs, _ = await asyncio.gather(emb.aembed_documents(TEXTS), opener())
        gate.clear()
        q, _ = await asyncio.gather(emb.aembed_query("why is the sky blue?"), opener())
        return docs, q

    docs, q = asyncio.run(main())
    np.testing.assert_allclose(docs, tiny_model.encode_documents(TEXTS, normalize=True), atol=1e-5)
    np.testing.assert_allclose(q, tiny_model.encode_queries(["why is the sky blue?"], normalize=True)[0], atol=1e-5)
    assert emb.encoder.batches == [3, 3]  # the configured batch size reaches the encoder


def test_bad_arguments(tiny_model):
    with pytest.raises(RagenError, match="exactly one of"):
        LLM2VecGenEmbeddings()
    with pytest.raises(RagenError, match="batch size must be a positive integer"):
        LLM2VecGenEmbeddings(encoder=tiny_model, batch_size=0)
    with pytest.raises(RagenError, match="query_instruction must be a string"):
        LLM2VecGenEmbeddings(encoder=tiny_model, query_instruction=3)
    emb = LLM2VecGenEmbeddings(encoder=tiny_model)
    with pytest.raises(TypeError, match="one string"):
        emb.embed_query(["a list"])
    with pytest.raises(TypeError, match="not a single string"):
        emb.embed_documents("one string")
    assert emb.embed_documents([]) == []
