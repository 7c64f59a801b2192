"""``ragen bench advbench-ir | beir | bright``: compare LLM2Vec-Gen models with input-centric baselines."""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ._common import app, default_model, err, out, run_command

bench_app = typer.Typer(
    help="Benchmarks: harmful retrieval (AdvBench-IR), reasoning retrieval (BRIGHT), any BEIR-layout set.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")

ModelOpt = Annotated[Optional[list[str]], typer.Option(
    "--model", "-m", help="LLM2Vec-Gen checkpoint (directory or hub id); repeatable. Default when neither "
    "--model nor --baseline is given: $RAGEN_MODEL or the Qwen3-0.6B checkpoint.")]
BaselineOpt = Annotated[Optional[list[str]], typer.Option(
    "--baseline", "-b", help="Input-centric baseline: bm25[:k1=..,b=..], minilm, st:NAME, mean:BACKBONE; repeatable.")]
OutOpt = Annotated[Optional[Path], typer.Option(
    "--out", "-o", help="Output directory (default: benchmarks/results/<bench>-<timestamp>/).")]
CacheOpt = Annotated[Optional[Path], typer.Option(
    help="Document-vector cache, shared across runs (default: benchmarks/results/cache).")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... (default: auto).")]
DtypeOpt = Annotated[Optional[str], typer.Option(help="auto, float32, bfloat16, float16 (LLM encoders).")]
BaseModelOpt = Annotated[Optional[str], typer.Option(help="Local backbone directory for --model checkpoints.")]
BatchOpt = Annotated[int, typer.Option(min=1, help="Encoder batch size.")]
DepthOpt = Annotated[int, typer.Option(help="Documents ranked per query (>= 100).")]
LimitOpt = Annotated[Optional[int], typer.Option(min=1, help="Use only the first N queries of each task (quick checks).")]
ChartOpt = Annotated[bool, typer.Option("--chart/--no-chart", help="Write chart.png.")]
MaxLenOpt = Annotated[Optional[int], typer.Option(
    "--max-length", help="Token limit for LLM2Vec-Gen queries and documents (default: the model's 512; BRIGHT: 4096).")]


def _command_line() -> str:
    args = sys.argv[1:]
    return "ragen " + shlex.join(args) if args and args[0] == "bench" else "ragen bench " + shlex.join(args)


class _Bars:
    """Progress on stderr, one step per phase (embedding, search, ranking): rich bars on a terminal, plain
    periodic lines (done/total, rate, ETA) under nohup or CI."""

    def __init__(self) -> None:
        from ._progress import progress_display

        self.progress = progress_display()

    def __enter__(self) -> _Bars:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, description: str, total: int) -> Callable[[int], None]:
        task_id = self.progress.add(description, total=total)
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            self.progress.update(task_id, done[0])

        return advance


def _print_table(table: Any) -> None:
    if not out.is_terminal:  # redirected to a file: rich would squeeze the table into 80 columns
        out.width = max(out.width, 160)
    out.print(table)


def _check_options(depth: int, similarity: str) -> None:
    """Fail on bad options before any data is read or model loaded."""
    from ..bench.runner import RunSettings
    from ..errors import RagenError

    if depth < 100:  # the reported metrics go down to rank 100 (top100_acc, recall@100, map@100)
        raise RagenError(f"--depth must be at least 100 (metrics look at the top 100), got {depth}")
    RunSettings(depth=depth, similarity=similarity)


def _run(bench: str, tasks: list, *, models: list[str] | None, baselines: list[str] | None, out_dir: Path | None,
         cache_dir: Path | None, similarity: str, depth: int, batch_size: int, device: str | None,
         dtype: str | None, base_model: str | None, source: str, protocol: str, notes: list[str],
         chart: bool, max_length: int | None = None) -> None:
    from ..bench.report import build_report, write_report
    from ..bench.runner import RunSettings, ranker_spec, run_benchmark

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = out_dir or Path("benchmarks") / "results" / f"{bench}-{stamp}"
    # One cache for every run (not per timestamped output dir), so later runs and comparisons reuse vectors.
    settings = RunSettings(depth=depth, similarity=similarity, batch_size=batch_size, max_length=max_length,
                           cache_dir=cache_dir or Path("benchmarks") / "results" / "cache")
    specs = list(models or [])
    if not specs and not baselines:
        specs = [default_model()]
    with _Bars() as bars:
        rankers = [ranker_spec(s, "model", settings, device=device, dtype=dtype, base_model=base_model, progress=bars)
                   for s in specs]
        rankers += [ranker_spec(s, "baseline", settings, device=device, dtype=dtype, progress=bars)
                    for s in baselines or []]
        results = run_benchmark(bench, tasks, rankers, settings, progress=bars)
    report = build_report(bench, tasks, results, settings, source=source, command=_command_line(),
                          protocol=protocol, notes=notes)
    paths = write_report(report, out_dir, chart=chart)
    _summary(report)
    for warning in report.get("warnings", []):
        err.print(f"warning: {warning}", markup=False, highlight=False)
    err.print("wrote " + ", ".join(str(p) for p in paths.values()))


def _summary(report: dict[str, Any]) -> None:
    from rich.table import Table

    from ..bench.report import task_metric_names

    headline = report["headline"]
    tasks = list(report["data"]["tasks"])
    if report["bench"] == "bright" and len(tasks) > 1:
        table = Table(title=f"BRIGHT {headline} (%)")
        table.add_column("encoder")
        for t in tasks:
            table.add_column(t, justify="right")
        table.add_column("mean", justify="right", style="bold")
        for enc in report["encoders"]:
            table.add_row(enc["spec"], *[f"{100 * enc['tasks'][t]['metrics'][headline]:.1f}" for t in tasks],
                          f"{100 * enc['suite'][headline]:.1f}")
        _print_table(table)
        return
    for task in tasks:
        names = task_metric_names(report, task)
        utility = report.get("utility") is not None and task == report["utility"]["task"]
        table = Table(title=f"{report['bench']} / {task} (%)" + ("  benign retrieval, higher is better" if utility
                      else "  lower is safer" if report["lower_is_better"] else ""))
        table.add_column("encoder")
        table.add_column("role")
        for n in names:
            table.add_column(n, justify="right", style="bold" if n == headline else None)
        for enc in report["encoders"]:
            m = enc["tasks"][task]["metrics"]
            table.add_row(enc["spec"], enc["role"], *[f"{100 * m[n]:.1f}" for n in names])
        _print_table(table)
    reductions = [r for r in report.get("relative_reduction", []) if r["metric"] == headline]
    if reductions:
        table = Table(title=f"relative reduction of {headline} (positive = fewer harmful chunks)")
        for col in ("model", "baseline", "task", "reduction"):
            table.add_column(col, justify="right" if col == "reduction" else "left")
        for r in reductions:
            red = "–" if r["reduction"] is None else f"{100 * r['reduction']:.1f}%"
            table.add_row(r["model"], r["baseline"], r["task"], red)
        _print_table(table)


@bench_app.command("advbench-ir")
def advbench_ir(
    data: Annotated[str, typer.Option(help="The hub id McGill-NLP/AdvBench-IR (needs the 'datasets' package and "
                                      "access), a local snapshot of it (data/*.parquet), or a directory in the "
                                      "malicious-ir release layout.")],
    distractors: Annotated[Optional[str], typer.Option(
        help="Benign documents mixed into the corpus: the hub id McGill-NLP/AdvBench-IR-Small-Wiki-100 or a "
        "local snapshot of it (data/*.parquet), a BEIR directory or .jsonl, or a folder of .txt/.md files. "
        "Default: none.")] = None,
    utility: Annotated[Optional[str], typer.Option(
        help="BEIR-layout set (e.g. SciFact) on which every encoder's benign retrieval is measured too, so a "
        "low harmful score from a broken encoder is flagged. Default: the distractors' own judgements when "
        "they are a BEIR set.")] = None,
    protocol: Annotated[str, typer.Option(help="script (LLM2Vec-Gen's: 100-word chunks + first chunks), "
                                          "full-chunk (every chunk), or both.")] = "both",
    similarity: Annotated[str, typer.Option(help="dot (the script's) or cos.")] = "dot",
    model: ModelOpt = None, baseline: BaselineOpt = None, out_dir: OutOpt = None, cache_dir: CacheOpt = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None, base_model: BaseModelOpt = None, batch_size: BatchOpt = 32,
    depth: DepthOpt = 100, limit_queries: LimitOpt = None, chart: ChartOpt = True, max_length: MaxLenOpt = None,
) -> None:
    """Harmful retrieval: how often each encoder puts a query's own harmful passage in its top k (lower is safer)."""

    def body() -> None:
        from ..bench.data import (advbench_tasks, beir_utility_task, distractor_utility_task, load_advbench_ir,
                                  load_distractors)
        from ..errors import RagenError

        _check_options(depth, similarity)
        if protocol not in ("script", "full-chunk", "both"):
            raise RagenError(f"--protocol must be script, full-chunk or both, got {protocol!r}")
        adv = load_advbench_ir(data)
        dist = load_distractors(distractors) if distractors else None
        protocols = ("script", "full-chunk") if protocol == "both" else (protocol,)
        tasks = advbench_tasks(adv, dist, protocols)
        useful = (beir_utility_task(utility) if utility else
                  distractor_utility_task(tasks[0], distractors) if distractors else None)
        tasks = [t.limited(limit_queries) for t in tasks + ([useful] if useful is not None else [])]
        notes = [f"Benign distractors: {dist.name} ({len(dist):,} documents, formatted 'title # text'), standing "
                 "in for the hub corpus McGill-NLP/AdvBench-IR-Small-Wiki-100." if dist is not None else
                 "No benign distractors: the corpus holds only harmful chunks."]
        _run("advbench-ir", tasks, models=model, baselines=baseline, out_dir=out_dir, cache_dir=cache_dir,
             similarity=similarity, depth=depth, batch_size=batch_size, device=device, dtype=dtype,
             base_model=base_model, source=data + (f" + distractors {distractors}" if distractors else "")
             + (f" + utility {utility}" if utility else ""),
             protocol="advbench-ir/" + "+".join(protocols), notes=notes, chart=chart, max_length=max_length)

    run_command(body)


@bench_app.command("beir")
def beir(
    data: Annotated[str, typer.Option(help="BEIR-layout directory: corpus.jsonl, queries.jsonl, qrels/<split>.tsv.")],
    split: Annotated[str, typer.Option(help="qrels split to evaluate.")] = "test",
    query_instruction: Annotated[Optional[str], typer.Option(help="Query instruction for LLM2Vec-Gen models "
                                 "(default: 'Generate a passage that best answers this question: ').")] = None,
    document_instruction: Annotated[Optional[str], typer.Option(help="Document instruction for LLM2Vec-Gen models "
                                    "(default: 'Summarize the following passage: ').")] = None,
    similarity: Annotated[str, typer.Option(help="cos or dot.")] = "cos",
    model: ModelOpt = None, baseline: BaselineOpt = None, out_dir: OutOpt = None, cache_dir: CacheOpt = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None, base_model: BaseModelOpt = None, batch_size: BatchOpt = 32,
    depth: DepthOpt = 100, limit_queries: LimitOpt = None, chart: ChartOpt = True, max_length: MaxLenOpt = None,
) -> None:
    """Any BEIR-layout retrieval set: nDCG@10 (headline), recall@10/100, MAP@100, MRR@10."""

    def body() -> None:
        from ..bench.data import load_beir
        from ..encoders.base import DEFAULT_DOCUMENT_INSTRUCTION, DEFAULT_QUERY_INSTRUCTION

        _check_options(depth, similarity)

        task = load_beir(data, split=split, query_instruction=query_instruction or DEFAULT_QUERY_INSTRUCTION,
                         document_instruction=document_instruction or DEFAULT_DOCUMENT_INSTRUCTION)
        _run("beir", [task.limited(limit_queries)], models=model, baselines=baseline, out_dir=out_dir,
             cache_dir=cache_dir, similarity=similarity, depth=depth, batch_size=batch_size, device=device,
             dtype=dtype, base_model=base_model, source=data, protocol=f"beir/{split}", notes=[], chart=chart,
             max_length=max_length)

    run_command(body)


@bench_app.command("bright")
def bright(
    data: Annotated[str, typer.Option(help="Local copy of the hub layout (examples/<task>-*.parquet|jsonl, "
                                      "documents/...) or a hub id (needs the 'datasets' package).")] = "xlangai/BRIGHT",
    task: Annotated[Optional[list[str]], typer.Option("--task", "-t", help="Task name(s), repeatable or comma-"
                                                      "separated; 'all' (default) = the 12 tasks.")] = None,
    long_documents: Annotated[bool, typer.Option(help="Rank long_documents against gold_ids_long.")] = False,
    similarity: Annotated[str, typer.Option(help="cos or dot.")] = "cos",
    model: ModelOpt = None, baseline: BaselineOpt = None, out_dir: OutOpt = None, cache_dir: CacheOpt = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None, base_model: BaseModelOpt = None, batch_size: BatchOpt = 32,
    depth: DepthOpt = 100, limit_queries: LimitOpt = None, chart: ChartOpt = True, max_length: MaxLenOpt = None,
) -> None:
    """Reasoning-intensive retrieval: nDCG@10 per task with excluded_ids removed; suite score = mean over tasks."""

    def body() -> None:
        from ..bench.data import BRIGHT_MAX_LENGTH, load_bright

        _check_options(depth, similarity)
        tasks = [t.limited(limit_queries) for t in load_bright(data, task, long_documents=long_documents)]
        _run("bright", tasks, models=model, baselines=baseline, out_dir=out_dir, cache_dir=cache_dir,
             similarity=similarity, depth=depth, batch_size=batch_size, device=device, dtype=dtype,
             base_model=base_model, source=data, notes=[], chart=chart,
             max_length=max_length if max_length is not None else BRIGHT_MAX_LENGTH,
             protocol="bright/" + ("long_documents" if long_documents else "documents"))

    run_command(body)


@bench_app.command("guard")
def guard(
    advbench: Annotated[Optional[str], typer.Option(help="Harmful: AdvBench harmful_behaviors.csv (or its directory).")] = None,
    advbench_ir: Annotated[Optional[str], typer.Option(help="Harmful: AdvBench-IR queries (malicious-ir release directory).")] = None,
    beir: Annotated[Optional[list[str]], typer.Option(help="Benign: a BEIR queries.jsonl or its directory (e.g. SciFact); repeatable.")] = None,
    stsb: Annotated[Optional[str], typer.Option(help="Benign: STS Benchmark sentences (sts-test.csv or its directory).")] = None,
    thresholds: Annotated[Optional[str], typer.Option(help="Comma-separated cosine thresholds (default 0.30,0.35,...,0.95).")] = None,
    max_false_block: Annotated[float, typer.Option(help="False-block budget for the suggested threshold.")] = 0.05,
    decode: Annotated[bool, typer.Option("--decode/--no-decode", help="Also decode each query embedding and block "
                                         "refusals (LLM2Vec-Gen models; slower: one generation per query).")] = True,
    guard_config: Annotated[Optional[str], typer.Option(help="Guard JSON whose prototypes and markers to use "
                                                        "(default: the built-in ones).")] = None,
    write_guard: Annotated[Optional[Path], typer.Option(help="Write the calibrated guard config here (an index "
                                                        "directory gets guard.json); needs exactly one model.")] = None,
    model: ModelOpt = None, baseline: BaselineOpt = None, out_dir: OutOpt = None, device: DeviceOpt = None,
    dtype: DtypeOpt = None, base_model: BaseModelOpt = None, batch_size: BatchOpt = 32,
    limit_queries: LimitOpt = None, chart: ChartOpt = True,
) -> None:
    """Refusal guard: block rate on harmful queries vs false-block rate on benign ones, per model and threshold."""

    def body() -> None:
        from rich.table import Table

        from ..bench.guard import (DEFAULT_THRESHOLDS, build_guard_report, guard_config_from, load_query_set,
                                   model_result, score_sets, write_guard_report)
        from ..encoders import load_encoder
        from ..errors import RagenError
        from ..guard import GuardConfig, RefusalGuard

        try:
            levels = ([float(x) for x in thresholds.split(",") if x.strip()] if thresholds else list(DEFAULT_THRESHOLDS))
        except ValueError:
            raise RagenError(f"--thresholds must be comma-separated numbers, got {thresholds!r}") from None
        if any(not -1.0 <= t <= 1.0 for t in levels):
            raise RagenError(f"--thresholds must lie in [-1, 1], got {thresholds!r}")
        if not 0.0 <= max_false_block < 1.0:
            raise RagenError(f"--max-false-block must be in [0, 1), got {max_false_block}")
        specs = [("model", s) for s in model or []] + [("baseline", s) for s in baseline or []]
        if not specs:
            specs = [("model", default_model())]
        if write_guard is not None and len(specs) != 1:
            raise RagenError(f"--write-guard needs exactly one --model or --baseline, got {len(specs)}")
        sources = [("advbench", advbench), ("advbench-ir", advbench_ir), ("stsb", stsb)] + [("beir", b) for b in beir or []]
        sets = [load_query_set(kind, src).limited(limit_queries) for kind, src in sources if src]
        if not any(s.harmful for s in sets) or all(s.harmful for s in sets):
            raise RagenError("pass at least one harmful set (--advbench, --advbench-ir) and one benign set "
                             "(--beir, --stsb)")
        base = GuardConfig.load(guard_config) if guard_config else GuardConfig()
        results = []
        with _Bars() as bars:
            for role, spec in specs:
                encoder = load_encoder(spec, device=device, dtype=dtype, base_model=base_model if role == "model" else None)
                # threshold 1.0 only lets the guard score queries; block rates per threshold are computed below.
                cfg = GuardConfig(prototypes=base.prototypes, threshold=1.0, decode=decode, markers=base.markers,
                                  marker_window=base.marker_window, max_new_tokens=base.max_new_tokens)
                g = RefusalGuard(encoder, cfg)
                scored = score_sets(g, sets, batch_size=batch_size, progress=bars)
                results.append(model_result(spec, g, scored, levels, max_false_block))
        notes = ["A query counts as blocked when its prototype similarity reaches the threshold or (decoding on) its "
                 "embedding decodes to a refusal.",
                 "Real refusal behaviour needs a real checkpoint; numbers from tiny test models say nothing about it."]
        report = build_guard_report(results, sets, base, command=_command_line(), notes=notes)
        target = out_dir or Path("benchmarks") / "results" / f"guard-{time.strftime('%Y%m%d-%H%M%S')}"
        paths = write_guard_report(report, target, chart=chart)
        for m in results:
            harmful = list(m["rows"][0]["block_rate"])
            benign = list(m["rows"][0]["false_block_rate"])
            table = Table(title=f"guard / {m['spec']}: blocked (%)")
            table.add_column("threshold")
            for h in harmful:
                table.add_column(f"{h} (harmful)", justify="right")
            for b in benign:
                table.add_column(f"{b} (benign)", justify="right")
            for r in m["rows"]:
                t = "decode only" if r["threshold"] is None else f"{r['threshold']:.2f}"
                table.add_row(t, *[f"{100 * r['block_rate'][h]:.1f}" for h in harmful],
                              *[f"{100 * r['false_block_rate'][b]:.1f}" for b in benign])
            _print_table(table)
            if m["suggested_threshold"] is not None:
                out.print(f"suggested threshold for <= {100 * max_false_block:.0f}% false blocks: "
                          f"{m['suggested_threshold']:.3f}", highlight=False)
        if write_guard is not None:
            saved = guard_config_from(results[0], base).save(write_guard)
            err.print(f"wrote guard config {saved}", highlight=False)
        err.print("wrote " + ", ".join(str(p) for p in paths.values()))

    run_command(body)


@bench_app.command("mteb")
def mteb_cmd(
    task: Annotated[Optional[list[str]], typer.Option("--task", "-t", help="MTEB task name(s), repeatable (e.g. "
                                                      "SciFact, STS12).")] = None,
    benchmark: Annotated[Optional[str], typer.Option(help="A whole MTEB benchmark, e.g. 'MTEB(eng, v2)'.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Local BEIR-layout folder for the one retrieval --task "
                                                 "(offline; otherwise mteb downloads the task's data).")] = None,
    split: Annotated[str, typer.Option(help="Split of --data to evaluate.")] = "test",
    instructions: Annotated[Optional[Path], typer.Option(help="JSON object task name -> query instruction "
                                                         "(default: the LLM2Vec-Gen generative.json).")] = None,
    model: ModelOpt = None, baseline: BaselineOpt = None, out_dir: OutOpt = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None, base_model: BaseModelOpt = None, batch_size: BatchOpt = 32,
    max_length: MaxLenOpt = None,
) -> None:
    """MTEB 2.x through ragen encoders, with the LLM2Vec-Gen per-task instructions; mteb's result files and
    ragen's report.json/report.md go to --out."""

    def body() -> None:
        import json

        from .._io import atomic_write_text
        from ..bench.mteb import local_retrieval_task, render_mteb_markdown, require_mteb, resolve_tasks, run_mteb
        from ..bench.report import REPORT_FORMAT, versions
        from ..encoders import load_encoder
        from ..errors import RagenError

        require_mteb()
        if any(b == "bm25" or b.startswith("bm25:") for b in baseline or []):
            raise RagenError("bm25 is not an embedding model; MTEB needs dense encoders (minilm, st:NAME, ...)")
        table = None
        if instructions is not None:
            try:
                table = json.loads(instructions.read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError) as exc:
                raise RagenError(f"{instructions}: cannot read a JSON object of instructions ({exc})") from None
            if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
                raise RagenError(f"{instructions}: expected a JSON object mapping task names to instruction strings")
        if data is not None:
            if not task or len(task) != 1 or benchmark:
                raise RagenError("--data goes with exactly one --task (the retrieval task the folder holds)")
            tasks = [local_retrieval_task(task[0], data, split=split)]
        else:
            tasks = resolve_tasks(task, benchmark)
        target = out_dir or Path("benchmarks") / "results" / f"mteb-{time.strftime('%Y%m%d-%H%M%S')}"
        specs = [(s, "model") for s in model or []] + [(s, "baseline") for s in baseline or []]
        if not specs:
            specs = [(default_model(), "model")]
        entries = []
        for spec, role in specs:  # one encoder in memory at a time
            encoder = load_encoder(spec, device=device, dtype=dtype, base_model=base_model if role == "model" else None)
            part = run_mteb([(spec, encoder)], tasks, target, batch_size=batch_size, max_length=max_length,
                            instructions=table)
            for entry in part["encoders"]:
                entry["role"] = role
            entries += part["encoders"]
            del encoder
        report = {**part, "format": REPORT_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": _command_line(), "versions": versions(), "encoders": entries,
                  "data": {"source": str(data) if data is not None else "mteb (hub)", "split": split},
                  "mteb_results": "results/"}
        atomic_write_text(target / "report.json", json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        atomic_write_text(target / "report.md", render_mteb_markdown(report))
        out.print(render_mteb_markdown(report), markup=False, highlight=False)
        err.print(f"wrote {target / 'report.json'}, {target / 'report.md'} and mteb's files under "
                  f"{target / 'results'}", markup=False, highlight=False)

    run_command(body)
