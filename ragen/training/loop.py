"""Stage 3: learn the K special-token rows and the two heads on a frozen backbone.

Read top to bottom: :func:`run_pipeline` runs the stages (responses -> teacher vectors -> :func:`fit`);
:func:`fit` is the loop. One optimizer step:

    global batch (a function of the step)  -> this process's slice -> micro-batches
    micro-batch: query + K specials -> backbone -> last K states -> reconstruction head   (B, K, H)
                 rec  = CE(response | soft prompt = those states)           summed over tokens
                 align = SE(mean_K(alignment head(states)), teacher vector)  summed over values
                 loss = w_rec * rec / tokens_in_global_batch + w_align * align / (B_global * D)
    backward (DDP all-reduces gradients of the trainable tensors once per step), clip, AdamW, schedule

Because the loss is normalised by *global* counts, every split of the global batch over processes and
micro-batches computes the same gradient: 2 processes x B/2 equals 1 process x B (up to float sums).
Only the K rows and the heads have ``requires_grad``; the backbone is never touched (a test asserts it
is bit-identical after training).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_write_text
from ..encoders.base import resolve_device, resolve_dtype
from ..encoders.llm2vec_gen import LLM2VecGen
from ..errors import DataError
from .config import PipelineConfig, TrainConfig
from .data import Batch, Collator, Example, build_examples, global_batch_indices, split_eval
from .distributed import DistContext, all_reduce_sum, barrier, init_distributed
from .losses import alignment_loss_sum, reconstruction_loss_sum
from .responses import (RESPONSES_FILE, generate_responses, import_responses, merge_responses, read_responses,
                        responses_complete)
from .teacher import compute_teacher_vectors

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
TEACHER_DIR = "teacher"
_STATE_FILE = "trainer_state.json"
_TRAINABLE_FILE = "trainable.safetensors"
_OPTIMIZER_FILE = "optimizer.pt"
# Settings a resumed run may change without invalidating the saved state.
# max_steps is free: the schedule's horizon is schedule_steps, which must match.
_RESUME_FREE = ("max_steps", "eval_every", "save_every", "log_every", "keep_checkpoints", "report_to", "wandb_project")


# ----------------------------------------------------------------------------------------------------------
# progress reporting
# ----------------------------------------------------------------------------------------------------------
class TrainCallback:
    """Receives progress from the library (the CLI draws it with rich). Every method is optional."""

    def on_stage(self, name: str, detail: str) -> None:
        """A pipeline stage starts: ``responses``, ``teacher``, ``train``, ``save``."""

    def on_progress(self, stage: str, done: int, total: int) -> None:
        """Progress inside the responses stage."""

    def on_train_start(self, start_step: int, max_steps: int) -> None: ...

    def on_step(self, metrics: dict[str, Any]) -> None: ...

    def on_eval(self, metrics: dict[str, Any]) -> None: ...

    def on_checkpoint(self, path: Path) -> None: ...


@dataclass(frozen=True)
class TrainResult:
    model_dir: Path | None  # the published-layout model (None on non-main processes)
    steps: int
    final_loss: float
    losses: list[float] = field(default_factory=list)  # per-step training loss of this run
    eval_loss: float | None = None
    already_finished: bool = False  # the run had reached max_steps before this call; nothing was trained


# ----------------------------------------------------------------------------------------------------------
# the trainable part
# ----------------------------------------------------------------------------------------------------------
class TrainableLLM2VecGen(torch.nn.Module):
    """The K special-token rows and the two heads, as one module; the frozen LLM2VecGen is kept outside
    the module tree so DDP neither broadcasts nor watches the backbone's weights."""

    def __init__(self, model: LLM2VecGen, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if model.reconstruction_head is None or model.alignment_head is None:
            raise DataError("training needs a model with both a reconstruction and an alignment head")
        self.param_dtype = dtype
        self.special_rows = torch.nn.Parameter(model.trained_rows().to(model.device, dtype))  # (K, H)
        self.reconstruction_head = model.reconstruction_head
        self.alignment_head = model.alignment_head
        for head in (self.reconstruction_head, self.alignment_head):
            head.to(dtype)
            head.requires_grad_(True)
            head.train()
        object.__setattr__(self, "_frozen", model)

    @property
    def frozen(self) -> LLM2VecGen:
        return self._frozen  # type: ignore[attr-defined]

    def forward(self, batch: Batch, rec_scale: float, align_scale: float,
                recompute_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(scaled loss, summed CE, summed squared error)`` for one micro-batch. The scales turn the sums
        into this micro-batch's share of the global-batch loss."""
        model = self.frozen
        states = model.last_hidden_states(batch.query_ids, batch.query_mask, special_rows=self.special_rows)
        recon = self.reconstruction_head(states.to(self.param_dtype))  # (B, K, H)
        pooled = self.alignment_head(recon).mean(dim=1)  # (B, D)
        rec = reconstruction_loss_sum(model.lm, recon.to(model.dtype), batch.response_ids, batch.response_mask,
                                      recompute_logits=recompute_logits)
        align = alignment_loss_sum(pooled, batch.teacher.to(pooled.dtype))
        return rec * rec_scale + align * align_scale, rec.detach(), align.detach()


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """The learning-rate multiplier of optimizer step ``step`` (0-based), as transformers' schedulers with
    warm-up compute it (the reference trains with ``get_linear_schedule_with_warmup``): ``step / warmup``
    during warm-up (so the very first step has rate 0), then a decay that reaches 0 at
    ``schedule_steps``. Training stops at ``max_steps``; with the reference's 20,000-step horizon and stop
    at 5,000 the last rate is about 75% of the peak."""
    warm, total = cfg.warmup_steps, cfg.schedule_steps
    if step < warm:
        return step / max(1, warm)
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, total - warm)
    if cfg.schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))
    return max(0.0, (total - step) / max(1, total - warm))


def rec_loss_scale(cfg: TrainConfig, global_tokens: int, local_tokens: int, world_size: int) -> float:
    """Factor turning this process's summed response cross-entropy into its share of the step's loss.

    ``global`` (ragen's default): divide by the response tokens of the whole global batch, times the
    process count because DDP averages gradients; any split over processes/micro-batches gives the same
    gradient. ``per_rank`` (the reference: HF Trainer's per-device mean, then DDP's average): divide by
    this process's own tokens, so processes with short responses weigh their tokens more."""
    if cfg.loss_normalization == "per_rank":
        return cfg.rec_weight / max(local_tokens, 1)
    return cfg.rec_weight / max(global_tokens, 1) * world_size


def _lr_lambda(cfg: TrainConfig):
    return lambda step: lr_factor(cfg, step)


# ----------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------
def _resume_fingerprint(cfg: PipelineConfig) -> str:
    # max_steps only says where to stop: the rate of every step depends on schedule_steps (part of the
    # fingerprint), so a run stopped at 5,000 steps may continue to 10,000 on the same curve.
    train = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in _RESUME_FREE}
    data = {"base_model": cfg.base_model, "teacher": dataclasses.asdict(cfg.teacher), "train": train, "seed": cfg.seed}
    import hashlib

    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _changed_settings(state: dict[str, Any], cfg: PipelineConfig) -> str:
    """Which resume-relevant settings differ between a checkpoint's recorded config and ``cfg``."""
    old = state.get("config") if isinstance(state.get("config"), dict) else {}
    new = json.loads(json.dumps(cfg.to_dict(), default=str))
    changed = [k for k in ("base_model", "seed") if old.get(k) != new.get(k)]
    if old.get("teacher") != new.get("teacher"):
        changed.append("teacher")
    old_t, new_t = old.get("train") or {}, new["train"]
    changed += [f"train.{k}" for k in new_t if k not in _RESUME_FREE and old_t.get(k) != new_t[k]]
    return ", ".join(changed) or "unknown settings"


def latest_checkpoint(out_dir: Path) -> Path | None:
    root = out_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and (p / _STATE_FILE).is_file() and "." not in p.name)
    return done[-1] if done else None


def _save_checkpoint(out_dir: Path, step: int, trainable: TrainableLLM2VecGen, optimizer: torch.optim.Optimizer,
                     scheduler: Any, cfg: PipelineConfig, teacher_dim: int, *, loss: float | None = None) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically: build it under a temporary name, fsync, rename."""
    from safetensors.torch import save_file

    root = out_dir / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors = {k: v.detach().cpu().contiguous() for k, v in trainable.state_dict().items()}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / _TRAINABLE_FILE))
    torch.save(optimizer.state_dict(), tmp / _OPTIMIZER_FILE)  # tensors and numbers only: loads with weights_only
    # The published layout too, so any checkpoint can be loaded with LLM2VecGen.from_pretrained.
    with _Float32Heads(trainable.frozen):
        trainable.frozen.save_pretrained(tmp / MODEL_DIR, special_rows=trainable.special_rows)
    state = {"step": step, "scheduler": scheduler.state_dict(), "resume_fingerprint": _resume_fingerprint(cfg),
             "teacher_dim": teacher_dim, "loss": loss, "config": cfg.to_dict()}
    (tmp / _STATE_FILE).write_text(json.dumps(state, indent=2, default=str), encoding="utf-8")
    for f in tmp.rglob("*"):
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    keep = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in keep[: -cfg.train.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(path: Path, trainable: TrainableLLM2VecGen, optimizer: torch.optim.Optimizer, scheduler: Any,
                     cfg: PipelineConfig) -> int:
    from safetensors.torch import load_file

    state = json.loads((path / _STATE_FILE).read_text(encoding="utf-8"))
    if state.get("resume_fingerprint") != _resume_fingerprint(cfg):
        raise DataError(f"{path}: was written with different training settings ({_changed_settings(state, cfg)}); "
                        "resume needs the same config except max_steps and the logging/saving intervals (use a new "
                        "--output directory, or --no-resume to start over)")
    tensors = load_file(str(path / _TRAINABLE_FILE))
    torch.set_rng_state(tensors.pop("rng.torch"))
    cuda_rng = tensors.pop("rng.cuda", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    trainable.load_state_dict({k: v.to(trainable.special_rows.device) for k, v in tensors.items()})
    optimizer.load_state_dict(torch.load(path / _OPTIMIZER_FILE, map_location=trainable.special_rows.device,
                                         weights_only=True))
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


# ----------------------------------------------------------------------------------------------------------
# metrics
# ----------------------------------------------------------------------------------------------------------
class _Metrics:
    """metrics.jsonl (main process) plus tensorboard/wandb when asked for."""

    def __init__(self, out_dir: Path, cfg: PipelineConfig, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out_dir / METRICS_FILE
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        # A resumed run rewrites history after the checkpoint, so the file holds one clean curve.
        rows = []
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("step", 0) <= start_step:
                    rows.append(line)
        atomic_write_text(self.path, "".join(r + "\n" for r in rows))
        self.fh = open(self.path, "a", encoding="utf-8")
        if "tensorboard" in cfg.train.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        if "wandb" in cfg.train.report_to:
            import wandb

            self.wandb = wandb.init(project=cfg.train.wandb_project, config=cfg.to_dict(), dir=str(out_dir),
                                    resume="allow")

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.fh.write(json.dumps(row) + "\n")
        self.fh.flush()
        step = int(row["step"])
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.fh.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def check_reporters(report_to: tuple[str, ...]) -> None:
    """Fail before any work when a requested reporter is not installed."""
    import importlib.util

    need = {"tensorboard": "tensorboard", "wandb": "wandb"}
    for name in report_to:
        if importlib.util.find_spec(need[name]) is None:
            raise ImportError(f"train.report_to asks for {name} but it is not installed: pip install {need[name]}")


# ----------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------
def _micro_batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i:i + size] for i in range(0, len(indices), size)]


@torch.no_grad()
def evaluate(trainable: TrainableLLM2VecGen, collator: Collator, examples: list[Example], cfg: TrainConfig,
             ctx: DistContext, device: str, micro: int) -> dict[str, float]:
    """Eval loss on held-out examples, normalised like the training loss; sharded over processes."""
    mine = list(range(ctx.rank, len(examples), ctx.world_size))
    sums = torch.zeros(4, dtype=torch.float64)  # CE sum, tokens, SE sum, values
    was_training = trainable.training
    trainable.eval()
    for idx in _micro_batches(mine, micro):
        batch = collator([examples[i] for i in idx], device)
        _, rec, align = trainable(batch, 0.0, 0.0)
        sums += torch.tensor([float(rec), float(batch.response_mask.sum()), float(align),
                              float(batch.teacher.numel())], dtype=torch.float64)
    trainable.train(was_training)
    sums = all_reduce_sum(ctx, sums)
    rec = float(sums[0] / max(sums[1], 1.0))
    align = float(sums[2] / max(sums[3], 1.0))
    return {"eval_loss": cfg.rec_weight * rec + cfg.align_weight * align, "eval_rec": rec, "eval_align": align}


def _enable_gradient_checkpointing(lm: Any) -> None:
    """Recompute each decoder layer in backward. HF checkpoints a layer only while that layer is in
    training mode; we flip the flag on the layer objects alone so no dropout anywhere turns on."""
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in lm.modules():
        if getattr(module, "gradient_checkpointing", False):
            module.training = True


def fit(
    model: LLM2VecGen,
    train_examples: list[Example],
    eval_examples: list[Example],
    cfg: PipelineConfig,
    out_dir: str | Path,
    *,
    ctx: DistContext | None = None,
    resume: bool = True,
    callback: TrainCallback | None = None,
) -> TrainResult:
    """Train ``model``'s rows and heads in place; checkpoints, metrics and the final model go to ``out_dir``."""
    t = cfg.train
    ctx = ctx or DistContext()
    cb = callback or TrainCallback()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = model.device
    if t.batch_size % ctx.world_size:
        raise DataError(f"train.batch_size={t.batch_size} must be divisible by the {ctx.world_size} processes")
    local_bs = t.batch_size // ctx.world_size
    micro = min(t.micro_batch_size or local_bs, local_bs)
    if not train_examples:
        raise DataError("no training examples")
    teacher_dim = int(train_examples[0].teacher.shape[0])
    if model.alignment_head is None or model.alignment_head.output_dim != teacher_dim:
        raise DataError(f"the alignment head outputs {model.dim} values but the teacher vectors have {teacher_dim}")
    check_reporters(t.report_to)

    torch.manual_seed(cfg.seed)
    gc_on = t.gradient_checkpointing if t.gradient_checkpointing is not None else device.startswith("cuda")
    if gc_on:
        _enable_gradient_checkpointing(model.lm)
    trainable = TrainableLLM2VecGen(model, dtype=model.dtype if t.trainable_dtype == "model" else torch.float32)
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_ids = [torch.device(device).index] if device.startswith("cuda") else None
        engine: torch.nn.Module = DDP(trainable, device_ids=ddp_ids)
    else:
        engine = trainable
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=t.learning_rate, betas=t.adam_betas, eps=t.adam_eps,
                                  weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(t))

    start = 0
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        start = _load_checkpoint(ckpt, trainable, optimizer, scheduler, cfg)
        logger.info("resumed from %s at step %d", ckpt, start)
    elif not resume and ctx.is_main and (out / CHECKPOINTS_DIR).exists():
        shutil.rmtree(out / CHECKPOINTS_DIR)
    barrier(ctx)
    if ckpt is not None and start >= t.max_steps:
        # Nothing to train: report the finished run (its last loss) instead of an empty one.
        state = json.loads((ckpt / _STATE_FILE).read_text(encoding="utf-8"))
        model_dir = out / MODEL_DIR
        if ctx.is_main and not (model_dir / "run_config.yml").is_file():
            model_dir = _save_final(model, trainable, out, cfg, steps=start)
        barrier(ctx)
        _release(model, gc_on)
        loss = state.get("loss")
        return TrainResult(model_dir=model_dir if ctx.is_main else None, steps=start,
                           final_loss=float(loss) if isinstance(loss, (int, float)) else float("nan"),
                           already_finished=True)

    collator = Collator(model, max_length=t.max_length, max_response_length=t.max_response_length,
                        query_instruction=t.query_instruction, response_bos=t.response_bos, response_end=t.response_end)
    collator.warm(train_examples + eval_examples)
    metrics = _Metrics(out, cfg, start, enabled=ctx.is_main)
    cb.on_train_start(start, t.max_steps)
    losses: list[float] = []
    last_eval: float | None = None
    rec_tokens = None
    try:
        for step in range(start, t.max_steps):
            t0 = time.perf_counter()
            idx = global_batch_indices(len(train_examples), t.batch_size, step, cfg.seed)
            examples = [train_examples[i] for i in idx]
            # Normalisers, known on every process without communication.
            rec_tokens = sum(len(collator.response_tokens(e)) for e in examples)
            query_tokens = sum(len(collator.query_tokens(e.query)) for e in examples)
            local = examples[ctx.rank * local_bs:(ctx.rank + 1) * local_bs]
            local_tokens = sum(len(collator.response_tokens(e)) for e in local)
            rec_scale = rec_loss_scale(t, rec_tokens, local_tokens, ctx.world_size)
            align_scale = t.align_weight / (t.batch_size * teacher_dim) * ctx.world_size
            chunks = _micro_batches(list(range(len(local))), micro)
            sums = torch.zeros(3, dtype=torch.float64)  # CE sum, SE sum, this rank's mean CE
            for j, chunk in enumerate(chunks):
                batch = collator([local[i] for i in chunk], device)
                sync = j == len(chunks) - 1
                if ctx.active and not sync:
                    with engine.no_sync():  # type: ignore[operator]
                        loss, rec, align = engine(batch, rec_scale, align_scale, gc_on)
                        loss.backward()
                else:
                    loss, rec, align = engine(batch, rec_scale, align_scale, gc_on)
                    loss.backward()
                sums += torch.tensor([float(rec), float(align), float(rec) / max(local_tokens, 1)], dtype=torch.float64)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable.parameters(),
                                                       t.max_grad_norm if t.max_grad_norm is not None else float("inf"))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            sums = all_reduce_sum(ctx, sums)
            if t.loss_normalization == "per_rank":  # the mean over processes of each one's token mean
                rec_mean = float(sums[2]) / ctx.world_size
            else:
                rec_mean = float(sums[0]) / max(rec_tokens, 1)
            align_mean = float(sums[1]) / (t.batch_size * teacher_dim)
            loss_value = t.rec_weight * rec_mean + t.align_weight * align_mean
            losses.append(loss_value)
            if not math.isfinite(loss_value):
                raise DataError(f"training diverged at step {step + 1} (loss {loss_value}); lower train.learning_rate")
            elapsed = time.perf_counter() - t0
            row = {"step": step + 1, "loss": loss_value, "rec": rec_mean, "align": align_mean, "lr": lr,
                   "grad_norm": float(grad_norm), "tokens": rec_tokens + query_tokens,
                   "tokens_per_s": (rec_tokens + query_tokens) / max(elapsed, 1e-9), "step_time_s": elapsed}
            if (step + 1) % t.log_every == 0 or step + 1 == t.max_steps:
                metrics.write(row)
            cb.on_step(row)
            if eval_examples and ((step + 1) % t.eval_every == 0 or step + 1 == t.max_steps):
                ev = {"step": step + 1, **evaluate(trainable, collator, eval_examples, t, ctx, device, micro)}
                last_eval = ev["eval_loss"]
                metrics.write(ev)
                cb.on_eval(ev)
            if (step + 1) % t.save_every == 0 and step + 1 < t.max_steps:
                if ctx.is_main:
                    path = _save_checkpoint(out, step + 1, trainable, optimizer, scheduler, cfg, teacher_dim,
                                            loss=loss_value)
                    cb.on_checkpoint(path)
                barrier(ctx)
        model_dir = None
        cb.on_stage("save", str(out / MODEL_DIR))
        if ctx.is_main and t.max_steps > start:
            path = _save_checkpoint(out, t.max_steps, trainable, optimizer, scheduler, cfg, teacher_dim,
                                    loss=losses[-1] if losses else None)
            cb.on_checkpoint(path)
        if ctx.is_main:
            model_dir = _save_final(model, trainable, out, cfg)
        barrier(ctx)
    finally:
        metrics.close()
        _release(model, gc_on)
    return TrainResult(model_dir=model_dir, steps=t.max_steps, final_loss=losses[-1] if losses else float("nan"),
                       losses=losses, eval_loss=last_eval)


def _release(model: LLM2VecGen, gc_on: bool) -> None:
    """Back to an inference model: no gradient checkpointing, frozen float32 heads, eval mode."""
    if gc_on:
        model.lm.gradient_checkpointing_disable()
    for head in (model.reconstruction_head, model.alignment_head):
        if head is not None:
            head.requires_grad_(False)
            head.float()
            head.eval()
    model.lm.eval()


class _Float32Heads:
    """Heads trained in the backbone dtype (train.trainable_dtype: model) are saved as float32 values."""

    def __init__(self, model: LLM2VecGen) -> None:
        self.heads = [h for h in (model.reconstruction_head, model.alignment_head) if h is not None]
        self.dtypes = [next(h.parameters()).dtype for h in self.heads]

    def __enter__(self) -> None:
        for h in self.heads:
            h.float()

    def __exit__(self, *exc: object) -> None:
        for h, dt in zip(self.heads, self.dtypes):
            h.to(dt)


def _save_final(model: LLM2VecGen, trainable: TrainableLLM2VecGen, out: Path, cfg: PipelineConfig, *,
                steps: int | None = None) -> Path:
    """The trained model in the published layout, written beside and then swapped in atomically."""
    model.set_special_rows(trainable.special_rows.detach())
    t = cfg.train
    model.run_config.update({
        "max_input_length": t.max_length, "learning_rate": t.learning_rate, "max_steps": t.schedule_steps,
        "stop_after_steps": steps if steps is not None else t.max_steps,
        "warmup_steps": t.warmup_steps, "lr_scheduler_type": t.schedule, "per_device_train_batch_size": t.batch_size,
        "recon_loss_weight": t.rec_weight, "align_loss_weight": t.align_weight, "teacher_model": cfg.teacher.model,
        "seed": cfg.seed, "trained_with": "ragen",
    })
    final = out / MODEL_DIR
    tmp = out / f".{MODEL_DIR}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    with _Float32Heads(model):
        model.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


# ----------------------------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------------------------
def setup_runtime(cfg: PipelineConfig) -> tuple[DistContext, str, torch.dtype]:
    """Join the launcher's process group (if any); this process's device (cuda:LOCAL_RANK under a
    launcher) and the backbone dtype (bf16 on CUDA, float32 on CPU unless configured)."""
    device = resolve_device(None if cfg.device == "auto" else cfg.device)
    ctx = init_distributed(device)
    if device == "cuda" and ctx.active:
        device = f"cuda:{ctx.local_rank}"
    return ctx, device, resolve_dtype(None if cfg.dtype == "auto" else cfg.dtype, device)


def ensure_responses(cfg: PipelineConfig, out_dir: Path, ctx: DistContext, device: str, dtype: torch.dtype,
                     callback: TrainCallback | None = None) -> Path:
    """Stage 1 across all processes: each answers its shard, then the main process merges."""
    cb = callback or TrainCallback()
    if cfg.responses.source and not responses_complete(cfg, out_dir):
        cb.on_stage("responses", f"published responses from {cfg.responses.source}")
        if ctx.is_main:
            import_responses(cfg, out_dir)
    elif not responses_complete(cfg, out_dir):
        cb.on_stage("responses", f"{cfg.base_model}: answering {cfg.queries.source}")
        generate_responses(cfg, out_dir, shard=(ctx.rank, ctx.world_size), device=device, dtype=dtype,
                           progress=lambda d, n: cb.on_progress("responses", d, n))
        barrier(ctx)
        if ctx.is_main:
            merge_responses(cfg, out_dir)
    barrier(ctx)
    return out_dir / RESPONSES_FILE


def ensure_teacher_vectors(cfg: PipelineConfig, out_dir: Path, ctx: DistContext, device: str,
                           callback: TrainCallback | None = None) -> np.ndarray:
    """Stage 2: the main process computes (or finds cached) vectors; the others then read the cache."""
    cb = callback or TrainCallback()
    cb.on_stage("teacher", cfg.teacher.model)
    vectors = None
    if ctx.is_main:
        vectors, _ = compute_teacher_vectors(out_dir / RESPONSES_FILE, cfg.teacher, out_dir / TEACHER_DIR, device=device)
    barrier(ctx)
    if vectors is None:
        vectors, _ = compute_teacher_vectors(out_dir / RESPONSES_FILE, cfg.teacher, out_dir / TEACHER_DIR, device=device)
    return vectors


@torch.no_grad()
def reference_special_rows(model: LLM2VecGen, seed: int) -> torch.Tensor:
    """The K special-token rows as the reference's ``resize_token_embeddings(len(tokenizer))`` leaves them.

    - A token id inside the existing embedding table (Qwen: the checkpoint's reserved rows beyond the
      tokenizer's vocabulary) keeps that row.
    - A new id (Llama: the table is exactly the vocabulary) gets transformers' mean-resizing: a draw from
      N(mean, 1e-9 * covariance) of the existing rows, or the mean itself when that covariance is not
      positive definite, as transformers does (its default since 4.46).

    Seeded (``seed``); the reference draws from the global RNG."""
    table = model.lm.get_input_embeddings().weight  # (N, H)
    n, h = table.shape
    ids = list(model.special_ids)
    rows = torch.empty((len(ids), h), dtype=torch.float32)
    new = [i for i, t in enumerate(ids) if t >= n]
    for i, t in enumerate(ids):
        if t < n:
            rows[i] = table[t].float().cpu()
    if new:
        emb = table.float()
        mean = emb.mean(dim=0)
        centered = emb - mean
        chol, info = torch.linalg.cholesky_ex(1e-9 * (centered.T @ centered / n))  # transformers' PD check
        if int(info) == 0:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            z = torch.randn((len(new), h), generator=gen).to(emb.device)
            draws = mean + z @ chol.T  # ~ N(mean, 1e-9 * covariance)
        else:
            draws = mean.expand(len(new), h)
        rows[new] = draws.cpu()
    return rows


def finished_run(cfg: PipelineConfig, out_dir: str | Path) -> TrainResult | None:
    """The result of a run in ``out_dir`` that already reached ``cfg.train.max_steps`` with these settings
    (its final model written), or None. Loads no model."""
    out = Path(out_dir)
    ckpt = latest_checkpoint(out)
    if ckpt is None or not (out / MODEL_DIR / "run_config.yml").is_file():
        return None
    try:
        state = json.loads((ckpt / _STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("resume_fingerprint") != _resume_fingerprint(cfg):
        return None
    step = state.get("step")
    if not isinstance(step, int) or step < cfg.train.max_steps:
        return None
    loss = state.get("loss")
    return TrainResult(model_dir=out / MODEL_DIR, steps=step,
                       final_loss=float(loss) if isinstance(loss, (int, float)) else float("nan"), already_finished=True)


def run_pipeline(cfg: PipelineConfig, out_dir: str | Path, *, resume: bool = True,
                 callback: TrainCallback | None = None) -> TrainResult:
    """Responses -> teacher vectors -> training -> ``out_dir/model`` (published layout). Run it under
    ``torchrun``/``accelerate launch`` for data parallelism; every stage resumes where it stopped."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cb = callback or TrainCallback()
    if resume:
        done = finished_run(cfg, out)
        if done is not None:
            return done
    check_reporters(cfg.train.report_to)
    ctx, device, dtype = setup_runtime(cfg)
    if ctx.is_main:
        (out / "pipeline.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str), encoding="utf-8")
    responses = ensure_responses(cfg, out, ctx, device, dtype, cb)
    vectors = ensure_teacher_vectors(cfg, out, ctx, device, cb)
    examples = build_examples(read_responses(responses), vectors)
    train_ex, eval_ex = split_eval(examples, cfg.train.eval_size, cfg.seed)
    cb.on_stage("train", f"{len(train_ex)} examples, {len(eval_ex)} held out, {ctx.world_size} process(es) on {device}")
    model = LLM2VecGen.initialize(cfg.base_model, num_special_tokens=cfg.train.num_special_tokens,
                                  alignment_dim=int(vectors.shape[1]), device=device, dtype=dtype, seed=cfg.seed)
    if cfg.train.special_token_init == "reference":
        model.set_special_rows(reference_special_rows(model, cfg.seed))
    return fit(model, train_ex, eval_ex, cfg, out, ctx=ctx, resume=resume, callback=cb)
