"""Adapters for the RAG frameworks users already run; each needs its extra and is imported on demand.

- ``ragen.integrations.llama_index``: ``LLM2VecGenEmbedding``, ``RagenFaissVectorStore``,
  ``RagenLlamaIndexRetriever`` (``pip install "ragen-toolkit[llama-index]"``).
- ``ragen.integrations.langchain``: ``LLM2VecGenEmbeddings``, ``RagenLangChainRetriever``
  (``pip install "ragen-toolkit[langchain]"``).

This package itself imports neither framework.
"""
