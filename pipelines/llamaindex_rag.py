"""A LlamaIndex RAG app over a folder, embedding with LLM2Vec-Gen (or a baseline such as the bundled MiniLM).

    python pipelines/llamaindex_rag.py docs/ "How do I rotate the API keys?" --model McGill-NLP/LLM2Vec-Gen-Qwen3-06B
    python pipelines/llamaindex_rag.py docs/ "How do I rotate the API keys?" --model minilm --persist-dir .li-store
    python pipelines/llamaindex_rag.py docs/ "How do I rotate the API keys?" --model minilm --llm ~/models/Qwen3-0.6B
    python pipelines/llamaindex_rag.py indexes/docs "How do I rotate the API keys?"  # built by `ragen index`

FOLDER is a folder of documents (embedded into a FAISS-backed VectorStoreIndex) or a ragen index directory
(searched as-is, no re-embedding). Without --llm it retrieves and prints the sources; with --llm (a local
Hugging Face causal LM directory) LlamaIndex synthesises an answer from them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llama_index.core import (Settings, SimpleDirectoryReader, StorageContext, VectorStoreIndex,
                              load_index_from_storage)
from llama_index.core.llms import CompletionResponse, CustomLLM, LLMMetadata
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.vector_stores.types import FilterOperator, MetadataFilter, MetadataFilters

from ragen import RagenError
from ragen.integrations.llama_index import LLM2VecGenEmbedding, RagenFaissVectorStore, RagenLlamaIndexRetriever


class LocalLLM(CustomLLM):
    """Adapts pipelines/_local_llm.py's generator to LlamaIndex's LLM interface."""

    model_name: str = "local"

    def __init__(self, generator) -> None:
        super().__init__(model_name=generator.name)
        self._generate = generator

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name=self.model_name, num_output=self._generate.max_new_tokens)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs) -> CompletionResponse:
        return CompletionResponse(text=self._generate(prompt))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs):
        yield self.complete(prompt)


def folder_index(folder: Path, embed: LLM2VecGenEmbedding, persist_dir: Path | None, rebuild: bool):
    """Build (or reload) a FAISS-backed VectorStoreIndex over ``folder``."""
    marker = persist_dir / "ragen_embedding.json" if persist_dir else None
    if marker and marker.exists() and not rebuild:
        saved = json.loads(marker.read_text())
        if saved["model_name"] != embed.model_name:
            raise SystemExit(f"{persist_dir} was built with {saved['model_name']!r}; pass --rebuild to re-embed")
        store = RagenFaissVectorStore.from_persist_dir(str(persist_dir))
        return load_index_from_storage(StorageContext.from_defaults(vector_store=store, persist_dir=str(persist_dir)))
    documents = SimpleDirectoryReader(str(folder), recursive=True).load_data()
    for doc in documents:  # embed the text alone, as ragen does; file paths still reach the LLM
        doc.excluded_embed_metadata_keys = list(doc.metadata)
    store = RagenFaissVectorStore.create(embed.dim)
    index = VectorStoreIndex.from_documents(documents, storage_context=StorageContext.from_defaults(vector_store=store))
    if persist_dir:
        index.storage_context.persist(persist_dir=str(persist_dir))
        marker.write_text(json.dumps({"model_name": embed.model_name, "dim": embed.dim}))
    return index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="folder of .txt/.md/.pdf/... files, or a ragen index directory")
    ap.add_argument("question")
    ap.add_argument("--model", default=None, help="encoder spec: checkpoint dir or hub id, minilm, st:NAME, "
                    "mean:BACKBONE (default: McGill-NLP/LLM2Vec-Gen-Qwen3-06B, or the one a ragen index records)")
    ap.add_argument("--base-model", default=None, help="backbone override for LLM2Vec-Gen checkpoints")
    ap.add_argument("--device", default=None)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--filter-path", default=None, help="only chunks whose path contains this text, e.g. guides/")
    ap.add_argument("--persist-dir", type=Path, default=None, help="save the index here and reuse it next time")
    ap.add_argument("--rebuild", action="store_true", help="re-embed even if --persist-dir holds an index")
    ap.add_argument("--llm", default=None, help="local Hugging Face causal LM directory for answer synthesis")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    args = ap.parse_args()
    try:
        run(args)
    except RagenError as exc:  # bad input: one line, no traceback
        sys.exit(f"error: {exc}")


def run(args: argparse.Namespace) -> None:
    is_ragen_index = (args.folder / "chunks.sqlite").is_file()
    where = None
    if args.filter_path:
        if not is_ragen_index:  # LlamaIndex's FAISS store keeps no metadata to filter on
            raise RagenError("--filter-path needs FOLDER to be a ragen index (built by `ragen index`); a FAISS "
                             "VectorStoreIndex cannot filter, ragen's RagenVectorStore can")
        where = MetadataFilters(filters=[MetadataFilter(key="path", value=args.filter_path,
                                                        operator=FilterOperator.TEXT_MATCH)])
    if is_ragen_index:  # a ragen index: its own encoder embeds the question
        retriever = RagenLlamaIndexRetriever(str(args.folder), similarity_top_k=args.top_k, filters=where,
                                             model=args.model, device=args.device)
    else:
        if not args.folder.is_dir():
            raise RagenError(f"{args.folder}: not a folder")
        Settings.embed_model = LLM2VecGenEmbedding(model_name=args.model or "McGill-NLP/LLM2Vec-Gen-Qwen3-06B",
                                                   base_model=args.base_model, device=args.device)
        index = folder_index(args.folder, Settings.embed_model, args.persist_dir, args.rebuild)
        retriever = index.as_retriever(similarity_top_k=args.top_k)

    if args.llm:
        from _local_llm import LocalGenerator

        llm = LocalLLM(LocalGenerator(args.llm, device=args.device, max_new_tokens=args.max_new_tokens))
        response = RetrieverQueryEngine.from_args(retriever, llm=llm).query(args.question)
        print(f"Answer: {response.response}\n")
        nodes = response.source_nodes
    else:
        nodes = retriever.retrieve(args.question)
    print("Sources:")
    for rank, hit in enumerate(nodes, 1):
        source = hit.node.metadata.get("file_path") or hit.node.metadata.get("path", "?")
        snippet = " ".join(hit.node.get_content().split())[:160]
        print(f"{rank}. {hit.score:.4f}  {source}\n   {snippet}")


if __name__ == "__main__":
    main()
