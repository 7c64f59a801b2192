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
    with pytest.raises(RagenError, match="query_instruction=3: Input should be a valid string"):
        LLM2VecGenEmbeddings(encoder=tiny_model, query_instruction=3)
    emb = LLM2VecGenEmbeddings(encoder=tiny_model)
    with pytest.raises(TypeError, match="one string"):
        emb.embed_query(["a list"])
    with pytest.raises(TypeError, match="not a single string"):
        emb.embed_documents("one string")
    assert emb.embed_documents([]) == []


# ------------------------------------------------------------------------------------------------------------
# a pydantic model like the rest of langchain-core; HuggingFaceEmbeddings spellings
# ------------------------------------------------------------------------------------------------------------
def test_embeddings_are_a_pydantic_model_that_round_trips(tiny_checkpoint, tiny_model):
    from pydantic import BaseModel

    emb = LLM2VecGenEmbeddings(str(tiny_checkpoint), device="cpu", query_instruction="Find: ", batch_size=3,
                               max_length=40)
    assert isinstance(emb, BaseModel)
    dumped = emb.model_dump()
    assert dumped["model_name"] == str(tiny_checkpoint) and dumped["batch_size"] == 3 and "encoder" not in dumped
    again = LLM2VecGenEmbeddings(**dumped)
    assert again.model_dump() == dumped and again.encoder is emb.encoder
    np.testing.assert_allclose(again.embed_query(TEXTS[0]), emb.embed_query(TEXTS[0]), atol=1e-6)
    assert LLM2VecGenEmbeddings.model_validate(dumped).model_dump() == dumped
    copy = emb.model_copy(update={"normalize": False})
    assert copy.encoder is emb.encoder
    np.testing.assert_allclose(copy.embed_documents(TEXTS[:1]), tiny_model.encode_documents(TEXTS[:1], max_length=40),
                               atol=1e-5)  # the copy embeds with its own settings
    assert "model_name" in LLM2VecGenEmbeddings.model_json_schema()["properties"]
    # an instance made from an encoder dumps its spec
    assert LLM2VecGenEmbeddings(encoder=tiny_model).model_dump()["model_name"] == tiny_model.spec


def test_huggingface_embeddings_spellings(minilm):
    """What HuggingFaceEmbeddings users paste: model_kwargs / encode_kwargs map onto ragen's own fields."""
    emb = LLM2VecGenEmbeddings(model_name="minilm", model_kwargs={"device": "cpu"},
                               encode_kwargs={"batch_size": 2, "normalize_embeddings": False})
    assert (emb.device, emb.batch_size, emb.normalize) == ("cpu", 2, False)
    raw = np.asarray(emb.embed_documents(TEXTS[:2]), dtype=np.float32)
    np.testing.assert_allclose(raw, minilm.encode_documents(TEXTS[:2], normalize=False), atol=1e-5)
    assert emb.model_dump()["encode_kwargs"] == {"batch_size": 2, "normalize_embeddings": False}
    assert LLM2VecGenEmbeddings(**emb.model_dump()).normalize is False
    import torch

    assert LLM2VecGenEmbeddings(model_name="minilm", device="cpu",
                                model_kwargs={"torch_dtype": torch.float32}).dtype == "float32"
    with pytest.raises(RagenError, match=r"encode_kwargs\['prompt'\] is not supported.*query_instruction="):
        LLM2VecGenEmbeddings(model_name="minilm", encode_kwargs={"prompt": "query: "})
    with pytest.raises(RagenError, match=r"model_kwargs\['revision'\].*accepted model_kwargs keys: device, dtype"):
        LLM2VecGenEmbeddings(model_name="minilm", model_kwargs={"revision": "main"})
    with pytest.raises(RagenError, match=r"batch_size=4 and encode_kwargs\['batch_size'\]=8 disagree"):
        LLM2VecGenEmbeddings(model_name="minilm", batch_size=4, encode_kwargs={"batch_size": 8})
    with pytest.raises(RagenError, match="cache_folder=.*Extra inputs are not permitted"):
        LLM2VecGenEmbeddings(model_name="minilm", cache_folder="/somewhere")


def test_max_length_truncates_sentence_transformers_specs(minilm):
    words = ("the cat sat on the mat and the dog ran in the park " * 20).split()
    emb = LLM2VecGenEmbeddings("minilm", device="cpu", max_length=16)
    assert len(minilm.model.tokenizer(" ".join(words[:14]))["input_ids"]) == 16  # one token per word + 2
    np.testing.assert_allclose(emb.embed_documents([" ".join(words)]),
                               minilm.encode_documents([" ".join(words[:14])], normalize=True), atol=1e-5)
    np.testing.assert_allclose(emb.embed_query(" ".join(words)),
                               minilm.encode_queries([" ".join(words[:14])], normalize=True)[0], atol=1e-5)
