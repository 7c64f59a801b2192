"""A LangChain retrieval chain over a ragen index (built here from a folder, or earlier with `ragen index`).

    python pipelines/langchain_retriever.py "How do I rotate the API keys?" --index indexes/docs
    python pipelines/langchain_retriever.py "How do I rotate the API keys?" --index .lc-index --folder docs/ --model minilm
    python pipelines/langchain_retriever.py "How do I rotate the API keys?" --index indexes/docs --llm ~/models/Qwen3-0.6B

Without --llm it prints the retrieved documents (and, with --show-prompt, the prompt an LLM would get);
with --llm (a local Hugging Face causal LM directory) the chain retriever | prompt | LLM answers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnableParallel, RunnablePassthrough

from ragen import RagenError
from ragen.encoders import load_encoder
from ragen.integrations.langchain import RagenLangChainRetriever
from ragen.retriever import Retriever, build_index

PROMPT = ChatPromptTemplate.from_template(
    "Answer the question using only the context. Cite the file paths you used.\n\n"
    "Context:\n{context}\n\nQuestion: {question}\nAnswer:")


def format_docs(docs) -> str:
    return "\n\n".join(f"[{d.metadata['path']}]\n{d.page_content}" for d in docs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("question")
    ap.add_argument("--index", type=Path, required=True, help="ragen index directory")
    ap.add_argument("--folder", type=Path, default=None, help="(re)index this folder into --index first (incremental)")
    ap.add_argument("--model", default=None, help="encoder spec for --folder (default: the one the index records, "
                                                  "else McGill-NLP/LLM2Vec-Gen-Qwen3-06B); minilm works offline")
    ap.add_argument("--device", default=None)
    ap.add_argument("-k", type=int, default=4, help="documents per question")
    ap.add_argument("--filter-path", default=None, help="only chunks whose path contains this text, e.g. guides/")
    ap.add_argument("--llm", default=None, help="local Hugging Face causal LM directory for the answer")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--show-prompt", action="store_true", help="without --llm: also print the filled prompt")
    args = ap.parse_args()
    try:
        run(args)
    except RagenError as exc:  # bad input: one line, no traceback
        sys.exit(f"error: {exc}")


def run(args: argparse.Namespace) -> None:
    # a metadata filter; the same dict works for RagenVectorStore.as_retriever(search_kwargs={"filter": ...})
    where = {"path": {"$contains": args.filter_path}} if args.filter_path else None
    if args.folder:  # build (incrementally) with an encoder, then search with that same loaded encoder
        encoder = load_encoder(args.model or "McGill-NLP/LLM2Vec-Gen-Qwen3-06B", device=args.device)
        build_index(args.folder, args.index, encoder=encoder)
        retriever = RagenLangChainRetriever(Retriever.open(args.index, encoder=encoder, device=args.device), k=args.k,
                                            filter=where)
    else:  # an existing index: its manifest names the model
        retriever = RagenLangChainRetriever(str(args.index), k=args.k, model=args.model, device=args.device,
                                            filter=where)

    # retrieve once, keep the documents as sources, fill the prompt from them, then (optionally) answer
    retrieve = RunnableParallel(docs=retriever, question=RunnablePassthrough())
    fill = RunnableLambda(lambda x: {"context": format_docs(x["docs"]), "question": x["question"]}) | PROMPT
    if args.llm:
        from _local_llm import LocalGenerator

        generate = LocalGenerator(args.llm, device=args.device, max_new_tokens=args.max_new_tokens)
        chain = retrieve.assign(answer=fill | RunnableLambda(lambda p: generate(p.to_string())) | StrOutputParser())
    else:
        chain = retrieve.assign(prompt=fill)
    result = chain.invoke(args.question)

    if "answer" in result:
        print(f"Answer: {result['answer']}\n")
    elif args.show_prompt:
        print(result["prompt"].to_string(), "\n")
    print("Sources:")
    for doc in result["docs"]:
        m = doc.metadata
        snippet = " ".join(doc.page_content.split())[:160]
        print(f"{m['rank']}. {m['score']:.4f}  {m['path']}  ({m['chunk_id']})\n   {snippet}")


if __name__ == "__main__":
    main()
