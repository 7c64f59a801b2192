"""LLM2VecGenLLM (LlamaIndex) and ChatLLM2VecGen (LangChain): one loaded model embeds and answers; real
query engines and LCEL chains run on it; streaming and async give the same text as the plain calls."""

from __future__ import annotations

import asyncio

import pytest

from ragen.errors import RagenError
from ragen.rag import ChatGenerator

TEXTS = ["paris is the capital of france.", "photosynthesis turns light into sugar.",
         "rayleigh scattering makes the sky blue."]


def _same_storage(a, b) -> bool:
    pa = [p.data_ptr() for p in a.parameters()]
    return bool(pa) and pa == [p.data_ptr() for p in b.parameters()]


# --------------------------------------------------------------------------------------------------------
# LlamaIndex
# --------------------------------------------------------------------------------------------------------
def test_llama_index_settings_hold_one_model_and_the_query_engine_streams(tiny_checkpoint):
    pytest.importorskip("llama_index.core")
    from llama_index.core import Document, Settings, VectorStoreIndex
    from llama_index.core.llms import ChatMessage

    from ragen.integrations.llama_index import LLM2VecGenEmbedding
    from ragen.integrations.llama_index_llm import LLM2VecGenLLM

    emb = LLM2VecGenEmbedding(str(tiny_checkpoint), device="cpu")
    llm = LLM2VecGenLLM(str(tiny_checkpoint), device="cpu", max_new_tokens=12)
    old = (Settings._llm, Settings._embed_model)
    try:
        Settings.llm, Settings.embed_model = llm, emb
        assert Settings.llm.encoder is Settings.embed_model.encoder  # one cache entry, one model
        assert _same_storage(Settings.llm.generator.lm, Settings.embed_model.encoder.lm)
        assert LLM2VecGenLLM(embedding=emb).encoder is emb.encoder

        index = VectorStoreIndex.from_documents([Document(text=t) for t in TEXTS])
        plain = index.as_query_engine(similarity_top_k=2).query("why is the sky blue?")
        streamed = index.as_query_engine(similarity_top_k=2, streaming=True).query("why is the sky blue?")
        pieces = list(streamed.response_gen)
        assert len(pieces) > 1 and "".join(pieces) == str(plain)
        assert len(plain.source_nodes) == 2
    finally:
        Settings._llm, Settings._embed_model = old

    # complete / chat, their streams and async variants all decode the same greedy reply.
    direct = ChatGenerator.from_encoder(emb.encoder).complete([{"role": "user", "content": "hello"}], max_new_tokens=12)
    assert llm.complete("hello").text == direct
    chunks = list(llm.stream_complete("hello"))
    assert chunks[-1].text == direct and "".join(c.delta for c in chunks) == direct
    msgs = [ChatMessage(role="system", content="be brief."), ChatMessage(role="user", content="hello")]
    chat = llm.chat(msgs).message.content
    assert "".join(r.delta for r in llm.stream_chat(msgs)) == chat

    async def run():
        a = (await llm.acomplete("hello")).text
        b = [r.delta async for r in await llm.astream_complete("hello")]
        c = (await llm.achat(msgs)).message.content
        d = [r.delta async for r in await llm.astream_chat(msgs)]
        return a, "".join(b), c, "".join(d)

    assert asyncio.run(run()) == (direct, direct, chat, chat)
    assert llm.metadata.is_chat_model and llm.metadata.context_window == 2048


def test_llama_index_llm_needs_a_generating_model(minilm, tiny_checkpoint):
    pytest.importorskip("llama_index.core")
    from ragen.integrations.llama_index_llm import LLM2VecGenLLM

    with pytest.raises(RagenError, match="--llm"):
        LLM2VecGenLLM(encoder=minilm)
    with pytest.raises(RagenError, match="exactly one"):
        LLM2VecGenLLM()


# --------------------------------------------------------------------------------------------------------
# LangChain
# --------------------------------------------------------------------------------------------------------
def test_langchain_lcel_rag_chain_streams_on_one_model(tiny_checkpoint, tmp_path):
    pytest.importorskip("langchain_core")
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnablePassthrough

    from ragen import load_encoder
    from ragen.integrations.langchain import LLM2VecGenEmbeddings, RagenLangChainRetriever
    from ragen.integrations.langchain_chat import ChatLLM2VecGen
    from ragen.retriever import build_index

    docs = tmp_path / "docs"
    docs.mkdir()
    for i, t in enumerate(TEXTS):
        (docs / f"{i}.txt").write_text(t)
    build_index(docs, tmp_path / "idx", encoder=load_encoder(str(tiny_checkpoint), device="cpu"))

    embeddings = LLM2VecGenEmbeddings(str(tiny_checkpoint), device="cpu")
    chat = ChatLLM2VecGen(str(tiny_checkpoint), device="cpu", max_new_tokens=12)
    retriever = RagenLangChainRetriever(str(tmp_path / "idx"), k=2, device="cpu")
    assert chat.encoder is embeddings.encoder is retriever.retriever.encoder
    assert _same_storage(chat.generator.lm, embeddings.encoder.lm)

    prompt = ChatPromptTemplate.from_messages([("system", "answer from the context."),
                                               ("human", "context: {context}\nquestion: {question}")])
    chain = ({"context": retriever | (lambda ds: "\n".join(d.page_content for d in ds)), "question": RunnablePassthrough()}
             | prompt | chat | StrOutputParser())
    whole = chain.invoke("why is the sky blue?")
    pieces = list(chain.stream("why is the sky blue?"))
    assert len(pieces) > 1 and "".join(pieces) == whole

    class Tokens(BaseCallbackHandler):
        def __init__(self) -> None:
            self.tokens: list[str] = []

        def on_llm_new_token(self, token: str, **kwargs) -> None:
            self.tokens.append(token)

    seen = Tokens()
    text = "".join(c.content for c in chat.stream("hello", config={"callbacks": [seen]}))
    assert seen.tokens and "".join(seen.tokens) == text == chat.invoke("hello").content

    async def run():
        return (await chat.ainvoke("hello")).content, "".join([c.content async for c in chat.astream("hello")])

    assert asyncio.run(run()) == (text, text)
    result = chat.invoke("hello", stop=[text[2:4]]) if len(text) > 4 and text[2:4].strip() else None
    if result is not None:
        assert result.content == text[: text.find(text[2:4])]
