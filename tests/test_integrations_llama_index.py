"""LLM2VecGenEmbedding and RagenFaissVectorStore against real llama-index-core objects."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("llama_index.vector_stores.faiss")

from llama_index.core import Document, Settings, StorageContext, VectorStoreIndex, load_index_from_storage  # noqa: E402
from llama_index.core.schema import MetadataMode  # noqa: E402

from ragen.encoders.base import DEFAULT_DOCUMENT_INSTRUCTION, DEFAULT_QUERY_INSTRUCTION  # noqa: E402
from ragen.errors import RagenError, StoreError  # noqa: E402
from ragen.integrations.llama_index import LLM2VecGenEmbedding, RagenFaissVectorStore  # noqa: E402

TEXTS = [
    "Photosynthesis turns light into sugar in the leaves of plants.",
    "Paris is the capital of France and its largest city.",
    "Rayleigh scattering makes short wavelengths scatter more, so the sky looks blue.",
    "A cache stores recent results so that repeated questions are answered faster.",
    "The theorem follows from induction on the length of the proof.",
    "Retrieval augmented generation finds documents and answers with them.",
]
QUERIES = ["why is the sky blue?", "what is the capital of france?", "how do plants make food?"]


class Recording:
    """Delegates to a real encoder and records batch sizes; optionally waits on a gate before encoding."""

    def __init__(self, inner, gate: threading.Event | None = None) -> None:
        self.inner = inner
        self.gate = gate
        self.calls: list[tuple[str, int]] = []
        self.query_instruction = inner.query_instruction
        self.document_instruction = inner.document_instruction

    dim = property(lambda self: self.inner.dim)
    spec = property(lambda self: self.inner.spec)
    fingerprint = property(lambda self: self.inner.fingerprint)

    def _wait(self) -> None:
        if self.gate is not None and not self.gate.wait(timeout=20):
            raise TimeoutError("the gate was never opened: the event loop was blocked during the encode")

    def encode_queries(self, texts, *, instruction=None, batch_size=32, max_length=512, normalize=False):
        self._wait()
        self.calls.append(("query", len(texts)))
        return self.inner.encode_queries(texts, instruction=instruction, batch_size=batch_size,
                                         max_length=max_length, normalize=normalize)

    def encode_documents(self, texts, *, instruction=None, batch_size=32, max_length=512, normalize=False):
        self._wait()
        self.calls.append(("document", len(texts)))
        return self.inner.encode_documents(texts, instruction=instruction, batch_size=batch_size,
                                           max_length=max_length, normalize=normalize)


@pytest.fixture(scope="module")
def tiny_embedding(tiny_checkpoint):
    return LLM2VecGenEmbedding(model_name=str(tiny_checkpoint), device="cpu")


@pytest.fixture()
def restore_settings():
    saved = Settings._embed_model
    yield
    Settings._embed_model = saved


# ------------------------------------------------------------------------------------------------------------
# vectors
# ------------------------------------------------------------------------------------------------------------
def test_query_and_text_vectors_equal_ragen_encoder(tiny_embedding, tiny_model):
    q = np.asarray(tiny_embedding.get_query_embedding(QUERIES[0]), dtype=np.float32)
    np.testing.assert_allclose(q, tiny_model.encode_queries([QUERIES[0]], normalize=True)[0], atol=1e-5)
    docs = np.asarray(tiny_embedding.get_text_embedding_batch(TEXTS), dtype=np.float32)
    np.testing.assert_allclose(docs, tiny_model.encode_documents(TEXTS, normalize=True), atol=1e-5)
    single = np.asarray(tiny_embedding.get_text_embedding(TEXTS[1]), dtype=np.float32)
    np.testing.assert_allclose(single, docs[1], atol=1e-5)
    assert np.linalg.norm(q) == pytest.approx(1.0, abs=1e-5)


def test_instructions_go_on_the_right_side(tiny_embedding, tiny_model):
    text = TEXTS[2]
    q = np.asarray(tiny_embedding.get_query_embedding(text), dtype=np.float32)
    d = np.asarray(tiny_embedding.get_text_embedding(text), dtype=np.float32)
    with_query = tiny_model.encode([text], instruction=DEFAULT_QUERY_INSTRUCTION, normalize=True)[0]
    with_doc = tiny_model.encode([text], instruction=DEFAULT_DOCUMENT_INSTRUCTION, normalize=True)[0]
    np.testing.assert_allclose(q, with_query, atol=1e-5)
    np.testing.assert_allclose(d, with_doc, atol=1e-5)
    assert not np.allclose(q, d, atol=1e-3)  # the two instructions really differ in the tiny model


def test_custom_and_empty_instructions(tiny_checkpoint, tiny_model):
    emb = LLM2VecGenEmbedding(model_name=str(tiny_checkpoint), device="cpu", query_instruction="Find: ",
                              text_instruction="", normalize=False, max_length=24)
    q = np.asarray(emb.get_query_embedding(QUERIES[1]), dtype=np.float32)
    np.testing.assert_allclose(q, tiny_model.encode([QUERIES[1]], instruction="Find: ", max_length=24)[0], atol=1e-5)
    d = np.asarray(emb.get_text_embedding(TEXTS[0]), dtype=np.float32)
    np.testing.assert_allclose(d, tiny_model.encode([TEXTS[0]], instruction=None, max_length=24)[0], atol=1e-5)
    # max_length is honoured: a long text truncated at 24 tokens differs from the 512-token embedding
    long_text = " ".join(TEXTS * 3)
    np.testing.assert_allclose(np.asarray(emb.get_text_embedding(long_text), dtype=np.float32),
                               tiny_model.encode([long_text], max_length=24)[0], atol=1e-5)
    assert not np.allclose(emb.get_text_embedding(long_text), tiny_model.encode([long_text])[0], atol=1e-3)


def test_baseline_instructions_are_prefixes_not_dropped(minilm):
    plain = LLM2VecGenEmbedding(model_name="minilm", device="cpu")
    prefixed = LLM2VecGenEmbedding(model_name="minilm", device="cpu", query_instruction="query: ",
                                   text_instruction="passage: ")
    np.testing.assert_allclose(plain.get_text_embedding_batch(TEXTS[:2]), minilm.encode_documents(TEXTS[:2], normalize=True),
                               atol=1e-5)
    np.testing.assert_allclose(prefixed.get_query_embedding(QUERIES[0]),
                               minilm.encode_queries(["query: " + QUERIES[0]], normalize=True)[0], atol=1e-5)
    np.testing.assert_allclose(prefixed.get_text_embedding_batch(TEXTS[:2]),
                               minilm.encode_documents(["passage: " + t for t in TEXTS[:2]], normalize=True), atol=1e-5)
    assert not np.allclose(plain.get_query_embedding(QUERIES[0]), prefixed.get_query_embedding(QUERIES[0]), atol=1e-3)


def test_mean_pool_baseline_gets_the_prefix(tiny_backbone):
    from ragen import load_encoder

    emb = LLM2VecGenEmbedding(model_name=f"mean:{tiny_backbone}", device="cpu", query_instruction="Q: ")
    reference = load_encoder(f"mean:{tiny_backbone}", device="cpu")
    np.testing.assert_allclose(emb.get_query_embedding(QUERIES[0]),
                               reference.encode_queries(["Q: " + QUERIES[0]], normalize=True)[0], atol=1e-5)
    np.testing.assert_allclose(emb.get_text_embedding(TEXTS[0]), reference.encode_documents(TEXTS[:1], normalize=True)[0],
                               atol=1e-5)


def test_text_embeddings_are_batched(tiny_model):
    rec = Recording(tiny_model)
    emb = LLM2VecGenEmbedding(encoder=rec, embed_batch_size=4)
    out = emb.get_text_embedding_batch(TEXTS + TEXTS[:4])
    assert rec.calls == [("document", 4), ("document", 4), ("document", 2)]  # one encode per batch, not per text
    assert len(out) == 10 and emb.model_name == tiny_model.spec


# ------------------------------------------------------------------------------------------------------------
# model sharing
# ------------------------------------------------------------------------------------------------------------
def test_instances_naming_the_same_checkpoint_share_one_model(tiny_checkpoint, tiny_embedding, monkeypatch):
    monkeypatch.chdir(tiny_checkpoint.parent)
    relative = LLM2VecGenEmbedding(model_name=tiny_checkpoint.name, device="cpu", query_instruction="Other: ")
    assert relative.encoder is tiny_embedding.encoder  # same spec by absolute path, same device
    other_dtype = LLM2VecGenEmbedding(model_name=str(tiny_checkpoint), device="cpu", dtype="bfloat16")
    assert other_dtype.encoder is not tiny_embedding.encoder
    from ragen.integrations.langchain import LLM2VecGenEmbeddings

    assert LLM2VecGenEmbeddings(str(tiny_checkpoint), device="cpu").encoder is tiny_embedding.encoder


def test_bad_arguments_raise_clear_errors(tiny_model):
    with pytest.raises(RagenError, match="exactly one of model_name"):
        LLM2VecGenEmbedding()
    with pytest.raises(RagenError, match="exactly one of model_name"):
        LLM2VecGenEmbedding(model_name="minilm", encoder=tiny_model)
    with pytest.raises(RagenError, match="unknown encoder spec"):
        LLM2VecGenEmbedding(model_name="nope:thing")
    with pytest.raises(RagenError, match="model_name must be an encoder spec"):
        LLM2VecGenEmbedding(model_name="  ")


# ------------------------------------------------------------------------------------------------------------
# async
# ------------------------------------------------------------------------------------------------------------
def test_async_embeds_run_off_the_event_loop(tiny_model):
    """The encode blocks until a concurrent coroutine opens the gate: only possible if the loop is free."""
    gate = threading.Event()
    emb = LLM2VecGenEmbedding(encoder=Recording(tiny_model, gate=gate))

    async def open_gate_soon() -> int:
        ticks = 0
        while ticks < 5:
            await asyncio.sleep(0.01)
            ticks += 1
        gate.set()
        return ticks

    async def main():
        q, ticks = await asyncio.gather(emb.aget_query_embedding(QUERIES[0]), open_gate_soon())
        gate.clear()
        docs, _ = await asyncio.gather(emb.aget_text_embedding_batch(TEXTS), open_gate_soon())
        gate.clear()
        one, _ = await asyncio.gather(emb.aget_text_embedding(TEXTS[0]), open_gate_soon())
        return q, docs, one, ticks

    q, docs, one, ticks = asyncio.run(main())
    assert ticks == 5
    np.testing.assert_allclose(q, tiny_model.encode_queries([QUERIES[0]], normalize=True)[0], atol=1e-5)
    np.testing.assert_allclose(docs, tiny_model.encode_documents(TEXTS, normalize=True), atol=1e-5)
    np.testing.assert_allclose(one, docs[0], atol=1e-5)


def test_concurrent_async_embeds_agree_with_sequential(tiny_embedding, tiny_model):
    async def main():
        return await asyncio.gather(*(tiny_embedding.aget_query_embedding(q) for q in QUERIES * 3))

    got = np.asarray(asyncio.run(main()), dtype=np.float32)
    np.testing.assert_allclose(got, tiny_model.encode_queries(QUERIES * 3, normalize=True), atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# VectorStoreIndex + FAISS + persistence
# ------------------------------------------------------------------------------------------------------------
def _exact_top_k(encoder, nodes, query: str, k: int) -> list[str]:
    """What ragen's own encoder and an exact inner-product search return for these node texts."""
    texts = [n.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes]
    doc_vecs = encoder.encode_documents(texts, normalize=True)
    q = encoder.encode_queries([query], normalize=True)[0]
    scores = doc_vecs @ q
    return [nodes[i].node_id for i in np.argsort(-scores, kind="stable")[:k]]


@pytest.mark.parametrize("spec", ["tiny", "minilm"])
def test_vector_store_index_matches_exact_search_and_round_trips(spec, tiny_checkpoint, tmp_path, restore_settings,
                                                                 request):
    if spec == "minilm":
        request.getfixturevalue("minilm")
        model_name = "minilm"
    else:
        model_name = str(tiny_checkpoint)
    emb = LLM2VecGenEmbedding(model_name=model_name, device="cpu", embed_batch_size=4)
    Settings.embed_model = emb
    documents = [Document(text=t, metadata={"source": f"doc{i}.txt"}) for i, t in enumerate(TEXTS)]
    store = RagenFaissVectorStore.create(emb.dim)
    index = VectorStoreIndex.from_documents(documents, storage_context=StorageContext.from_defaults(vector_store=store))
    nodes = list(index.docstore.docs.values())
    assert len(nodes) == len(TEXTS) and store.client.ntotal == len(TEXTS)

    k = 3
    results = {}
    for query in QUERIES:
        got = index.as_retriever(similarity_top_k=k).retrieve(query)
        assert [n.node.node_id for n in got] == _exact_top_k(emb.encoder, nodes, query, k)
        assert all(a.score >= b.score for a, b in zip(got, got[1:]))
        results[query] = [(n.node.node_id, n.score) for n in got]
    if spec == "minilm":  # a real model ranks the obvious passage first
        assert index.as_retriever(similarity_top_k=1).retrieve(QUERIES[0])[0].node.get_content().startswith("Rayleigh")

    persist_dir = tmp_path / "storage"
    index.storage_context.persist(persist_dir=str(persist_dir))
    assert not list(persist_dir.glob("*.tmp"))  # atomic write left no temp file behind
    Settings.embed_model = LLM2VecGenEmbedding(model_name=model_name, device="cpu")  # a fresh instance
    loaded_store = RagenFaissVectorStore.from_persist_dir(str(persist_dir))
    reloaded = load_index_from_storage(StorageContext.from_defaults(vector_store=loaded_store,
                                                                    persist_dir=str(persist_dir)))
    assert loaded_store.client.ntotal == len(TEXTS)
    for query in QUERIES:
        got = reloaded.as_retriever(similarity_top_k=k).retrieve(query)
        assert [n.node.node_id for n in got] == [nid for nid, _ in results[query]]
        np.testing.assert_allclose([n.score for n in got], [s for _, s in results[query]], atol=1e-5)


def test_async_retrieval_through_the_index(minilm, restore_settings):
    emb = LLM2VecGenEmbedding(model_name="minilm", device="cpu")
    store = RagenFaissVectorStore.create(emb.dim)
    index = VectorStoreIndex.from_documents([Document(text=t) for t in TEXTS], embed_model=emb,
                                            storage_context=StorageContext.from_defaults(vector_store=store))
    got = asyncio.run(index.as_retriever(similarity_top_k=2).aretrieve(QUERIES[1]))
    assert got[0].node.get_content().startswith("Paris")


def test_vector_store_errors(tmp_path):
    with pytest.raises(StoreError, match="no persisted FAISS vector store"):
        RagenFaissVectorStore.from_persist_dir(str(tmp_path))
    (tmp_path / "default__vector_store.json").write_text("{}")
    with pytest.raises(StoreError, match="not a ragen FAISS vector store"):
        RagenFaissVectorStore.from_persist_dir(str(tmp_path))
    (tmp_path / "default__vector_store.json").write_bytes(b"IxF2 not really faiss")
    with pytest.raises(StoreError, match="not a readable FAISS index"):
        RagenFaissVectorStore.from_persist_dir(str(tmp_path))
    with pytest.raises(RagenError, match="positive integer"):
        RagenFaissVectorStore.create(0)
    import faiss

    if faiss.get_num_gpus() == 0:
        with pytest.raises(RagenError, match="sees no GPU"):
            RagenFaissVectorStore.create(8, use_gpu=True)
    assert not RagenFaissVectorStore.create(8, use_gpu=False).on_gpu


@pytest.mark.gpu
def test_gpu_store_matches_cpu_and_persists(tmp_path):
    import faiss

    if faiss.get_num_gpus() == 0:
        pytest.skip("FAISS sees no GPU")
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((200, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    gpu, cpu = RagenFaissVectorStore.create(16), RagenFaissVectorStore.create(16, use_gpu=False)
    assert gpu.on_gpu
    for s in (gpu, cpu):
        s.client.add(vecs)
    d_gpu, i_gpu = gpu.client.search(vecs[:5], 10)
    d_cpu, i_cpu = cpu.client.search(vecs[:5], 10)
    np.testing.assert_array_equal(i_gpu, i_cpu)
    np.testing.assert_allclose(d_gpu, d_cpu, atol=1e-4)
    gpu.persist(str(tmp_path / "default__vector_store.json"))
    again = RagenFaissVectorStore.from_persist_dir(str(tmp_path), use_gpu=False)
    assert again.client.ntotal == 200


# ------------------------------------------------------------------------------------------------------------
# a normal BaseEmbedding: serialisation and every BaseEmbedding field
# ------------------------------------------------------------------------------------------------------------
def test_embedding_round_trips_through_dict_and_json(tiny_checkpoint, tiny_embedding):
    from llama_index.core.embeddings import BaseEmbedding

    emb = LLM2VecGenEmbedding(model_name=str(tiny_checkpoint), device="cpu", query_instruction="Find: ",
                              text_instruction="", embed_batch_size=7, max_length=40, num_workers=2)
    data = emb.to_dict()
    assert data["class_name"] == "LLM2VecGenEmbedding" and data["num_workers"] == 2
    for again in (LLM2VecGenEmbedding.from_dict(data), LLM2VecGenEmbedding.from_json(emb.to_json())):
        assert again.to_dict() == data
        assert again.encoder is tiny_embedding.encoder  # the shared model, not a second copy
        np.testing.assert_allclose(again.get_query_embedding(QUERIES[0]), emb.get_query_embedding(QUERIES[0]),
                                   atol=1e-6)
    # every field BaseEmbedding declares is accepted by the constructor
    assert set(BaseEmbedding.model_fields) <= set(LLM2VecGenEmbedding.model_fields)


def test_embedding_accepts_base_embedding_fields_and_uses_the_cache(tiny_model):
    from llama_index.core.callbacks import CallbackManager
    from llama_index.core.storage.kvstore import SimpleKVStore

    cache = SimpleKVStore()
    rec = Recording(tiny_model)
    manager = CallbackManager([])
    emb = LLM2VecGenEmbedding(encoder=rec, num_workers=3, embeddings_cache=cache, callback_manager=manager,
                              embed_batch_size=2)
    assert emb.num_workers == 3 and emb.embeddings_cache is cache and emb.callback_manager is manager
    first = emb.get_text_embedding_batch(TEXTS[:3])
    assert rec.calls == [("document", 2), ("document", 1)]
    again = emb.get_text_embedding_batch(TEXTS[:3])  # all three from the cache: no encode
    assert rec.calls == [("document", 2), ("document", 1)]
    np.testing.assert_allclose(again, first, atol=1e-6)
    # from_dict keeps the cache object and the other fields
    rebuilt = LLM2VecGenEmbedding.from_dict(emb.to_dict(), encoder=rec)
    assert rebuilt.embeddings_cache is cache and rebuilt.num_workers == 3 and rebuilt.embed_batch_size == 2


def test_max_length_truncates_sentence_transformers_specs(minilm):
    """As HuggingFaceEmbedding(max_length=...) does: a long text embeds like its first max_length tokens."""
    words = ("the cat sat on the mat and the dog ran in the park " * 20).split()
    emb = LLM2VecGenEmbedding(model_name="minilm", device="cpu", max_length=16)
    # MiniLM's tokenizer: one token per word here, plus [CLS] and [SEP]
    assert len(minilm.model.tokenizer(" ".join(words[:14]))["input_ids"]) == 16
    long_vec = np.asarray(emb.get_text_embedding(" ".join(words)), dtype=np.float32)
    np.testing.assert_allclose(long_vec, minilm.encode_documents([" ".join(words[:14])], normalize=True)[0], atol=1e-5)
    assert not np.allclose(long_vec, minilm.encode_documents([" ".join(words)], normalize=True)[0], atol=1e-3)
    np.testing.assert_allclose(emb.get_query_embedding(" ".join(words)),
                               minilm.encode_queries([" ".join(words[:14])], normalize=True)[0], atol=1e-5)
    assert minilm.model.max_seq_length == 256  # the shared model's own limit is restored after the call
    # the default (512) keeps MiniLM's own 256-token limit
    default = LLM2VecGenEmbedding(model_name="minilm", device="cpu")
    np.testing.assert_allclose(default.get_text_embedding(" ".join(words)),
                               minilm.encode_documents([" ".join(words)], normalize=True)[0], atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# vector store: dimensions and persisted layout
# ------------------------------------------------------------------------------------------------------------
def test_vector_store_dimension_mismatch_is_a_clear_error(minilm, restore_settings):
    emb = LLM2VecGenEmbedding(model_name="minilm", device="cpu")
    store = RagenFaissVectorStore.create(emb.dim + 1)
    with pytest.raises(StoreError, match=r"dimension 384, but this vector store was created with dimension 385"):
        VectorStoreIndex.from_documents([Document(text=t) for t in TEXTS], embed_model=emb,
                                        storage_context=StorageContext.from_defaults(vector_store=store))
    assert store.client.ntotal == 0  # nothing half-added
    good = RagenFaissVectorStore.create(emb.dim)
    index = VectorStoreIndex.from_documents([Document(text=t) for t in TEXTS], embed_model=emb,
                                            storage_context=StorageContext.from_defaults(vector_store=good))
    from llama_index.core.vector_stores.types import VectorStoreQuery

    with pytest.raises(StoreError, match="the query embedding has dimension 3"):
        good.query(VectorStoreQuery(query_embedding=[0.1, 0.2, 0.3], similarity_top_k=1))
    assert index.as_retriever(similarity_top_k=1).retrieve(QUERIES[1])[0].node.get_content().startswith("Paris")


def test_persisted_store_without_vector_store_argument_names_the_layout(minilm, tmp_path, restore_settings):
    emb = LLM2VecGenEmbedding(model_name="minilm", device="cpu")
    Settings.embed_model = emb
    store = RagenFaissVectorStore.create(emb.dim)
    index = VectorStoreIndex.from_documents([Document(text=t) for t in TEXTS],
                                            storage_context=StorageContext.from_defaults(vector_store=store))
    persist_dir = tmp_path / "storage"
    index.storage_context.persist(persist_dir=str(persist_dir))
    assert (persist_dir / "default__vector_store.faiss").is_file()
    with pytest.raises(ValueError, match=r"ragen FAISS vector store .*RagenFaissVectorStore\.from_persist_dir"):
        StorageContext.from_defaults(persist_dir=str(persist_dir))
    # the documented way loads it
    ctx = StorageContext.from_defaults(persist_dir=str(persist_dir),
                                       vector_store=RagenFaissVectorStore.from_persist_dir(str(persist_dir)))
    reloaded = load_index_from_storage(ctx)
    assert reloaded.as_retriever(similarity_top_k=1).retrieve(QUERIES[0])[0].node.get_content().startswith("Rayleigh")


def test_store_persisted_by_the_old_layout_still_loads(tmp_path):
    import faiss

    index = faiss.IndexFlatIP(4)
    index.add(np.eye(4, dtype=np.float32))
    faiss.write_index(index, str(tmp_path / "default__vector_store.json"))  # FAISS bytes in the .json file
    assert RagenFaissVectorStore.from_persist_dir(str(tmp_path), use_gpu=False).client.ntotal == 4


def test_faiss_store_points_to_ragen_vector_store_for_updates_and_filters(minilm, restore_settings):
    from llama_index.core.vector_stores.types import MetadataFilter, MetadataFilters

    emb = LLM2VecGenEmbedding(model_name="minilm", device="cpu")
    store = RagenFaissVectorStore.create(emb.dim)
    docs = [Document(text=t, id_=f"doc{i}", metadata={"n": i}) for i, t in enumerate(TEXTS[:3])]
    index = VectorStoreIndex.from_documents(docs, embed_model=emb,
                                            storage_context=StorageContext.from_defaults(vector_store=store))
    with pytest.raises(RagenError, match="cannot delete documents: .*RagenVectorStore"):
        index.delete_ref_doc("doc0")
    with pytest.raises(RagenError, match="cannot delete documents: .*RagenVectorStore"):
        index.refresh_ref_docs([Document(text="changed", id_="doc1", metadata={"n": 1})])
    with pytest.raises(RagenError, match="cannot filter: .*RagenVectorStore"):
        index.as_retriever(filters=MetadataFilters(filters=[MetadataFilter(key="n", value=1)])).retrieve("x")
    assert store.client.ntotal == 3
