"""RagenVectorStore (LlamaIndex and LangChain): full CRUD with metadata filters over a ragen index that
`ragen index` built and `ragen query` / Retriever read, with the real framework objects."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("langchain_core")

from llama_index.core import Document, VectorStoreIndex  # noqa: E402
from llama_index.core.vector_stores.types import (FilterCondition, FilterOperator, MetadataFilter,  # noqa: E402
                                                  MetadataFilters)

from ragen.errors import RagenError, StoreError  # noqa: E402
from ragen.integrations import langchain as lc  # noqa: E402
from ragen.integrations import llama_index as li  # noqa: E402
from ragen.retriever import Retriever, build_index  # noqa: E402

FILES = {
    "sky.txt": "Rayleigh scattering makes short wavelengths scatter more, so the daytime sky looks blue.",
    "paris.md": "Paris is the capital of France and its largest city, on the Seine.",
}


@pytest.fixture()
def ragen_index(tmp_path, minilm) -> Path:
    src = tmp_path / "docs"
    src.mkdir()
    for name, text in FILES.items():
        (src / name).write_text(text)
    out = tmp_path / "index"
    build_index(src, out, encoder=minilm, chunk_size=400, chunk_overlap=0)
    return out


def _open(index_dir: Path) -> Retriever:
    """What `ragen query` sees (with the already loaded MiniLM)."""
    from ragen.integrations._shared import shared_encoder

    return Retriever.open(index_dir, encoder=shared_encoder("minilm", device="cpu"), device="cpu")


def _paths(index_dir: Path, query: str, k: int = 10) -> list[str]:
    with _open(index_dir) as r:
        return [h.path for h in r.search(query, k=k)]


def _doc_of(node) -> str:
    """A node's document: its ref_doc_id (LlamaIndex documents) or its path (chunks `ragen index` wrote)."""
    return node.ref_doc_id or node.metadata["path"]


# ------------------------------------------------------------------------------------------------------------
# LlamaIndex
# ------------------------------------------------------------------------------------------------------------
def test_llama_index_crud_on_an_index_built_by_ragen(ragen_index):
    emb = li.LLM2VecGenEmbedding("minilm", device="cpu")
    store = li.RagenVectorStore(ragen_index, embed_model=emb)
    index = VectorStoreIndex.from_vector_store(store, embed_model=emb)
    # the chunks `ragen index` wrote are searched as they are, with ragen's scores
    got = index.as_retriever(similarity_top_k=2).retrieve("why is the sky blue?")
    with _open(ragen_index) as r:
        expected = r.search("why is the sky blue?", k=2)
    assert [n.node.node_id for n in got] == [h.chunk_id for h in expected]
    np.testing.assert_allclose([n.score for n in got], [h.score for h in expected], atol=1e-5)

    # insert: LlamaIndex documents land in the ragen index, visible to ragen's own search
    index.insert(Document(text="Bananas are yellow fruit rich in potassium.", id_="banana",
                          metadata={"topic": "food", "year": 2020}))
    index.insert(Document(text="The Eiffel Tower stands in Paris.", id_="eiffel", metadata={"topic": "travel",
                                                                                            "year": 2024}))
    assert _paths(ragen_index, "a yellow fruit", k=1) == ["banana"]
    travel = MetadataFilters(filters=[MetadataFilter(key="topic", value="travel")])
    got = index.as_retriever(similarity_top_k=5, filters=travel).retrieve("Paris")
    assert [n.node.ref_doc_id for n in got] == ["eiffel"] and got[0].node.metadata == {"topic": "travel", "year": 2024}
    recent_or_sky = MetadataFilters(filters=[MetadataFilter(key="year", value=2021, operator=FilterOperator.GT),
                                             MetadataFilter(key="path", value="sky.txt")],
                                    condition=FilterCondition.OR)
    got = index.as_retriever(similarity_top_k=5, filters=recent_or_sky).retrieve("Paris")
    assert {_doc_of(n.node) for n in got} == {"eiffel", "sky.txt"}

    # delete_ref_doc removes a LlamaIndex document and a file `ragen index` wrote alike
    index.delete_ref_doc("banana")
    index.delete_ref_doc("sky.txt")
    assert "banana" not in _paths(ragen_index, "a yellow fruit") and "sky.txt" not in _paths(ragen_index, "sky")

    # refresh_ref_docs: changed documents are replaced, new ones inserted, unchanged ones left alone
    same = Document(text="The Eiffel Tower stands in Paris.", id_="eiffel", metadata={"topic": "travel", "year": 2024})
    assert index.refresh_ref_docs([same]) == [False]
    changed = Document(text="The Eiffel Tower, finished in 1889, stands in Paris.", id_="eiffel",
                       metadata={"topic": "travel", "year": 2024})
    new = Document(text="Kiwis are green inside.", id_="kiwi", metadata={"topic": "food"})
    assert index.refresh_ref_docs([changed, new]) == [True, True]
    texts = {n.node.ref_doc_id: n.node.get_content() for n in index.as_retriever(similarity_top_k=10).retrieve("x")
             if n.node.ref_doc_id}
    assert texts == {"eiffel": changed.text, "kiwi": new.text}

    # nodes by id and filter; delete_nodes
    kiwi = store.get_nodes(filters=MetadataFilters(filters=[MetadataFilter(key="topic", value="food")]))
    assert [n.get_content() for n in kiwi] == [new.text]
    store.delete_nodes([kiwi[0].node_id])
    assert store.get_nodes([kiwi[0].node_id]) == []
    assert sorted(_paths(ragen_index, "Paris")) == ["eiffel", "paris.md"]
    # async paths of the index go through the same store
    got = asyncio.run(index.as_retriever(similarity_top_k=1).aretrieve("Eiffel Tower"))
    assert got[0].node.ref_doc_id == "eiffel"
    store.clear()
    assert _paths(ragen_index, "Paris") == []


def test_llama_index_creates_an_index_ragen_query_reads(tmp_path, minilm):
    from typer.testing import CliRunner

    from ragen.cli import app

    emb = li.LLM2VecGenEmbedding("minilm", device="cpu")
    target = tmp_path / "new-index"
    with pytest.raises(StoreError, match="no ragen index here yet; pass the embedding model"):
        li.RagenVectorStore(target)
    store = li.RagenVectorStore(target, embed_model=emb)
    from llama_index.core import StorageContext

    first = VectorStoreIndex.from_documents([Document(text=t, id_=name) for name, t in FILES.items()],
                                            embed_model=emb,
                                            storage_context=StorageContext.from_defaults(vector_store=store))
    first.storage_context.persist(persist_dir=str(tmp_path / "li-meta"))  # LlamaIndex's docstore, elsewhere
    out = CliRunner().invoke(app, ["query", "why is the sky blue?", "--index", str(target), "--json", "-k", "1",
                                   "--device", "cpu"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)[0]["path"] == "sky.txt"
    # a reopened store (new process, no docstore) serves the same nodes; to_dict/from_dict round-trips
    reopened = li.RagenVectorStore.from_dict(store.to_dict())
    assert reopened.to_dict() == store.to_dict() and reopened.index_dir == str(target)
    again = VectorStoreIndex.from_vector_store(reopened, embed_model=emb)
    assert again.as_retriever(similarity_top_k=1).retrieve("capital of France")[0].node.ref_doc_id == "paris.md"
    # refresh_ref_docs in a later run: the persisted docstore knows the hashes, the ragen index the vectors
    from llama_index.core import load_index_from_storage

    later = load_index_from_storage(StorageContext.from_defaults(persist_dir=str(tmp_path / "li-meta"),
                                                                 vector_store=li.RagenVectorStore(target)),
                                    embed_model=emb)
    moved = "Paris, on the Seine, is the capital and largest city of France."
    assert later.refresh_ref_docs([Document(text=FILES["sky.txt"], id_="sky.txt"),
                                   Document(text=moved, id_="paris.md")]) == [False, True]
    with _open(target) as r:
        assert [(h.path, h.text) for h in r.search("capital of France", k=2)] == [("paris.md", moved),
                                                                                 ("sky.txt", FILES["sky.txt"])]


def test_llama_index_store_errors(ragen_index, tiny_checkpoint):
    tiny = li.LLM2VecGenEmbedding(str(tiny_checkpoint), device="cpu")
    with pytest.raises(StoreError, match="built with encoder minilm"):
        li.RagenVectorStore(ragen_index, embed_model=tiny)
    store = li.RagenVectorStore(ragen_index)
    from llama_index.core.schema import TextNode

    with pytest.raises(StoreError, match="has dimension 3, but the index .* holds vectors of dimension 384"):
        store.add([TextNode(text="x", id_="n1", embedding=[0.1, 0.2, 0.3])])
    with pytest.raises(StoreError, match="has no embedding"):
        store.add([TextNode(text="x", id_="n1")])
    with pytest.raises(RagenError, match="needs node_ids or filters"):
        store.delete_nodes()
    assert sorted(_paths(ragen_index, "Paris")) == ["paris.md", "sky.txt"]  # nothing was changed


# ------------------------------------------------------------------------------------------------------------
# LangChain
# ------------------------------------------------------------------------------------------------------------
def test_langchain_crud_on_an_index_built_by_ragen(ragen_index):
    emb = lc.LLM2VecGenEmbeddings("minilm", device="cpu")
    store = lc.RagenVectorStore(ragen_index, emb)
    docs = store.similarity_search_with_score("why is the sky blue?", k=2)
    with _open(ragen_index) as r:
        expected = r.search("why is the sky blue?", k=2)
    assert [d.id for d, _ in docs] == [h.chunk_id for h in expected]
    np.testing.assert_allclose([s for _, s in docs], [h.score for h in expected], atol=1e-5)
    assert docs[0][0].metadata["path"] == "sky.txt"

    ids = store.add_texts(["Bananas are yellow fruit.", "The Eiffel Tower stands in Paris.", "Kiwis are green."],
                          metadatas=[{"topic": "food", "year": 2020}, {"topic": "travel", "year": 2024},
                                     {"topic": "food", "source": "fruit.md"}], ids=["banana", "eiffel", None])
    assert ids[:2] == ["banana", "eiffel"] and len(ids[2]) == 36  # a generated uuid
    assert _paths(ragen_index, "a yellow fruit", k=1) == ["banana"]
    assert _paths(ragen_index, "green kiwi", k=1) == ["fruit.md"]  # metadata "source" is the document path
    got = store.similarity_search("Paris", k=5, filter={"topic": "travel"})
    assert [d.id for d in got] == ["eiffel"] and got[0].metadata["year"] == 2024
    got = store.similarity_search("Paris", k=5, filter={"$or": [{"year": {"$gte": 2021}}, {"path": "paris.md"}]})
    assert {d.id for d in got} == {"eiffel", "paris.md#0"}
    got = store.similarity_search("fruit", k=5, filter=lambda doc: doc.metadata.get("topic") == "food")
    assert {d.page_content for d in got} == {"Bananas are yellow fruit.", "Kiwis are green."}
    # as_retriever: VectorStoreRetriever with k and filter in search_kwargs, and per call
    retriever = store.as_retriever(search_kwargs={"k": 1, "filter": {"topic": "food"}})
    assert [d.id for d in retriever.invoke("yellow")] == ["banana"]
    assert len(retriever.invoke("fruit", k=2)) == 2
    relevance = store.similarity_search_with_relevance_scores("why is the sky blue?", k=1)
    assert 0.0 <= relevance[0][1] <= 1.0 and relevance[0][0].metadata["path"] == "sky.txt"

    # replace by id, delete by id and by filter
    store.add_texts(["Bananas are yellow and curved."], metadatas=[{"topic": "food"}], ids=["banana"])
    assert [d.page_content for d in store.get_by_ids(["banana"])] == ["Bananas are yellow and curved."]
    assert store.delete(["banana"]) is True
    assert store.get_by_ids(["banana"]) == [] and "banana" not in _paths(ragen_index, "yellow")
    store.delete(filter={"path": "sky.txt"})
    assert "sky.txt" not in _paths(ragen_index, "sky")
    assert asyncio.run(store.asimilarity_search("Eiffel", k=1))[0].id == "eiffel"


def test_langchain_store_from_texts_and_errors(tmp_path, minilm, ragen_index):
    emb = lc.LLM2VecGenEmbeddings("minilm", device="cpu")
    target = tmp_path / "lc-index"
    store = lc.RagenVectorStore.from_texts(list(FILES.values()), emb, metadatas=[{"path": p} for p in FILES],
                                           index_dir=target)
    assert _paths(target, "capital of France", k=1) == ["paris.md"]
    assert store.similarity_search("sky", k=1)[0].metadata["path"] == "sky.txt"
    with pytest.raises(RagenError, match="needs index_dir="):
        lc.RagenVectorStore.from_texts(["x"], emb)
    from langchain_core.embeddings import DeterministicFakeEmbedding

    with pytest.raises(RagenError, match="embedding must be an LLM2VecGenEmbeddings"):
        lc.RagenVectorStore(target, DeterministicFakeEmbedding(size=384))
    with pytest.raises(RagenError, match="delete needs ids or filter="):
        store.delete()
    with pytest.raises(RagenError, match="got 1 metadatas for 2 texts"):
        store.add_texts(["a", "b"], metadatas=[{}])
    with pytest.raises(RagenError, match="unsupported arguments: fetch_k"):
        store.similarity_search("sky", k=1, fetch_k=3)
    with pytest.raises(RagenError, match=r"unknown filter operator '\$regex'"):
        store.similarity_search("sky", filter={"path": {"$regex": "s"}})
