"""Adapters for the RAG frameworks users already run; each needs its extra and is imported on demand.

- ``ragen.integrations.llama_index``: ``LLM2VecGenEmbedding``, ``RagenVectorStore`` (read-write over a
  ragen index), ``RagenFaissVectorStore``, ``RagenLlamaIndexRetriever``
  (``pip install "ragen-toolkit[llama-index]"``).
- ``ragen.integrations.langchain``: ``LLM2VecGenEmbeddings``, ``RagenVectorStore`` (read-write over a ragen
  index), ``RagenLangChainRetriever`` (``pip install "ragen-toolkit[langchain]"``).
- ``ragen.integrations.sentence_transformers``: ``LLM2VecGenSentenceTransformer``, the SentenceTransformer
  API over any ragen encoder (torch and numpy only).

This package itself imports neither framework.
"""
