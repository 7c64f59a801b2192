"""``ragen encode`` and ``ragen decode``: embed texts, or show what their embeddings say."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from ._common import app, default_model, out, read_texts_arg, run_command
from ..errors import RagenError


@app.command()
def encode(
    texts: Annotated[Optional[list[str]], typer.Argument(help="Texts to embed.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Encoder spec (checkpoint, minilm, st:..., mean:...). Default: $RAGEN_MODEL or the Qwen3-0.6B checkpoint.")] = None,
    base_model: Annotated[Optional[str], typer.Option(help="Local backbone directory (overrides run_config.yml).")] = None,
    file: Annotated[Optional[str], typer.Option("--file", "-f", help="Read texts from a file, one per line ('-' = stdin).")] = None,
    kind: Annotated[str, typer.Option(help="query or document: which instruction to apply.")] = "query",
    normalize: Annotated[bool, typer.Option(help="L2-normalise the vectors.")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... (default: auto).")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
) -> None:
    """Embed texts and print one JSON object per line: {"text", "embedding"}."""

    def body() -> None:
        from ..encoders import load_encoder

        items = read_texts_arg(texts or [], file)
        if not items:
            raise RagenError("no texts given; pass them as arguments or with --file")
        if kind not in ("query", "document"):
            raise RagenError(f"--kind must be query or document, got {kind!r}")
        enc = load_encoder(model or default_model(), device=device, base_model=base_model)
        fn = enc.encode_queries if kind == "query" else enc.encode_documents
        vecs = fn(items, batch_size=batch_size, normalize=normalize)
        for text, vec in zip(items, vecs):
            out.print(json.dumps({"text": text, "embedding": [round(float(x), 7) for x in vec]}), highlight=False,
                      soft_wrap=True)

    run_command(body)


@app.command()
def decode(
    texts: Annotated[Optional[list[str]], typer.Argument(help="Texts whose embeddings to decode.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="LLM2Vec-Gen checkpoint (directory or hub id).")] = None,
    base_model: Annotated[Optional[str], typer.Option(help="Local backbone directory (overrides run_config.yml).")] = None,
    file: Annotated[Optional[str], typer.Option("--file", "-f", help="Read texts from a file, one per line.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    instruction: Annotated[Optional[str], typer.Option(help="Prefix applied before encoding (default: none).")] = None,
    device: Annotated[Optional[str], typer.Option()] = None,
) -> None:
    """Show what each text's embedding "says": greedy decoding from its compression states."""

    def body() -> None:
        from rich.table import Table

        from ..encoders.llm2vec_gen import LLM2VecGen

        items = read_texts_arg(texts or [], file)
        if not items:
            raise RagenError("no texts given; pass them as arguments or with --file")
        enc = LLM2VecGen.from_pretrained(model or default_model(), base_model=base_model, device=device)
        decoded = enc.decode(items, instruction=instruction, max_new_tokens=max_new_tokens)
        table = Table("text", "decoded embedding")
        for text, dec in zip(items, decoded):
            table.add_row(text, dec)
        out.print(table)

    run_command(body)
