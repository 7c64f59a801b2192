"""``ragen index``, ``ragen query`` and ``ragen info``: build an index from a folder, search it, inspect it."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import clean, json_line, shown, verbose
from ._common import DEFAULT_MODEL, app, err, out, run_command
from ._options import (BaseRevisionOpt, CompileOpt, GuardConfigOpt, GuardOpt, NumericsOpt, RevisionOpt, TrustOpt,
                       encoder_options, guard_option)
from ..errors import RagenError

DEFAULT_INDEX = os.path.join("indexes", "default")

IndexOpt = Annotated[str, typer.Option("--index", "-i", metavar="DIR", help="Index directory.")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... (default: GPU when available).")]


def _index_model(model: str | None, index_dir: Path) -> str:
    """--model, else $RAGEN_MODEL, else the model an existing index was built with (or an interrupted
    first run was started with), else the default."""
    if model:
        return model
    if os.environ.get("RAGEN_MODEL"):
        return os.environ["RAGEN_MODEL"]
    recorded = _recorded(index_dir)
    spec = ((recorded or {}).get("encoder") or {}).get("spec")
    return str(spec) if isinstance(spec, str) and spec else DEFAULT_MODEL


def _load(spec: str, device: str | None, base_model: str | None = None, **options):
    from ..encoders import load_encoder

    with err.status(f"loading model [bold]{shown(spec)}[/] ...", spinner="dots"):
        return load_encoder(spec, device=device, base_model=base_model, **options)


def _recorded_base_model(index_dir: Path, spec: str) -> str | None:
    """The backbone an existing index recorded for ``spec`` (so re-runs work offline without repeating it)."""
    enc = ((_recorded(index_dir) or {}).get("encoder") or {})
    if enc.get("spec") in (spec, str(Path(spec).expanduser().resolve())):
        base = enc.get("base_model")
        return str(base) if isinstance(base, str) and base else None
    return None


BaseModelOpt = Annotated[Optional[str], typer.Option(
    "--base-model", help="Local backbone directory for an LLM2Vec-Gen checkpoint (overrides its run_config.yml; "
                         "recorded in the index).")]


def _recorded(target: Path) -> dict | None:
    from ..store import read_build_settings

    return read_build_settings(target)


def _resolve(name: str, given, recorded_value, default, changes: list[str], committed: bool):
    """The value of one build setting: given explicitly, else recorded in the index, else the default.
    A given value that differs from the committed index's is a deliberate rebuild and is announced."""
    if given is None:
        return default if recorded_value is None else recorded_value
    if committed and recorded_value is not None and given != recorded_value:
        changes.append(f"{name} {_show_setting(recorded_value)} -> {_show_setting(given)}")
    return given


def _show_setting(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value) + "]" if value else "none"
    return str(value)


def _patterns(values: Optional[list[str]]) -> tuple[str, ...] | None:
    """--include/--exclude values; None when not given; ``""`` alone clears the recorded patterns."""
    if values is None or values == []:
        return None
    return tuple(v for v in values if v != "")


def _up_to_date(target: Path, scanned, selection) -> list[tuple[str, str]] | None:
    """Whether a run would change nothing, so the model need not be loaded: every indexed file is still
    there and unchanged (same size and mtime; the bytes' SHA-256 too where the mtime is too close to the
    last read to trust), no interrupted run left work to commit, and every other scanned file still cannot
    be read (a remembered skip whose file did not change, else re-checked, which costs no model). Returns
    those files' ``(relpath, reason)``, or None when something changed."""
    from ..corpus import SkipFile, file_sha256, read_document, stat_verdict
    from ..store import Store

    from ..retriever import framework_documents

    def same(state, sf) -> bool:
        verdict = stat_verdict(state.size, state.mtime_ns, state.read_ns, sf)
        if verdict == "racy" and state.sha256 is not None:
            got = file_sha256(sf, selection.max_file_size)
            return got is not None and got[0] == state.sha256
        return verdict == "same"

    try:
        with Store.open(target, device="cpu") as store:
            indexed = store.file_states()
            remembered = store.remembered_skips()
            pending = store.staged_count()
        framework = framework_documents(target)  # a framework store's documents: not this folder's files
    except RagenError:
        return None  # unreadable or inconsistent: the writer reports it (and a rebuild fixes it)
    indexed = {p: st for p, st in indexed.items() if p not in framework}
    found = {f.relpath: f for f in scanned.files if f.relpath not in framework}
    if pending or not indexed or any(found.get(p) is None or not same(st, found[p]) for p, st in indexed.items()):
        return None
    unreadable = []
    for rel, sf in found.items():
        if rel not in indexed:
            old = remembered.get(rel)
            if old is not None and same(old.state, sf):
                unreadable.append((rel, old.reason))
                continue
            try:
                read_document(sf, max_file_size=selection.max_file_size)
            except SkipFile as why:
                unreadable.append((rel, str(why)))
                continue
            return None  # readable now: a new file, or one that was fixed
    return unreadable


@app.command()
def index(
    path: Annotated[str, typer.Argument(help="Folder (or single file) to index.")],
    index_dir: IndexOpt = DEFAULT_INDEX,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Encoder spec. Default: $RAGEN_MODEL, else the model the index was built with, else McGill-NLP/LLM2Vec-Gen-Qwen3-06B.")] = None,
    chunk_unit: Annotated[Optional[str], typer.Option(metavar="tokens|chars", help="What --chunk-size counts: the encoder's tokens (chunks that fit its input) or characters. Default: as the index was built, else tokens (chars for an encoder without a tokenizer).")] = None,
    chunk_size: Annotated[Optional[int], typer.Option(help="Tokens (or characters) per chunk. Default: as the index was built, else the encoder's input limit minus the document instruction and special tokens (chars: 1000).")] = None,
    chunk_overlap: Annotated[Optional[int], typer.Option(help="Tokens (or characters) shared by consecutive chunks. Default: as the index was built, else a fifth of the chunk (chars: 200).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Chunks per encoder batch (and per committed write).")] = 32,
    device: DeviceOpt = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Re-embed everything instead of updating.")] = False,
    index_type: Annotated[Optional[str], typer.Option(help="auto (by size: flat up to 100k vectors, ivf up to 1M, then ivfpq), flat (exact), hnsw, ivf or ivfpq (approximate, compressed). Default: as the index was built, else auto.")] = None,
    base_model: BaseModelOpt = None,
    include: Annotated[Optional[list[str]], typer.Option("--include", metavar="GLOB", help="Only files matching this glob (gitignore syntax, relative to PATH; repeatable), e.g. '*.md', 'docs/**'. Remembered; --include '' clears.")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", metavar="GLOB", help="Skip files and folders matching this glob (repeatable), e.g. 'benchmarks/**/report.json'. Remembered; --exclude '' clears.")] = None,
    gitignore: Annotated[Optional[bool], typer.Option("--gitignore/--no-gitignore", help="Inside a git repository, skip what its .gitignore files ignore. Default: as the index was built, else on.")] = None,
    max_file_size: Annotated[Optional[str], typer.Option(metavar="SIZE", help="Skip larger files, e.g. 50MB, 800k; 0: no limit. Default: as the index was built, else 50MB.")] = None,
    list_skipped: Annotated[bool, typer.Option("--list-skipped", help="Name every skipped file and folder with its reason.")] = False,
    verbose_flag: Annotated[bool, typer.Option("--verbose", "-v", help="--list-skipped, plus library warnings and notes.")] = False,
    revision: RevisionOpt = None,
    base_revision: BaseRevisionOpt = None,
    numerics: NumericsOpt = None,
    trust_remote_code: TrustOpt = None,
    compile_backbone: CompileOpt = False,
) -> None:
    """Index a folder: embed new or changed chunks, drop deleted files, write the index atomically.

    Settings (model, chunking, index type, file patterns, size cap) are recorded in the index and reused by
    a plain re-run; an explicitly different value rebuilds, and says so.
    """
    from . import _common

    if verbose_flag:
        _common._state["verbose"] = True

    def build(group, dev: str | None) -> None:
        from rich.table import Table

        from ..corpus import (CHUNK_UNITS, DEFAULT_CHUNK_OVERLAP, ChunkingConfig, FileSelection, default_token_overlap,
                              parse_size)
        from ..retriever import build_index, encoder_budget, resolve_chunking, scan_source
        from ..store import IndexConfig, check_unlocked

        src = Path(path).expanduser()
        if not os.path.lexists(src):
            raise RagenError(f"{path}: no such file or directory")
        target = Path(index_dir).expanduser()
        if target.exists() and src.is_dir() and target.resolve() == src.resolve():
            raise RagenError(f"--index {index_dir} is the folder being indexed; keep the index outside it "
                             "(or in a subfolder, which is then skipped)")
        check_unlocked(target)

        recorded = _recorded(target)
        committed = bool(recorded and recorded.get("committed"))
        rec_chunking = _dict((recorded or {}).get("chunking"))
        rec_files = FileSelection.from_dict(rec_chunking.get("files")) if "files" in rec_chunking else None
        rec_kind = _dict(_dict((recorded or {}).get("index")).get("config")).get("kind")
        rec_kind = rec_kind if isinstance(rec_kind, str) else None
        changes: list[str] = []
        if chunk_unit is not None and chunk_unit not in CHUNK_UNITS:
            raise RagenError(f"--chunk-unit {chunk_unit!r}: expected tokens or chars")
        rec_unit = rec_chunking.get("unit") if rec_chunking.get("unit") in CHUNK_UNITS else (
            "chars" if "chunk_size" in rec_chunking else None)  # indexes from before token chunking: characters
        unit = _resolve("chunk unit", chunk_unit, rec_unit, None, changes, committed)
        same_unit = unit == rec_unit  # sizes recorded in another unit mean nothing in this one
        size = _resolve("chunk size", chunk_size, _int(rec_chunking.get("chunk_size")) if same_unit else None, None,
                        changes, committed)
        overlap = _resolve("chunk overlap", chunk_overlap,
                           _int(rec_chunking.get("chunk_overlap")) if same_unit else None, None, changes, committed)
        if unit is not None and size is not None:  # validate before loading a model
            ChunkingConfig(size, overlap if overlap is not None else (
                default_token_overlap(size) if unit == "tokens" else DEFAULT_CHUNK_OVERLAP), unit)
        kind = _resolve("index type", index_type, rec_kind, "auto", changes, committed)
        config = IndexConfig(kind=kind)
        default_sel = FileSelection()
        selection = FileSelection(
            include=_resolve("--include", _patterns(include), rec_files and rec_files.include, (), changes, committed),
            exclude=_resolve("--exclude", _patterns(exclude), rec_files and rec_files.exclude, (), changes, committed),
            gitignore=_resolve("--gitignore", gitignore, rec_files and rec_files.gitignore, default_sel.gitignore,
                               changes, committed),
            max_file_size=_resolve("--max-file-size", None if max_file_size is None else parse_size(max_file_size),
                                   rec_files and rec_files.max_file_size, default_sel.max_file_size, changes,
                                   committed))

        rec_encoder = {k: v for k, v in _dict((recorded or {}).get("encoder")).items() if isinstance(v, str)}
        spec = _index_model(model, target)
        rebuild_now = rebuild
        if committed and rec_encoder.get("spec") and rec_encoder["spec"] not in (spec, _abs(spec)) and not rebuild:
            changes.append(f"model {rec_encoder['spec']} -> {spec}")
            rebuild_now = True  # another encoder: every vector is new
        elif committed and base_model and rec_encoder.get("base_model") and not rebuild \
                and rec_encoder["base_model"] not in (base_model, _abs(base_model)):
            changes.append(f"base model {rec_encoder['base_model']} -> {base_model}")
            rebuild_now = True
        same_model = bool(rec_encoder.get("spec")) and rec_encoder["spec"] in (spec, _abs(spec))
        load_opts, record_opts = encoder_options(_dict((recorded or {}).get("encoder")) if same_model else None,
                                                 revision=revision, base_revision=base_revision, numerics=numerics,
                                                 trust_remote_code=trust_remote_code)
        if compile_backbone:
            load_opts["compile"] = True  # a speed setting: every rank compiles, nothing is recorded
        if committed and same_model and not rebuild_now:
            for flag, given, key in (("revision", revision, "revision"), ("base revision", base_revision, "base_revision")):
                old = rec_encoder.get(key)
                if given is not None and old is not None and given != old:
                    changes.append(f"{flag} {old} -> {given}")
                    rebuild_now = True
        scanned = scan_source(src, target, selection)  # an empty or unsupported folder fails before the model loads

        if changes:
            err.print(f"[yellow]rebuilding[/] with a setting given explicitly: {shown('; '.join(changes))}",
                      highlight=False)
        elif committed and not rebuild_now and (unreadable := _up_to_date(target, scanned, selection)) is not None:
            counts = Counter(dict(scanned.skipped))
            counts.update(reason for _, reason in unreadable)
            _print_skips(scanned.skipped_files + unreadable, dict(counts), scanned, list_skipped or verbose())
            totals = _dict(recorded.get("counts"))
            enc = recorded["encoder"]
            summary = Table(title=f"index {shown(target)}", show_header=False, title_justify="left")
            n_skipped = scanned.files_skipped + len(unreadable)
            summary.add_row("files", f"{totals.get('files', 0)} indexed, all unchanged ({n_skipped} "
                                     f"skipped) of {len(scanned.files) + scanned.files_skipped} seen")
            summary.add_row("chunks", f"{totals.get('chunks', 0)} in index (0 embedded now): up to date, model not loaded")
            summary.add_row("model", f"{shown(enc.get('spec'))} (dim {enc.get('dim')})")
            summary.add_row("index", f"{_dict(recorded.get('index')).get('kind')}, generation {recorded.get('generation')}")
            out.print(summary)
            return

        base = base_model or _recorded_base_model(target, spec)
        encoder = _load(spec, dev, base, **load_opts)
        if group is not None:  # the other ranks load the same encoder, each on its own device
            group.start({"spec": spec, "base_model": base, "options": load_opts}, encoder)
        budget = encoder_budget(encoder)
        chunking = resolve_chunking(encoder, unit, size, overlap, budget)
        if chunking.unit == "tokens" and chunking.chunk_size > budget.max_text_tokens:
            err.print(f"[yellow]notice[/] --chunk-size {chunking.chunk_size} tokens is more than the "
                      f"{budget.max_text_tokens} of document text that fit {shown(encoder.spec)}'s {budget.limit}-token "
                      "input; longer chunks are truncated when embedded (counted below)", highlight=False)

        from ._progress import progress_display

        with progress_display() as bar:
            tasks: dict[str, int] = {}
            labels = {"read": ("files", "files"), "embed": ("chunks", "vec"), "write": ("writing", "")}

            def on_progress(event) -> None:
                if event.stage in labels and event.stage not in tasks:
                    label, unit = labels[event.stage]
                    tasks[event.stage] = bar.add(label, event.total or None, unit=unit)
                if event.stage in tasks:
                    bar.update(tasks[event.stage], event.done, event.total or None,
                               clean(event.detail, oneline=True)[-40:] if event.stage == "read" else "")

            stats = build_index(src, target, encoder=encoder, chunk_unit=chunking.unit, chunk_size=chunking.chunk_size,
                                chunk_overlap=chunking.chunk_overlap, batch_size=batch_size, rebuild=rebuild_now,
                                progress=on_progress, index_config=config, scanned=scanned, selection=selection,
                                load_options=record_opts, parallel=group)

        _print_skips(stats.skipped_files, dict(stats.skipped), scanned, list_skipped or verbose())
        if stats.files_with_replacements:
            names = ", ".join(stats.files_with_replacements[:3])
            more = f" and {len(stats.files_with_replacements) - 3} more" if len(stats.files_with_replacements) > 3 else ""
            err.print(f"[yellow]notice[/] undecodable bytes replaced with U+FFFD in {shown(names)}{more}", highlight=False)
        if config.kind != "auto" and stats.index_kind != config.kind:
            err.print(f"[yellow]notice[/] --index-type {config.kind} needs more vectors than the {stats.chunks_total} "
                      f"in this index (IVF: at least 78); built {stats.index_kind} (exact) instead; the next run "
                      f"with more text builds {config.kind}", highlight=False)
        summary = Table(title=f"index {shown(target)}", show_header=False, title_justify="left")
        resumed = f", {stats.files_resumed} of them extracted by an interrupted run" if stats.files_resumed else ""
        summary.add_row("files", f"{stats.files_indexed} indexed ({stats.files_changed} new or changed{resumed}, "
                                 f"{stats.files_removed} removed, {stats.files_skipped} skipped) of {stats.files_seen} seen")
        truncated = "" if stats.chunks_truncated is None else (
            f"{stats.chunks_truncated} truncated at the encoder's {stats.token_limit}-token limit, ")
        summary.add_row("chunks", f"{stats.chunks_total} in index ({stats.chunks_embedded} embedded now, {truncated}"
                                  f"{stats.chunks_removed} removed)")
        summary.add_row("chunking", f"{chunking.chunk_size} {chunking.unit} per chunk, overlap {chunking.chunk_overlap}")
        if stats.chunks_truncated:
            err.print(f"[yellow]notice[/] {stats.chunks_truncated} of the {stats.chunks_embedded} chunks embedded now "
                      f"were longer than the encoder's {stats.token_limit}-token input and lost their end; use a "
                      "smaller --chunk-size (or --chunk-unit tokens)", highlight=False)
        elif stats.chunks_truncated is None and stats.chunks_embedded:
            err.print("[yellow]notice[/] this encoder exposes no tokenizer: chunks were not checked against its "
                      "input limit", highlight=False)
        rate = f", {stats.chunks_embedded / stats.encode_seconds:,.1f} vec/s" if stats.encode_seconds > 0 else ""
        summary.add_row("time", f"{stats.seconds:.1f} s (encoding {stats.encode_seconds:.1f} s{rate})")
        summary.add_row("model", f"{shown(encoder.spec)} (dim {encoder.dim})")
        summary.add_row("index", f"{stats.index_kind}, generation {stats.generation}")
        if selection.include or selection.exclude:
            summary.add_row("patterns", shown(f"include {_show_setting(selection.include)}, "
                                              f"exclude {_show_setting(selection.exclude)}"))
        out.print(summary)

    def body() -> None:
        # torchrun / accelerate launch: rank 0 runs the whole command and is the only writer, the others embed
        from ..parallel import Group, detect_launch, rank_device

        launch = detect_launch()
        if not launch.active:
            build(None, device)
            return
        group = Group(launch)
        try:
            if not launch.is_main:
                from ..encoders import load_encoder  # no spinner: the other ranks print nothing but errors

                group.serve(lambda device, spec, base_model, options: load_encoder(spec, device=device,
                                                                                     base_model=base_model, **options),
                            rank_device(device, launch))
                return  # rank 0 reports errors (its own and the other ranks') and carries the exit code
            ok = False
            try:
                build(group, rank_device(device, launch))
                ok = True
            finally:
                group.stop(ok)
        finally:
            group.close()

    run_command(body)


def _dict(value) -> dict:
    """A manifest field that should be an object; {} for anything else (a hand-edited or foreign file)."""
    return value if isinstance(value, dict) else {}


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _abs(spec: str) -> str:
    local = Path(spec).expanduser()
    return str(local.resolve()) if local.exists() else spec


def _print_skips(skipped_files, counts: dict, scanned, name_all: bool) -> None:
    """Skipped files per reason (and skipped folders); every one by name with --list-skipped/--verbose."""
    for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        err.print(f"[yellow]skipped[/] {n} file{'s' if n != 1 else ''}: {shown(reason, oneline=True)}", highlight=False)
    for reason, n in sorted(scanned.folders_skipped.items(), key=lambda kv: (-kv[1], kv[0])):
        err.print(f"[yellow]skipped[/] {n} folder{'s' if n != 1 else ''}: {shown(reason, oneline=True)} (not entered)",
                  highlight=False)
    if name_all:
        for rel, reason in skipped_files:
            err.print(f"  skipped file {shown(rel, oneline=True)}: {shown(reason, oneline=True)}", highlight=False)
        for rel, reason in scanned.skipped_folders:
            err.print(f"  skipped folder {shown(rel, oneline=True)}/: {shown(reason, oneline=True)}", highlight=False)
    elif counts or scanned.folders_skipped:
        err.print("[dim]  (--list-skipped names them)[/]", highlight=False)


def _argument_text(text: str) -> str:
    """A command-line argument as text: bytes that are not valid UTF-8 (which Python keeps as lone surrogates,
    and no tokenizer accepts) are decoded with U+FFFD, and the user is told."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        fixed = text.encode("utf-8", "surrogateescape" if all("\udc80" <= c <= "\udcff" for c in text if
                                                              "\ud800" <= c <= "\udfff") else "surrogatepass")
        value = fixed.decode("utf-8", "replace")
        err.print("[yellow]notice[/] the query is not valid UTF-8; undecodable bytes were replaced with U+FFFD",
                  highlight=False)
        return value


def _snippet(text: str, width: int = 160) -> str:
    flat = " ".join(clean(text, oneline=True).split())
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
    guard: GuardOpt = False,
    guard_config: GuardConfigOpt = None,
    server: Annotated[Optional[str], typer.Option("--server", envvar="RAGEN_SERVER", help="URL of a running `ragen serve` (default: $RAGEN_SERVER): search there, with no model loaded here; --index then names a served index (default: its only one); API key from $RAGEN_API_KEY.")] = None,
    revision: RevisionOpt = None,
    base_revision: BaseRevisionOpt = None,
    numerics: NumericsOpt = None,
    trust_remote_code: TrustOpt = None,
    compile_backbone: CompileOpt = False,
) -> None:
    """Search an index; print a ranked table, or JSON with --json."""
    text = _argument_text(text)  # undecodable bytes in the argument: U+FFFD, and a notice

    def body() -> None:
        from rich.panel import Panel
        from rich.table import Table

        if not text.strip():
            raise RagenError("the query is empty")
        if server and guard_config:
            raise RagenError("--guard-config is read by the server: start it with `ragen serve --guard-config FILE`, "
                             "or pass --guard to use the served index's guard.json")
        found, blocked_remotely = None, False
        if server:  # a warm `ragen serve` embeds and searches (and runs the guard); no model loads here
            from ..serve.client import query_server

            reasons: list[str] = []
            hits, explanation = query_server(server, text, k=k, index=None if index_dir == DEFAULT_INDEX else index_dir,
                                             explain=explain, notice=lambda m: err.print(f"[yellow]notice[/] {m}"),
                                             guard=guard, blocked=reasons.append)
            for reason in reasons:
                err.print(f"[bold yellow]blocked[/] by the refusal guard: {shown(reason)}", highlight=False)
            blocked_remotely = bool(reasons)
        else:
            from ..retriever import Retriever
            from ..store import Store

            store = Store.open(index_dir, device=device)
            try:
                options, _ = encoder_options(store.manifest["encoder"] if model is None else None, revision=revision,
                                             base_revision=base_revision, numerics=numerics,
                                             trust_remote_code=trust_remote_code)
                if compile_backbone:
                    options["compile"] = True
                encoder = _load(model or store.spec, device, base_model or (store.base_model if model is None else None),
                                **options)
                retriever = Retriever(encoder, store, guard=guard_option(guard, guard_config))  # checks the encoder
                found = retriever.retrieve(text, k=k)
                hits = found.hits
                if found.blocked:
                    err.print(f"[bold yellow]blocked[/] by the refusal guard: {shown(found.verdict.reason)}", highlight=False)
                explanation = None
                if explain:
                    if callable(getattr(encoder, "decode", None)):
                        from ..encoders import decode_instruction

                        with err.status("decoding the query embedding ...", spinner="dots"):
                            explanation = encoder.decode([text], instruction=decode_instruction(encoder, kind="query"))[0]
                    else:
                        err.print(f"[yellow]notice[/] --explain needs an LLM2Vec-Gen model; {shown(encoder.spec)} embeds "
                                  "the input text and has nothing to decode", highlight=False)
            finally:
                store.close()
        if as_json:
            if explanation is not None:
                err.print(Panel(shown(explanation), title="the query embedding decodes to"))
            print(json_line([{"rank": h.rank, "score": round(h.score, 6), "path": h.path, "chunk_id": h.chunk_id,
                               "text": h.text, "start": h.start, "end": h.end} for h in hits]))
            return
        if explanation is not None:
            out.print(Panel(shown(explanation) or "(empty)", title="the query embedding decodes to", title_align="left"))
        if not hits:
            if not (blocked_remotely or (found is not None and found.blocked)):
                err.print("no hits: the index is empty")
            return
        table = Table("rank", "score", "chunk", "snippet", title=shown(text, oneline=True), title_justify="left")
        for h in hits:
            table.add_row(str(h.rank), f"{h.score:.3f}", shown(h.chunk_id, oneline=True), shown(_snippet(h.text)))
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

        from ..corpus import FileSelection, format_size
        from ..store import Store, index_is_locked

        with Store.open(index_dir, device="cpu") as store:
            manifest = store.manifest
            files = store.files()
            size = store.disk_bytes()
            verified = store.verify() if verify else None
        by_type = Counter(Path(p).suffix.lower() or Path(p).name for p, *_ in files)
        busy = index_is_locked(index_dir)
        total_chunks = sum(n for *_, n in files) or 1
        largest = sorted(files, key=lambda f: (-f[3], -f[1], f[0]))[:5]  # most chunks first, then bytes
        manifest = {**manifest, "largest_sources": [{"path": p, "bytes": s, "chunks": n,
                                                     "share_of_chunks": round(n / total_chunks, 4)}
                                                    for p, s, _, n in largest]}  # in --json too
        if as_json:
            print(json.dumps({**manifest, "index_dir": str(Path(index_dir).resolve()), "disk_bytes": size,
                              "file_types": dict(by_type.most_common()), "being_written": busy,
                              **({"verified": verified} if verified is not None else {})}, indent=2))
            return
        enc = manifest["encoder"]
        counts = manifest.get("counts", {})
        ch = manifest.get("chunking", {})
        idx = manifest.get("index", {})
        table = Table(title=f"index {shown(index_dir)}", show_header=False, title_justify="left")
        table.add_row("encoder", shown(enc["spec"]))
        if enc.get("base_model"):
            table.add_row("base model", shown(enc["base_model"]))
        table.add_row("fingerprint", f"{enc['fingerprint']} (dim {enc['dim']}, {manifest.get('normalization')}-normalised, "
                                     f"{manifest.get('metric', 'inner_product').replace('_', ' ')})")
        if enc.get("query_instruction") is not None or enc.get("document_instruction") is not None:
            table.add_row("instructions", shown(f"query: {enc.get('query_instruction')!r}\n"
                                                f"document: {enc.get('document_instruction')!r}"))
        table.add_row("contents", f"{counts.get('files', 0)} files, {counts.get('chunks', 0)} chunks, "
                                  f"{counts.get('unique_vectors', 0)} unique vectors")
        table.add_row("file types", shown(", ".join(f"{t} {n}" for t, n in by_type.most_common(8)) or "-"))
        table.add_row("largest sources", "\n".join(
            f"{shown(p, oneline=True)}: {n} chunk{'s' if n != 1 else ''} ({100 * n / total_chunks:.0f}%), {format_size(s)}"
            for p, s, _, n in largest) or "-")
        unit = ch.get("unit") if ch.get("unit") in ("tokens", "chars") else "chars"
        table.add_row("chunking", shown(f"{ch.get('chunk_size')} {unit}, overlap {ch.get('chunk_overlap')} ({ch.get('method')})"))
        resolved = enc.get("resolved_revisions")
        if enc.get("revision") or enc.get("base_revision") or isinstance(resolved, dict):
            asked = ", ".join(f"{name} {enc[key]}" for name, key in (("revision", "revision"),
                                                                     ("base revision", "base_revision")) if enc.get(key))
            commits = ", ".join(f"{k} {v if v else 'local directory'}" for k, v in resolved.items()) \
                if isinstance(resolved, dict) else "not recorded"
            table.add_row("revisions", shown(f"{asked + '; ' if asked else ''}resolved: {commits}"))
        if enc.get("numerics") or enc.get("trust_remote_code"):
            table.add_row("loading", shown(f"numerics {enc.get('numerics') or 'fp32'}, remote code "
                                           f"{'trusted' if enc.get('trust_remote_code') else 'refused'}"))
        kind = idx.get("kind", "flat")
        params = idx.get("config", {})
        extra = {"hnsw": f" (M {params.get('hnsw_m')}, efSearch {params.get('hnsw_ef_search')})",
                 "ivf": f" (nprobe {params.get('ivf_nprobe')})",
                 "ivfpq": f" ({idx.get('pq_m')}-byte codes{', OPQ' if params.get('opq') else ''}, nprobe "
                          f"{params.get('ivf_nprobe')})"}.get(kind, " (exact)")
        chosen = " (chosen by size: --index-type auto)" if params.get("kind") == "auto" else ""
        from ..store.faiss_index import IndexConfig as _IndexConfig, bytes_per_vector

        per_vector = idx.get("bytes_per_vector") or bytes_per_vector(kind, int(enc["dim"]), _IndexConfig.from_dict(params))
        per_vector = f", {per_vector} bytes per vector in memory"
        table.add_row("faiss", f"{kind}{extra}{chosen}, generation {manifest.get('generation')}, "
                               f"{size / 1e6:.1f} MB on disk{per_vector}")
        table.add_row("source", shown(manifest.get("source")))
        sel = ch.get("files") if isinstance(ch.get("files"), dict) else None
        if sel:
            fs = FileSelection.from_dict(sel)  # tolerant of a hand-edited manifest
            cap_text = format_size(fs.max_file_size) if fs.max_file_size else "no limit"
            table.add_row("file selection", shown(
                f"include {_show_setting(fs.include)}, exclude {_show_setting(fs.exclude)}, "
                f".gitignore {'honoured' if fs.gitignore else 'not used'}, max file size {cap_text}"))
        table.add_row("built", f"created {manifest.get('created_at')}, updated {manifest.get('updated_at')} "
                               f"(ragen {manifest.get('ragen_version')}, format {manifest.get('format_version')})")
        if verified is not None:
            table.add_row("verified", "SHA-256 of " + ", ".join(sorted(verified["files"])) + "; database integrity ok")
        if busy:
            table.add_row("status", "[yellow]being written by another process right now[/]")
        out.print(table)

    run_command(body)
