"""LLM2VecGenSentenceTransformer: the SentenceTransformer API over ragen encoders, against the encoders' own
vectors, the reference fixture's golden vectors, a real SentenceTransformer and real ST evaluators."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ragen.encoders.base import DEFAULT_DOCUMENT_INSTRUCTION, DEFAULT_QUERY_INSTRUCTION
from ragen.errors import RagenError
from ragen.integrations.sentence_transformers import LLM2VecGenSentenceTransformer

TEXTS = [
    "Photosynthesis turns light into sugar in the leaves of plants.",
    "Paris is the capital of France and its largest city.",
    "Rayleigh scattering makes short wavelengths scatter more, so the sky looks blue.",
]
QUERIES = ["why is the sky blue?", "what is the capital of france?"]
TOL = 1e-5


@pytest.fixture(scope="module")
def st_fixture(fixture_model):
    return LLM2VecGenSentenceTransformer(encoder=fixture_model)


def test_reference_fixture_vectors_and_instructions(st_fixture, fixture_model, golden):
    # prompt="" embeds the raw text: the reference implementation's golden vectors
    got = st_fixture.encode(golden["texts"], prompt="", batch_size=2)
    assert got.dtype == np.float32 and got.shape == (len(golden["texts"]), 48)
    assert np.abs(got - np.array(golden["embeddings_single"])).max() < TOL
    # queries and documents get LLM2Vec-Gen's two instructions, as the encoder applies them
    np.testing.assert_allclose(st_fixture.encode_query(QUERIES), fixture_model.encode_queries(QUERIES), atol=TOL)
    np.testing.assert_allclose(st_fixture.encode_query(QUERIES),
                               fixture_model.encode(QUERIES, instruction=DEFAULT_QUERY_INSTRUCTION), atol=TOL)
    np.testing.assert_allclose(st_fixture.encode_document(TEXTS),
                               fixture_model.encode(TEXTS, instruction=DEFAULT_DOCUMENT_INSTRUCTION), atol=TOL)
    assert not np.allclose(st_fixture.encode_query(TEXTS), st_fixture.encode_document(TEXTS), atol=1e-3)
    # plain encode() is the query side (the reference MTEB wrapper: everything but corpus passages)
    np.testing.assert_allclose(st_fixture.encode(TEXTS), st_fixture.encode_query(TEXTS), atol=TOL)
    for name in ("document", "passage", "corpus"):
        np.testing.assert_allclose(st_fixture.encode(TEXTS, prompt_name=name), st_fixture.encode_document(TEXTS),
                                   atol=TOL)
    np.testing.assert_allclose(st_fixture.encode(TEXTS, prompt="Find: "),
                               fixture_model.encode(TEXTS, instruction="Find: "), atol=TOL)
    assert st_fixture.get_sentence_embedding_dimension() == st_fixture.get_embedding_dimension() == 48


def test_output_options(st_fixture, fixture_model):
    plain = fixture_model.encode_queries(TEXTS)
    normed = st_fixture.encode(TEXTS, normalize_embeddings=True)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(normed, plain / np.linalg.norm(plain, axis=1, keepdims=True), atol=TOL)
    one = st_fixture.encode(TEXTS[0])
    assert one.shape == (48,)
    np.testing.assert_allclose(one, plain[0], atol=TOL)
    tensor = st_fixture.encode(TEXTS, convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (3, 48) and tensor.dtype == torch.float32
    rows = st_fixture.encode(TEXTS, convert_to_numpy=False)
    assert isinstance(rows, list) and len(rows) == 3 and all(isinstance(r, torch.Tensor) and r.shape == (48,)
                                                              for r in rows)
    cut = st_fixture.encode(TEXTS, truncate_dim=16, normalize_embeddings=True)
    np.testing.assert_allclose(cut, plain[:, :16] / np.linalg.norm(plain[:, :16], axis=1, keepdims=True), atol=TOL)
    assert st_fixture.encode(TEXTS, show_progress_bar=True, precision=None).shape == (3, 48)
    sims = st_fixture.similarity(st_fixture.encode_query(QUERIES), st_fixture.encode_document(TEXTS))
    q = fixture_model.encode_queries(QUERIES, normalize=True)
    d = fixture_model.encode_documents(TEXTS, normalize=True)
    assert isinstance(sims, torch.Tensor) and sims.shape == (2, 3)
    np.testing.assert_allclose(sims.numpy(), q @ d.T, atol=TOL)
    pair = st_fixture.similarity_pairwise(st_fixture.encode(TEXTS[:2]), st_fixture.encode_document(TEXTS[:2]))
    np.testing.assert_allclose(pair.numpy(), np.diag(st_fixture.similarity(st_fixture.encode(TEXTS[:2]),
                                                                            st_fixture.encode_document(TEXTS[:2]))),
                               atol=TOL)


def test_task_prompts_the_way_mteb_passes_them(fixture_model):
    prompts = {"ArguAna": "Given a claim, retrieve documents that support or refute the claim: "}
    model = LLM2VecGenSentenceTransformer(encoder=fixture_model, prompts=prompts)
    np.testing.assert_allclose(model.encode(QUERIES, task_name="ArguAna", prompt_type="query"),
                               fixture_model.encode(QUERIES, instruction=prompts["ArguAna"]), atol=TOL)
    np.testing.assert_allclose(model.encode(TEXTS, task_name="ArguAna", prompt_type="passage"),
                               fixture_model.encode_documents(TEXTS), atol=TOL)
    np.testing.assert_allclose(model.encode(QUERIES, prompt_name="ArguAna"),
                               fixture_model.encode(QUERIES, instruction=prompts["ArguAna"]), atol=TOL)
    np.testing.assert_allclose(model.encode_queries(QUERIES), fixture_model.encode_queries(QUERIES), atol=TOL)
    corpus = [{"title": "Sky", "text": TEXTS[2]}, {"text": TEXTS[0]}]
    np.testing.assert_allclose(model.encode_corpus(corpus),
                               fixture_model.encode_documents(["Sky " + TEXTS[2], TEXTS[0]]), atol=TOL)


def test_bad_arguments(fixture_model, st_fixture):
    with pytest.raises(RagenError, match="exactly one of"):
        LLM2VecGenSentenceTransformer()
    with pytest.raises(RagenError, match="prompt_name 'nope' is not one of the prompts"):
        st_fixture.encode(TEXTS, prompt_name="nope")
    with pytest.raises(RagenError, match="output_value='token_embeddings' is not available"):
        st_fixture.encode(TEXTS, output_value="token_embeddings")
    with pytest.raises(RagenError, match="precision='int8' is not supported"):
        st_fixture.encode(TEXTS, precision="int8")
    with pytest.raises(RagenError, match="truncate_dim must be between 1 and 48"):
        st_fixture.encode(TEXTS, truncate_dim=100)
    with pytest.raises(RagenError, match="default_prompt_name 'x'"):
        LLM2VecGenSentenceTransformer(encoder=fixture_model, default_prompt_name="x")


# ------------------------------------------------------------------------------------------------------------
# against a real SentenceTransformer and its evaluators
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_minilm(minilm):
    from sentence_transformers import SentenceTransformer

    from ragen.encoders.baselines import minilm_path

    return SentenceTransformer(str(minilm_path()), device="cpu")


def test_minilm_equals_a_real_sentence_transformer(real_minilm):
    model = LLM2VecGenSentenceTransformer("minilm", device="cpu")
    for ours, theirs in [
        (model.encode(TEXTS), real_minilm.encode(TEXTS)),
        (model.encode_query(QUERIES), real_minilm.encode_query(QUERIES)),
        (model.encode_document(TEXTS), real_minilm.encode_document(TEXTS)),
        (model.encode(TEXTS, prompt="query: ", normalize_embeddings=True),
         real_minilm.encode(TEXTS, prompt="query: ", normalize_embeddings=True)),
        (model.encode(TEXTS[0]), real_minilm.encode(TEXTS[0])),
    ]:
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, atol=TOL)
    np.testing.assert_allclose(model.similarity(model.encode(QUERIES), model.encode(TEXTS)).numpy(),
                               real_minilm.similarity(real_minilm.encode(QUERIES), real_minilm.encode(TEXTS)).numpy(),
                               atol=TOL)
    assert model.get_sentence_embedding_dimension() == real_minilm.get_embedding_dimension() == 384


def test_sentence_transformers_evaluators_accept_it(real_minilm):
    from sentence_transformers.sentence_transformer.evaluation import (EmbeddingSimilarityEvaluator,
                                                                        InformationRetrievalEvaluator)

    model = LLM2VecGenSentenceTransformer("minilm", device="cpu")
    sts = EmbeddingSimilarityEvaluator(["A man is playing a guitar.", "A woman is slicing onions.", "A dog runs."],
                                       ["A man plays the guitar.", "Stocks fell sharply today.", "A puppy is running."],
                                       [4.8, 0.2, 3.9])
    ir = InformationRetrievalEvaluator({"q1": QUERIES[0], "q2": QUERIES[1]},
                                       {f"d{i}": t for i, t in enumerate(TEXTS)}, {"q1": {"d2"}, "q2": {"d1"}})
    for evaluator in (sts, ir):
        ours, theirs = evaluator(model), evaluator(real_minilm)
        assert ours.keys() == theirs.keys()
        np.testing.assert_allclose(list(ours.values()), list(theirs.values()), atol=1e-6)
    assert ir(model)["cosine_ndcg@10"] == 1.0
    assert [name for name, *_ in model.model_card_data.metrics][:2] == ["EmbeddingSimilarityEvaluator",
                                                                       "InformationRetrievalEvaluator"]
