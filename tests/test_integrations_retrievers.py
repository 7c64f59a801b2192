"""LlamaIndex and LangChain retrievers over indexes built with ragen's build_index, against Retriever.search."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("langchain_core")

from langchain_core.documents import Document  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402
from langchain_core.runnables import RunnableLambda, RunnablePassthrough  # noqa: E402
from llama_index.core.schema import QueryBundle, TextNode  # noqa: E402

from ragen.errors import RagenError, StoreError  # noqa: E402
from ragen.integrations.langchain import LLM2VecGenEmbeddings, RagenLangChainRetriever  # noqa: E402
from ragen.integrations.llama_index import LLM2VecGenEmbedding, RagenLlamaIndexRetriever  # noqa: E402
from ragen.retriever import Retriever, build_index  # noqa: E402

FILES = {
    "sky.txt": "Rayleigh scattering makes short wavelengths scatter more, so the daytime sky looks blue.",
    "paris.md": "# Paris\n\nParis is the capital of France and its largest city, on the Seine.",
    "plants/leaf.txt": "Photosynthesis turns light into sugar in the leaves of plants, releasing oxygen.",
    "cache.txt": "A cache stores recent results so that repeated questions are answered faster.",
    "proofs.md": "The theorem follows from induction on the length of the proof.",
}
QUERIES = ["why is the sky blue?", "what is the capital of france?", "how do plants make sugar?"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for name, text in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory, corpus, tiny_model) -> Path:
    out = tmp_path_factory.mktemp("tiny-index") / "idx"
    build_index(corpus, out, encoder=tiny_model, chunk_size=200, chunk_overlap=0)
    return out


@pytest.fixture(scope="module")
def minilm_index(tmp_path_factory, corpus, minilm) -> Path:
    out = tmp_path_factory.mktemp("minilm-index") / "idx"
    build_index(corpus, out, encoder=minilm, chunk_size=200, chunk_overlap=0)
    return out


@pytest.fixture(scope="module")
def reference(tiny_index, tiny_model):
    r = Retriever.open(tiny_index, encoder=tiny_model, device="cpu")
    yield r
    r.close()


def _same_hits(got_ids, got_scores, hits):
    assert got_ids == [h.chunk_id for h in hits]
    np.testing.assert_allclose(got_scores, [h.score for h in hits], atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# LlamaIndex
# ------------------------------------------------------------------------------------------------------------
def test_llama_index_retriever_equals_ragen_search(tiny_index, reference):
    li = RagenLlamaIndexRetriever(str(tiny_index), similarity_top_k=3, device="cpu")
    assert li.retriever.encoder.fingerprint == reference.encoder.fingerprint
    for query in QUERIES:
        expected = reference.search(query, k=3)
        got = li.retrieve(query)
        _same_hits([n.node.node_id for n in got], [n.score for n in got], expected)
        for node, hit in zip(got, expected):
            assert isinstance(node.node, TextNode)
            assert node.node.get_content() == hit.text
            assert node.node.metadata == {"path": hit.path, "chunk_id": hit.chunk_id, "start": hit.start, "end": hit.end}
        # the LLM sees the path but not the bookkeeping fields
        llm_view = got[0].node.get_content(metadata_mode="llm")
        assert expected[0].path in llm_view and "chunk_id" not in llm_view


def test_llama_index_retriever_async_instance_and_query_vector(tiny_index, tiny_checkpoint, reference):
    li = RagenLlamaIndexRetriever(reference, similarity_top_k=2)
    got = asyncio.run(li.aretrieve(QUERIES[1]))
    _same_hits([n.node.node_id for n in got], [n.score for n in got], reference.search(QUERIES[1], k=2))
    # a QueryBundle that already carries a vector is searched with it (no second encode)
    emb = LLM2VecGenEmbedding(model_name=str(tiny_checkpoint), device="cpu")
    bundle = QueryBundle(query_str="ignored text", embedding=emb.get_query_embedding(QUERIES[2]))
    got = li.retrieve(bundle)
    _same_hits([n.node.node_id for n in got], [n.score for n in got], reference.search(QUERIES[2], k=2))


def test_retrievers_share_the_model_with_embedding_adapters(tiny_index, tiny_checkpoint):
    emb = LLM2VecGenEmbedding(model_name=str(tiny_checkpoint), device="cpu")
    li = RagenLlamaIndexRetriever(str(tiny_index), device="cpu")
    lc = RagenLangChainRetriever(str(tiny_index), device="cpu")
    assert li.retriever.encoder is emb.encoder and lc.retriever.encoder is emb.encoder


def test_llama_index_retriever_minilm_finds_the_right_file(minilm_index):
    li = RagenLlamaIndexRetriever(minilm_index, similarity_top_k=1, device="cpu")
    assert li.retrieve(QUERIES[0])[0].node.metadata["path"] == "sky.txt"
    assert li.retrieve(QUERIES[2])[0].node.metadata["path"] == "plants/leaf.txt"


# ------------------------------------------------------------------------------------------------------------
# LangChain
# ------------------------------------------------------------------------------------------------------------
def test_langchain_retriever_equals_ragen_search(tiny_index, reference):
    lc = RagenLangChainRetriever(str(tiny_index), k=3, device="cpu")
    for query in QUERIES:
        expected = reference.search(query, k=3)
        docs = lc.invoke(query)
        assert all(isinstance(d, Document) for d in docs)
        _same_hits([d.metadata["chunk_id"] for d in docs], [d.metadata["score"] for d in docs], expected)
        for doc, hit in zip(docs, expected):
            assert doc.page_content == hit.text and doc.id == hit.chunk_id
            assert doc.metadata["path"] == hit.path and doc.metadata["rank"] == hit.rank
            assert (doc.metadata["start"], doc.metadata["end"]) == (hit.start, hit.end)


def test_langchain_retriever_async_and_in_a_chain(minilm_index):
    lc = RagenLangChainRetriever(minilm_index, k=2, device="cpu")
    docs = asyncio.run(lc.ainvoke(QUERIES[1]))
    assert docs[0].metadata["path"] == "paris.md" and len(docs) == 2
    prompt = ChatPromptTemplate.from_template("Context:\n{context}\n\nQuestion: {question}")
    chain = ({"context": lc | RunnableLambda(lambda ds: "\n".join(d.page_content for d in ds)),
              "question": RunnablePassthrough()} | prompt)
    rendered = chain.invoke(QUERIES[1]).to_string()
    assert "Paris is the capital of France" in rendered and rendered.rstrip().endswith(QUERIES[1])


def test_langchain_retriever_with_an_open_retriever_and_bad_input(reference, tiny_index, tmp_path):
    lc = RagenLangChainRetriever(reference, k=1)
    assert lc.retriever is reference and len(lc.invoke(QUERIES[0])) == 1
    with pytest.raises(RagenError, match="k must be a positive integer"):
        RagenLangChainRetriever(reference, k=0)
    with pytest.raises(RagenError, match="already open"):
        RagenLangChainRetriever(reference, model="minilm")
    with pytest.raises(RagenError, match="expected an index directory or a ragen Retriever"):
        RagenLangChainRetriever(42)
    with pytest.raises(StoreError, match="no ragen index here"):
        RagenLangChainRetriever(tmp_path / "missing")
    with pytest.raises(StoreError, match="built with encoder"):  # a model that did not build this index
        RagenLlamaIndexRetriever(tiny_index, model="minilm", device="cpu")
    with pytest.raises(RagenError, match="similarity_top_k"):
        RagenLlamaIndexRetriever(reference, similarity_top_k=0)


def test_langchain_embeddings_match_index_vectors(tiny_checkpoint, reference):
    """Query vectors from the LangChain adapter reproduce ragen's own search over the index."""
    emb = LLM2VecGenEmbeddings(str(tiny_checkpoint), device="cpu")
    vec = np.asarray(emb.embed_query(QUERIES[0]), dtype=np.float32)
    _same_hits([h.chunk_id for h in reference.search_vector(vec, k=3)],
               [h.score for h in reference.search_vector(vec, k=3)], reference.search(QUERIES[0], k=3))


def test_index_built_by_the_cli_is_usable_from_both_frameworks(corpus, tiny_checkpoint, tmp_path):
    """`ragen index` output feeds LlamaIndex and LangChain directly; results equal `ragen query --json`."""
    import json

    from typer.testing import CliRunner

    from ragen.cli import app

    index = tmp_path / "cli-index"
    runner = CliRunner()
    built = runner.invoke(app, ["index", str(corpus), "--index", str(index), "--model", str(tiny_checkpoint),
                                "--device", "cpu"])
    assert built.exit_code == 0, built.output
    queried = runner.invoke(app, ["query", QUERIES[0], "--index", str(index), "--json", "-k", "3", "--device", "cpu"])
    assert queried.exit_code == 0, queried.output
    cli_ids = [h["chunk_id"] for h in json.loads(queried.stdout)]
    li = RagenLlamaIndexRetriever(index, similarity_top_k=3, device="cpu")
    lc = RagenLangChainRetriever(index, k=3, device="cpu")
    assert [n.node.node_id for n in li.retrieve(QUERIES[0])] == cli_ids
    assert [d.metadata["chunk_id"] for d in lc.invoke(QUERIES[0])] == cli_ids


# ------------------------------------------------------------------------------------------------------------
# metadata filters
# ------------------------------------------------------------------------------------------------------------
def _expected_filtered(reference, query: str, k: int, keep) -> list:
    """ragen's full ranking with the predicate applied: what a filtered search must return."""
    return [h for h in reference.search(query, k=100) if keep(h)][:k]


def test_llama_index_retriever_filters(tiny_index, reference):
    from llama_index.core.vector_stores.types import (FilterCondition, FilterOperator, MetadataFilter,
                                                      MetadataFilters)

    only_sky = MetadataFilters(filters=[MetadataFilter(key="path", value="sky.txt")])
    li = RagenLlamaIndexRetriever(reference, similarity_top_k=3, filters=only_sky)
    got = li.retrieve(QUERIES[1])
    assert [n.node.metadata["path"] for n in got] == ["sky.txt"]
    _same_hits([n.node.node_id for n in got], [n.score for n in got],
               _expected_filtered(reference, QUERIES[1], 3, lambda h: h.path == "sky.txt"))

    either = MetadataFilters(filters=[MetadataFilter(key="path", value=["paris.md", "cache.txt"],
                                                     operator=FilterOperator.IN),
                                      MetadataFilter(key="chunk_id", value="plants/",
                                                     operator=FilterOperator.TEXT_MATCH)],
                             condition=FilterCondition.OR)
    got = RagenLlamaIndexRetriever(reference, similarity_top_k=5, filters=either).retrieve(QUERIES[0])
    keep = lambda h: h.path in ("paris.md", "cache.txt") or "plants/" in h.chunk_id  # noqa: E731
    _same_hits([n.node.node_id for n in got], [n.score for n in got],
               _expected_filtered(reference, QUERIES[0], 5, keep))
    assert {n.node.metadata["path"] for n in got} == {"paris.md", "cache.txt", "plants/leaf.txt"}

    not_paris = MetadataFilters(filters=[MetadataFilter(key="path", value="paris.md")], condition=FilterCondition.NOT)
    got = asyncio.run(RagenLlamaIndexRetriever(reference, similarity_top_k=5, filters=not_paris).aretrieve(QUERIES[1]))
    assert len(got) == 4 and "paris.md" not in {n.node.metadata["path"] for n in got}
    assert [n.score for n in got] == sorted((n.score for n in got), reverse=True)


def test_llama_index_retriever_bad_filters(reference):
    from llama_index.core.vector_stores.types import FilterOperator, MetadataFilter, MetadataFilters

    with pytest.raises(RagenError, match=r"cannot filter on metadata key 'author'.*path, chunk_id, start, end"):
        RagenLlamaIndexRetriever(reference, filters=MetadataFilters(filters=[MetadataFilter(key="author", value="x")]))
    with pytest.raises(RagenError, match="list-valued metadata"):
        RagenLlamaIndexRetriever(reference, filters=MetadataFilters(
            filters=[MetadataFilter(key="path", value=["a"], operator=FilterOperator.ANY)]))
    with pytest.raises(RagenError, match="must be llama_index MetadataFilters"):
        RagenLlamaIndexRetriever(reference, filters={"path": "sky.txt"})


# ------------------------------------------------------------------------------------------------------------
# LangChain: a normal pydantic BaseRetriever; k and filter per call
# ------------------------------------------------------------------------------------------------------------
def test_langchain_retriever_is_a_normal_runnable(tiny_index, reference):
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.runnables import ConfigurableField

    lc = RagenLangChainRetriever(str(tiny_index), k=3, device="cpu", name="ragen-docs", tags=["t"])
    assert lc.get_name() == "ragen-docs" and lc.model_dump()["k"] == 3 and lc.model_dump()["index"] == str(tiny_index)
    # k honoured per call, as VectorStoreRetriever honours its search kwargs
    assert [d.id for d in lc.invoke(QUERIES[0], k=1)] == [h.chunk_id for h in reference.search(QUERIES[0], k=1)]
    assert len(lc.invoke(QUERIES[0])) == 3
    assert len(asyncio.run(lc.ainvoke(QUERIES[0], k=2))) == 2
    with pytest.raises(RagenError, match="k must be a positive integer"):
        lc.invoke(QUERIES[0], k=0)
    # configurable_fields / with_config rebuild the retriever with another k
    configurable = lc.configurable_fields(k=ConfigurableField(id="top_k"))
    assert len(configurable.with_config(configurable={"top_k": 1}).invoke(QUERIES[1])) == 1
    assert len(configurable.invoke(QUERIES[1])) == 3
    # callbacks see the run under its name; batch/abatch equal invoke
    events = []

    class Recorder(BaseCallbackHandler):
        def on_retriever_start(self, serialized, query, **kw):
            events.append(("start", query, kw.get("name")))

        def on_retriever_end(self, documents, **kw):
            events.append(("end", len(documents)))

    lc.invoke(QUERIES[2], config={"callbacks": [Recorder()]})
    assert events == [("start", QUERIES[2], "ragen-docs"), ("end", 3)]
    batched = lc.batch(QUERIES)
    assert [[d.id for d in docs] for docs in batched] == [[d.id for d in lc.invoke(q)] for q in QUERIES]
    assert [[d.id for d in docs] for docs in asyncio.run(lc.abatch(QUERIES))] == [[d.id for d in b] for b in batched]
    with pytest.raises(RagenError, match="top_k=3: Extra inputs are not permitted"):
        RagenLangChainRetriever(str(tiny_index), top_k=3)


def test_langchain_retriever_filters(tiny_index, reference):
    lc = RagenLangChainRetriever(reference, k=2, filter={"path": "sky.txt"})
    assert [d.metadata["path"] for d in lc.invoke(QUERIES[1])] == ["sky.txt"]
    docs = lc.invoke(QUERIES[1], filter={"path": {"$in": ["paris.md", "cache.txt"]}})  # per-call override
    _same_hits([d.id for d in docs], [d.metadata["score"] for d in docs],
               _expected_filtered(reference, QUERIES[1], 2, lambda h: h.path in ("paris.md", "cache.txt")))
    assert [d.metadata["rank"] for d in docs] == [1, 2]
    either = {"$or": [{"path": ["proofs.md"]}, {"chunk_id": {"$contains": "plants/"}}]}
    got = {d.metadata["path"] for d in RagenLangChainRetriever(reference, k=5, filter=either).invoke(QUERIES[0])}
    assert got == {"proofs.md", "plants/leaf.txt"}
    not_paris = {"$not": {"path": "paris.md"}, "start": {"$gte": 0}}
    assert "paris.md" not in {d.metadata["path"] for d in
                              RagenLangChainRetriever(reference, k=5, filter=not_paris).invoke(QUERIES[1])}
    # a callable over Documents, as InMemoryVectorStore takes
    by_doc = RagenLangChainRetriever(reference, k=5, filter=lambda doc: doc.metadata["path"].endswith(".md"))
    assert {d.metadata["path"] for d in by_doc.invoke(QUERIES[0])} == {"paris.md", "proofs.md"}
    with pytest.raises(RagenError, match=r"cannot filter on metadata key 'author'"):
        RagenLangChainRetriever(reference, filter={"author": "x"})
    with pytest.raises(RagenError, match=r"unknown filter operator '\$regex'"):
        lc.invoke(QUERIES[0], filter={"path": {"$regex": "a"}})
