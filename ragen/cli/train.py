"""``ragen generate-responses``, ``ragen teacher-vectors``, ``ragen train``: the LLM2Vec-Gen training pipeline.

All three read the same pipeline file (YAML or TOML, see ``pipelines/train-tiny.yaml``) and work in one
output directory; each stage resumes where it stopped. Run ``ragen train`` under ``torchrun`` or
``accelerate launch`` for data parallelism (every stage then shards over the processes).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from ._common import app, err, out, run_command
from ..errors import RagenError


def _load(config: Path, device: str | None, dtype: str | None):
    from ..training import load_config

    cfg = load_config(config)
    changes: dict[str, Any] = {}
    if device:
        changes["device"] = device
    if dtype:
        changes["dtype"] = dtype
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _parse_shard(shard: str | None) -> tuple[int, int] | None:
    if shard is None:
        return None
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise RagenError(f"--shard {shard!r}: expected INDEX/COUNT, e.g. 0/4") from None
    if not 0 <= i < n:
        raise RagenError(f"--shard {shard!r}: expected 0 <= INDEX < COUNT")
    return i, n


ConfigArg = Annotated[Path, typer.Argument(help="Pipeline file (.yaml/.toml), e.g. pipelines/train-tiny.yaml.")]
OutputOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Run directory (responses, teacher cache, "
                                                   "checkpoints, model); default runs/CONFIG-NAME.")]


def _output_dir(config: Path, output: Path | None) -> Path:
    """``--output``, or ``runs/<config file name without suffix>`` under the working directory (printed)."""
    if output is not None:
        return output
    default = Path("runs") / config.stem
    if _is_main():
        err.print(f"output: {default}", highlight=False)
    return default
DeviceOpt = Annotated[Optional[str], typer.Option(help="Override the config's device: cpu, cuda, cuda:1 ...")]
DtypeOpt = Annotated[Optional[str], typer.Option(help="Override the config's dtype: float32, bfloat16, float16.")]


@app.command("generate-responses")
def generate_responses_cmd(
    config: ConfigArg,
    output_opt: OutputOpt = None,
    shard: Annotated[Optional[str], typer.Option(help="Answer only shard INDEX/COUNT (independent processes, e.g. one per GPU); "
                                                   "merged when all shards are done. Under torchrun/accelerate the rank is used.")] = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
) -> None:
    """Stage 1: the frozen LLM answers the queries (chat template, generation prompt) -> OUTPUT/responses.jsonl."""

    def body() -> None:
        from ..training.distributed import barrier
        from ..training.loop import setup_runtime
        from ..training.responses import generate_responses, import_responses, merge_responses, responses_complete

        cfg = _load(config, device, dtype)
        output = _output_dir(config, output_opt)
        output.mkdir(parents=True, exist_ok=True)
        if responses_complete(cfg, output):
            err.print(f"[green]responses complete:[/] {output / 'responses.jsonl'}")
            return
        if cfg.responses.source:
            path = import_responses(cfg, output)
            err.print(f"[green]published responses[/] from {escape(cfg.responses.source)}: {escape(str(path))}")
            return
        explicit = _parse_shard(shard)
        ctx, dev, dt = setup_runtime(cfg)
        part = explicit or (ctx.rank, ctx.world_size)
        from ._progress import progress_display

        with progress_display(enabled=_is_main()) as progress:
            task = progress.add("responses", None)
            n = generate_responses(cfg, output, shard=part, device=dev, dtype=dt,
                                   progress=lambda d, total: progress.update(task, d, total))
        barrier(ctx)
        if ctx.is_main:
            try:
                path = merge_responses(cfg, output)
                err.print(f"[green]{n} responses generated;[/] all merged into {path}")
            except RagenError as exc:
                if explicit is None:
                    raise
                err.print(f"[yellow]{n} responses generated for shard {part[0]}/{part[1]};[/] {str(exc).split('; ')[0]}")

    run_command(body)


@app.command("teacher-vectors")
def teacher_vectors_cmd(config: ConfigArg, output_opt: OutputOpt = None, device: DeviceOpt = None) -> None:
    """Stage 2: teacher embeddings of OUTPUT/responses.jsonl, cached under OUTPUT/teacher/ (.npy + .json)."""

    def body() -> None:
        from ..training.loop import RESPONSES_FILE, TEACHER_DIR
        from ..training.teacher import compute_teacher_vectors

        cfg = _load(config, device, None)
        output = _output_dir(config, output_opt)
        responses = output / RESPONSES_FILE
        if not responses.is_file():
            raise RagenError(f"{responses}: no such file; run `ragen generate-responses {config} --output {output}` first")
        dev = None if cfg.device == "auto" else cfg.device
        with err.status(f"teacher {cfg.teacher.model}: embedding responses"):
            vectors, path = compute_teacher_vectors(responses, cfg.teacher, output / TEACHER_DIR, device=dev)
        out.print(f"{vectors.shape[0]} x {vectors.shape[1]} teacher vectors: {path}", highlight=False)

    run_command(body)


@app.command("train")
def train_cmd(
    config: ConfigArg,
    output_opt: OutputOpt = None,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="Override train.max_steps.")] = None,
    resume: Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from the latest checkpoint in OUTPUT.")] = True,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved plan (stages, models, data, steps, "
                                                            "LR at the stop, parameter counts); load no model.")] = False,
) -> None:
    """Run the whole pipeline: responses -> teacher vectors -> training -> OUTPUT/model (published layout).

    Multi-GPU: torchrun --nproc_per_node 8 -m ragen train CONFIG --output DIR
    """

    def body() -> None:
        from ..training import override_train, run_pipeline

        cfg = _load(config, device, dtype)
        if max_steps is not None:
            cfg = override_train(cfg, max_steps=max_steps)
        if dry_run:
            from ..training.plan import build_plan

            target = output_opt if output_opt is not None else Path("runs") / config.stem
            plan = build_plan(cfg, target, world_size=int(os.environ.get("WORLD_SIZE", "1")))
            out.print(f"plan for {escape(str(config))} (dry run: nothing loaded or written)", highlight=False)
            for label, text in plan.lines:
                out.print(f"  {label + ':':<13} {escape(text)}", highlight=False)
            out.print(f"  {'launch:':<13} ragen train {escape(str(config))}   (multi-GPU: torchrun --nproc_per_node N "
                      f"-m ragen train {escape(str(config))}; N must divide train.batch_size={cfg.train.batch_size})",
                      highlight=False)
            return
        output = _output_dir(config, output_opt)
        display = _RichCallback(enabled=_is_main())
        try:
            result = run_pipeline(cfg, output, resume=resume, callback=display)
        finally:
            display.close()
        if result.model_dir is not None and result.already_finished:
            loss = f" (loss {result.final_loss:.4f})" if result.final_loss == result.final_loss else ""
            out.print(f"already finished: {result.steps} steps{loss}; model: {result.model_dir} "
                      "(raise --max-steps to continue, or --no-resume to start over)", highlight=False)
        elif result.model_dir is not None:
            ev = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
            out.print(f"trained {result.steps} steps: loss {result.final_loss:.4f}{ev}; model: {result.model_dir}",
                      highlight=False)

    run_command(body)


class _RichCallback:
    """Draws the library's progress reports: a bar per stage, loss/lr/tokens per second while training."""

    def __init__(self, enabled: bool) -> None:
        from ._progress import progress_display

        self.enabled = enabled
        self.progress = progress_display(enabled=enabled)  # bars on a terminal, plain lines under nohup/CI
        self.tasks: dict[str, Any] = {}
        self.eval_info = ""
        if enabled:
            self.progress.start()

    def _task(self, name: str, total: int | None = None, completed: int = 0):
        if name not in self.tasks:
            self.tasks[name] = self.progress.add(name, total, completed=completed)
        return self.tasks[name]

    def on_stage(self, name: str, detail: str) -> None:
        if self.enabled:
            self.progress.console.print(f"[cyan]{name}[/]: {detail}", highlight=False)

    def on_progress(self, stage: str, done: int, total: int) -> None:
        self.progress.update(self._task(stage), done, total)

    def on_train_start(self, start_step: int, max_steps: int) -> None:
        self._task("train", total=max_steps, completed=start_step)
        if start_step and self.enabled:
            self.progress.console.print(f"[yellow]resuming at step {start_step}[/]")

    def on_step(self, m: dict[str, Any]) -> None:
        info = (f"loss {m['loss']:.4f} (rec {m['rec']:.4f}, align {m['align']:.5f}) lr {m['lr']:.2e} "
                f"{m['tokens_per_s']:.0f} tok/s{self.eval_info}")
        self.progress.update(self._task("train"), m["step"], detail=info)

    def on_eval(self, m: dict[str, Any]) -> None:
        self.eval_info = f" | eval {m['eval_loss']:.4f}"

    def on_checkpoint(self, path: Path) -> None:
        if self.enabled:
            self.progress.console.print(f"[green]checkpoint[/] {path}", highlight=False)

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
