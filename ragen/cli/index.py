"""``ragen index``, ``ragen query`` and ``ragen info``: build an index from a folder, search it, inspect it."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import DEFAULT_MODEL, app, err, out, run_command
from ..errors import RagenError

DEFAULT_INDEX = os.path.join("indexes", "default")

IndexOpt = Annotated[str, typer.Option("--index", "-i", help="Index directory.")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... (default: GPU when available).")]


def _index_model(model: str | None, index_dir: Path) -> str:
    """--model, else $RAGEN_MODEL, else the model an existing index was built with, else the default."""
    if model:
        return model
    if os.environ.get("RAGEN_MODEL"):
        return os.environ["RAGEN_MODEL"]
    from ..store import read_manifest

    if (index_dir / "chunks.sqlite").exists():
        try:
            return str(read_manifest(index_dir)["encoder"]["spec"])
        except RagenError:
            pass  # incomplete or unreadable: the writer reports it properly
    return DEFAULT_MODEL


def _load(spec: str, device: str | None, base_model: str | None = None):
    from ..encoders import load_encoder

    with err.status(f"loading model [bold]{spec}[/] ...", spinner="dots"):
        return load_encoder(spec, device=device, base_model=base_model)


def _recorded_base_model(index_dir: Path, spec: str) -> str | None:
    """The backbone an existing index recorded for ``spec`` (so re-runs work offline without repeating it)."""
    from ..store import read_manifest

    if (index_dir / "chunks.sqlite").exists():
        try:
            enc = read_manifest(index_dir)["encoder"]
        except RagenError:
            return None
        if enc.get("spec") in (spec, str(Path(spec).expanduser().resolve())):
            return enc.get("base_model")
    return None


BaseModelOpt = Annotated[Optional[str], typer.Option(
    "--base-model", help="Local backbone directory for an LLM2Vec-Gen checkpoint (overrides its run_config.yml; "
                         "recorded in the index).")]


@app.command()
def index(
    path: Annotated[str, typer.Argument(help="Folder (or single file) to index.")],
    index_dir: IndexOpt = DEFAULT_INDEX,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Encoder spec. Default: $RAGEN_MODEL, else the model the index was built with, else McGill-NLP/LLM2Vec-Gen-Qwen3-06B.")] = None,
    chunk_size: Annotated[int, typer.Option(help="Characters per chunk.")] = 1000,
    chunk_overlap: Annotated[int, typer.Option(help="Characters shared by consecutive chunks.")] = 200,
    batch_size: Annotated[int, typer.Option(min=1, help="Chunks per encoder batch (and per committed write).")] = 32,
    device: DeviceOpt = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Re-embed everything instead of updating.")] = False,
    index_type: Annotated[str, typer.Option(help="flat (exact), hnsw or ivf (approximate, for large corpora).")] = "flat",
    base_model: BaseModelOpt = None,
) -> None:
    """Index a folder: embed new or changed chunks, drop deleted files, write the index atomically."""

    def body() -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        from rich.table import Table

        from ..corpus import ChunkingConfig
        from ..retriever import build_index, scan_source
        from ..store import IndexConfig, check_unlocked

        src = Path(path).expanduser()
        if not src.exists():
            raise RagenError(f"{path}: no such file or directory")
        ChunkingConfig(chunk_size, chunk_overlap)  # validate before loading a model
        config = IndexConfig(kind=index_type)
        target = Path(index_dir).expanduser()
        check_unlocked(target)
        scanned = scan_source(src, target)  # an empty or unsupported folder fails before the model loads
        spec = _index_model(model, target)
        encoder = _load(spec, device, base_model or _recorded_base_model(target, spec))

        columns = (TextColumn("[progress.description]{task.description:<10}"), BarColumn(),
                   MofNCompleteColumn(), TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                   TextColumn("[dim]{task.fields[detail]}"))
        with Progress(*columns, console=err, transient=False) as bar:
            tasks: dict[str, int] = {}

            def on_progress(event) -> None:
                if event.stage in ("read", "embed", "write") and event.stage not in tasks:
                    label = {"read": "files", "embed": "chunks", "write": "writing"}[event.stage]
                    tasks[event.stage] = bar.add_task(label, total=event.total or None, rate="", detail="")
                if event.stage not in tasks:
                    return
                task = tasks[event.stage]
                detail = event.detail[-40:] if event.stage == "read" else event.detail
                bar.update(task, completed=event.done, total=event.total or None, detail=detail)
                if event.stage == "embed":
                    speed = bar.tasks[task].speed if task < len(bar.tasks) else None
                    bar.update(task, rate=f"{speed:,.1f} vec/s" if speed else "")

            stats = build_index(src, target, encoder=encoder, chunk_size=chunk_size, chunk_overlap=chunk_overlap,
                                batch_size=batch_size, rebuild=rebuild, progress=on_progress, index_config=config,
                                scanned=scanned)

        for reason, n in stats.skipped:
            err.print(f"[yellow]skipped[/] {n} file{'s' if n != 1 else ''}: {reason}", highlight=False)
        if stats.files_with_replacements:
            names = ", ".join(stats.files_with_replacements[:3])
            more = f" and {len(stats.files_with_replacements) - 3} more" if len(stats.files_with_replacements) > 3 else ""
            err.print(f"[yellow]notice[/] undecodable bytes replaced with U+FFFD in {names}{more}", highlight=False)
        summary = Table(title=f"index {target}", show_header=False, title_justify="left")
        summary.add_row("files", f"{stats.files_indexed} indexed ({stats.files_changed} new or changed, "
                                 f"{stats.files_removed} removed, {stats.files_skipped} skipped) of {stats.files_seen} seen")
        summary.add_row("chunks", f"{stats.chunks_total} in index ({stats.chunks_embedded} embedded now, "
                                  f"{stats.chunks_removed} removed)")
        rate = f", {stats.chunks_embedded / stats.encode_seconds:,.1f} vec/s" if stats.encode_seconds > 0 else ""
        summary.add_row("time", f"{stats.seconds:.1f} s (encoding {stats.encode_seconds:.1f} s{rate})")
        summary.add_row("model", f"{encoder.spec} (dim {encoder.dim})")
        summary.add_row("index", f"{stats.index_kind}, generation {stats.generation}")
        out.print(summary)

    run_command(body)


def _snippet(text: str, width: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


@app.command()
def query(
    text: Annotated[str, typer.Argument(help="The question or search text.")],
    index_dir: IndexOpt = DEFAULT_INDEX,
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, help="Number of hits.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON array of hits and nothing else on stdout.")] = False,
    explain: Annotated[bool, typer.Option("--explain", help="Also show what the query embedding decodes to (LLM2Vec-Gen models).")] = False,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Encoder spec (default: the one the index was built with).")] = None,
    device: DeviceOpt = None,
    base_model: BaseModelOpt = None,
) -> None:
    """Search an index; print a ranked table, or JSON with --json."""

    def body() -> None:
        from rich.panel import Panel
        from rich.table import Table

        from ..retriever import Retriever
        from ..store import Store

        if not text.strip():
            raise RagenError("the query is empty")
        store = Store.open(index_dir, device=device)
        try:
            encoder = _load(model or store.spec, device, base_model or (store.base_model if model is None else None))
            retriever = Retriever(encoder, store)  # refuses an encoder the index was not built with
            hits = retriever.search(text, k=k)
            explanation = None
            if explain:
                if callable(getattr(encoder, "decode", None)):
                    with err.status("decoding the query embedding ...", spinner="dots"):
                        explanation = encoder.decode([text], instruction=getattr(encoder, "query_instruction", None))[0]
                else:
                    err.print(f"[yellow]notice[/] --explain needs an LLM2Vec-Gen model; {encoder.spec} embeds the "
                              "input text and has nothing to decode", highlight=False)
        finally:
            store.close()
        if as_json:
            if explanation is not None:
                err.print(Panel(explanation, title="the query embedding decodes to"))
            print(json.dumps([{"rank": h.rank, "score": round(h.score, 6), "path": h.path, "chunk_id": h.chunk_id,
                               "text": h.text, "start": h.start, "end": h.end} for h in hits], ensure_ascii=False))
            return
        if explanation is not None:
            out.print(Panel(explanation or "(empty)", title="the query embedding decodes to", title_align="left"))
        if not hits:
            err.print("no hits: the index is empty")
            return
        table = Table("rank", "score", "path", "snippet", title=f"{text}", title_justify="left")
        for h in hits:
            table.add_row(str(h.rank), f"{h.score:.3f}", h.chunk_id, _snippet(h.text))
        out.print(table)

    run_command(body)


@app.command()
def info(
    index_dir: IndexOpt = DEFAULT_INDEX,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest and file statistics as JSON.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Also check every index file against its recorded SHA-256 and the database's integrity (reads everything).")] = False,
) -> None:
    """Show what is in an index and how it was built."""

    def body() -> None:
        from rich.table import Table

        from ..store import Store, index_is_locked

        with Store.open(index_dir, device="cpu") as store:
            manifest = store.manifest
            files = store.files()
            size = store.disk_bytes()
            verified = store.verify() if verify else None
        by_type = Counter(Path(p).suffix.lower() or Path(p).name for p, *_ in files)
        busy = index_is_locked(index_dir)
        if as_json:
            print(json.dumps({**manifest, "index_dir": str(Path(index_dir).resolve()), "disk_bytes": size,
                              "file_types": dict(by_type.most_common()), "being_written": busy,
                              **({"verified": verified} if verified is not None else {})}, indent=2))
            return
        enc = manifest["encoder"]
        counts = manifest.get("counts", {})
        ch = manifest.get("chunking", {})
        idx = manifest.get("index", {})
        table = Table(title=f"index {index_dir}", show_header=False, title_justify="left")
        table.add_row("encoder", enc["spec"])
        if enc.get("base_model"):
            table.add_row("base model", str(enc["base_model"]))
        table.add_row("fingerprint", f"{enc['fingerprint']} (dim {enc['dim']}, {manifest.get('normalization')}-normalised, "
                                     f"{manifest.get('metric', 'inner_product').replace('_', ' ')})")
        if enc.get("query_instruction") is not None or enc.get("document_instruction") is not None:
            table.add_row("instructions", f"query: {enc.get('query_instruction')!r}\ndocument: {enc.get('document_instruction')!r}")
        table.add_row("contents", f"{counts.get('files', 0)} files, {counts.get('chunks', 0)} chunks, "
                                  f"{counts.get('unique_vectors', 0)} unique vectors")
        table.add_row("file types", ", ".join(f"{t} {n}" for t, n in by_type.most_common(8)) or "-")
        table.add_row("chunking", f"{ch.get('chunk_size')} chars, overlap {ch.get('chunk_overlap')} ({ch.get('method')})")
        kind = idx.get("kind", "flat")
        params = idx.get("config", {})
        extra = {"hnsw": f" (M {params.get('hnsw_m')}, efSearch {params.get('hnsw_ef_search')})",
                 "ivf": f" (nprobe {params.get('ivf_nprobe')})"}.get(kind, " (exact)")
        table.add_row("faiss", f"{kind}{extra}, generation {manifest.get('generation')}, {size / 1e6:.1f} MB on disk")
        table.add_row("source", str(manifest.get("source")))
        table.add_row("built", f"created {manifest.get('created_at')}, updated {manifest.get('updated_at')} "
                               f"(ragen {manifest.get('ragen_version')}, format {manifest.get('format_version')})")
        if verified is not None:
            table.add_row("verified", "SHA-256 of " + ", ".join(sorted(verified["files"])) + "; database integrity ok")
        if busy:
            table.add_row("status", "[yellow]being written by another process right now[/]")
        out.print(table)

    run_command(body)
