"""``ragen encode`` and ``ragen decode``: embed texts, or show what their embeddings say."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from ._common import app, default_model, out, run_command
from ._options import CompileOpt
from ..errors import RagenError

_REVISION_HELP = "Hub revision (branch, tag or commit) of the model; pins what a hub id loads."
_TRUST_HELP = "Allow a checkpoint or backbone that ships its own Python code (auto_map) to run it. Off by default."


def _read_texts(texts: list[str], file: str | None) -> list[str]:
    """Texts from arguments, or one per non-blank line of a UTF-8 file (``-`` for stdin)."""
    if not file:
        return list(texts)
    where = "stdin" if file == "-" else file
    try:
        if file == "-":
            stream = getattr(sys.stdin, "buffer", None)
            raw = stream.read() if stream is not None else sys.stdin.read().encode("utf-8", "surrogateescape")
        else:
            with open(file, "rb") as f:
                raw = f.read()
    except FileNotFoundError:
        raise RagenError(f"{file}: no such file") from None
    except IsADirectoryError:
        raise RagenError(f"{file}: is a directory; expected a text file, one text per line") from None
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RagenError(f"{where}: not valid UTF-8 (byte {exc.start}); expected a UTF-8 text file, one text per "
                         "line") from None
    return [line for line in content.splitlines() if line.strip()] + list(texts)


def _check_finite(vectors, items: list[str]) -> None:
    import numpy as np

    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad.size:
        raise RagenError(f"the model produced NaN/inf for {bad.size} of {len(items)} text(s) (first: text "
                         f"{int(bad[0]) + 1}); its weights or dtype overflow, try --device cpu or another checkpoint")


@app.command()
def encode(
    texts: Annotated[Optional[list[str]], typer.Argument(help="Texts to embed.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Encoder spec (checkpoint, minilm, st:..., mean:...). Default: $RAGEN_MODEL or the Qwen3-0.6B checkpoint.")] = None,
    base_model: Annotated[Optional[str], typer.Option(help="Local backbone directory (overrides run_config.yml).")] = None,
    file: Annotated[Optional[str], typer.Option("--file", "-f", help="Read texts from a UTF-8 file, one per line ('-' = stdin).")] = None,
    kind: Annotated[str, typer.Option(help="query or document: which instruction to apply.")] = "query",
    normalize: Annotated[bool, typer.Option(help="L2-normalise the vectors.")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1, mps ... (default: auto).")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    numerics: Annotated[str, typer.Option(help="fp32 (heads and mean in float32) or reference (in the checkpoint dtype, bit-identical to the reference package).")] = "fp32",
    revision: Annotated[Optional[str], typer.Option(help=_REVISION_HELP)] = None,
    base_revision: Annotated[Optional[str], typer.Option(help="Hub revision of the checkpoint's backbone.")] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help=_TRUST_HELP)] = False,
    compile_backbone: CompileOpt = False,
) -> None:
    """Embed texts and print one JSON object per line: {"text", "embedding"}."""

    def body() -> None:
        from ..encoders import load_encoder

        items = _read_texts(texts or [], file)
        if not items:
            raise RagenError("no texts given; pass them as arguments or with --file")
        if kind not in ("query", "document"):
            raise RagenError(f"--kind must be query or document, got {kind!r}")
        enc = load_encoder(model or default_model(), device=device, base_model=base_model, revision=revision,
                           base_revision=base_revision, trust_remote_code=trust_remote_code, numerics=numerics,
                           compile=compile_backbone)
        fn = enc.encode_queries if kind == "query" else enc.encode_documents
        vecs = fn(items, batch_size=batch_size, normalize=normalize)
        _check_finite(vecs, items)
        for text, vec in zip(items, vecs):
            out.print(json.dumps({"text": text, "embedding": [round(float(x), 7) for x in vec]}), highlight=False,
                      soft_wrap=True, markup=False)

    run_command(body)


@app.command()
def decode(
    texts: Annotated[Optional[list[str]], typer.Argument(help="Texts whose embeddings to decode.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="LLM2Vec-Gen checkpoint (directory or hub id).")] = None,
    base_model: Annotated[Optional[str], typer.Option(help="Local backbone directory (overrides run_config.yml).")] = None,
    file: Annotated[Optional[str], typer.Option("--file", "-f", help="Read texts from a UTF-8 file, one per line ('-' = stdin).")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    kind: Annotated[str, typer.Option(help="query or document: whose instruction to decode under.")] = "query",
    instruction: Annotated[Optional[str], typer.Option(help="Prefix applied before encoding. Default: the model's instruction for --kind (what `ragen query --explain` uses); '' decodes the bare text.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per line: {text, instruction, decoded}.")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1, mps ... (default: auto).")] = None,
    revision: Annotated[Optional[str], typer.Option(help=_REVISION_HELP)] = None,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help=_TRUST_HELP)] = False,
) -> None:
    """Show what each text's embedding "says": greedy decoding from its reconstruction states."""

    def body() -> None:
        from rich.markup import escape
        from rich.table import Table

        from ..encoders import decode_instruction
        from ..encoders.llm2vec_gen import LLM2VecGen

        items = _read_texts(texts or [], file)
        if not items:
            raise RagenError("no texts given; pass them as arguments or with --file")
        if kind not in ("query", "document"):
            raise RagenError(f"--kind must be query or document, got {kind!r}")
        enc = LLM2VecGen.from_pretrained(model or default_model(), base_model=base_model, device=device,
                                         revision=revision, trust_remote_code=trust_remote_code)
        used = decode_instruction(enc, instruction, kind=kind)
        decoded = enc.decode(items, instruction=used, max_new_tokens=max_new_tokens)
        if as_json:
            for text, dec in zip(items, decoded):
                out.print(json.dumps({"text": text, "instruction": used, "decoded": dec}), highlight=False,
                          soft_wrap=True, markup=False)
            return
        table = Table("text", "decoded embedding", caption=f"instruction: {escape(used)!r}" if used else None)
        for text, dec in zip(items, decoded):
            table.add_row(escape(text), escape(dec))
        out.print(table)

    run_command(body)
