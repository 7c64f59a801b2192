"""What a pipeline file will do, resolved without loading any model (``ragen train CONFIG --dry-run``).

Sizes come from each model's ``config.json`` when it is local or in the Hugging Face cache; offline,
the published LLM2Vec-Gen backbones fall back to their known hidden sizes, so every recipe in
``pipelines/recipes/`` plans without network access.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import PipelineConfig
from .loop import lr_factor

# Hidden sizes of the backbones LLM2Vec-Gen was published for (their config.json), for offline plans.
KNOWN_HIDDEN = {
    "Qwen/Qwen3-0.6B": 1024, "Qwen/Qwen3-1.7B": 2048, "Qwen/Qwen3-4B": 2560, "Qwen/Qwen3-8B": 4096,
    "Qwen/Qwen2.5-0.5B-Instruct": 896, "Qwen/Qwen2.5-1.5B-Instruct": 1536, "Qwen/Qwen2.5-3B-Instruct": 2048,
    "Qwen/Qwen2.5-7B-Instruct": 3584, "meta-llama/Llama-3.2-1B-Instruct": 2048, "meta-llama/Llama-3.2-3B-Instruct": 3072,
    "meta-llama/Llama-3.1-8B-Instruct": 4096,
}
MINILM_DIM = 384


@dataclass
class Plan:
    lines: list[tuple[str, str]] = field(default_factory=list)  # (label, text)
    facts: dict[str, Any] = field(default_factory=dict)  # the same, machine-readable

    def add(self, label: str, text: str) -> None:
        self.lines.append((label, text))


def _config(name: str) -> Any | None:
    """A model's config from a local directory or the local hub cache; None when not available offline."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError):
        return None


def _hidden(name: str) -> tuple[int | None, Any | None]:
    cfg = _config(name)
    if cfg is not None:
        return int(cfg.get_text_config().hidden_size), cfg
    return KNOWN_HIDDEN.get(name), None


def _param_count(cfg: Any) -> int | None:
    """Parameters of the causal LM a config describes, counted on the meta device (no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    except (ValueError, KeyError, TypeError, RuntimeError):
        return None
    return sum(p.numel() for p in model.parameters())


def _fmt_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit} ({n:,})"
    return f"{n:,}"


def _teacher(cfg: PipelineConfig, hidden: int | None) -> tuple[str, int | None]:
    te = cfg.teacher
    if te.model == "minilm":
        return "minilm (bundled all-MiniLM-L6-v2, mean pooling, offline)", MINILM_DIM
    if te.model.startswith("llm2vec:"):
        from .llm2vec_teacher import ADAPTER_CONFIG

        parts = te.model[len("llm2vec:"):].split("+")
        if len(parts) == 3:
            base, mntp, simcse = parts
        else:
            # No hub access in a plan: a local first part is an adapter when it holds adapter_config.json;
            # a hub id is taken as the MNTP adapter when its name says so (McGill-NLP/LLM2Vec-*-mntp).
            first = Path(parts[0]).expanduser()
            is_mntp = (first / ADAPTER_CONFIG).is_file() if first.is_dir() else "mntp" in parts[0].lower()
            base, mntp = (None, parts[0]) if is_mntp else (parts[0], None)
            simcse = parts[1] if len(parts) > 1 else None
        if base is None and mntp and (Path(mntp).expanduser() / ADAPTER_CONFIG).is_file():
            try:
                base = json.loads((Path(mntp).expanduser() / ADAPTER_CONFIG).read_text(encoding="utf-8")).get(
                    "base_model_name_or_path")
            except (OSError, ValueError):
                base = None
        dim = _hidden(base)[0] if base else None
        if dim is None:
            dim = hidden  # LLM2Vec of the same backbone (the paper's setting)
        text = (f"LLM2Vec: {base or 'the base named by the MNTP adapter (assumed: ' + cfg.base_model + ')'}"
                + (f", MNTP LoRA {mntp} merged" if mntp else "")
                + (f", SimCSE LoRA {simcse} on top" if simcse else "")
                + f"; bidirectional attention, masked mean pooling, max {te.max_length} tokens")
        return text, dim
    if te.model.startswith("hf:"):
        name = te.model[3:]
        return f"{name} ({te.pooling} pooling, max {te.max_length} tokens)", _hidden(name)[0]
    prefix, _, name = te.model.partition(":")
    if prefix == "st":
        return f"sentence-transformers {name}", None
    if prefix in ("mean", "cls", "last"):
        return f"{name} ({prefix} pooling, causal attention)", _hidden(name)[0]
    return te.model, None


def build_plan(cfg: PipelineConfig, out_dir: Path, world_size: int = 1) -> Plan:
    """Resolve ``cfg`` into what each stage will do, the schedule, and the parameter counts."""
    plan = Plan()
    t, r = cfg.train, cfg.responses
    hidden, base_cfg = _hidden(cfg.base_model)
    plan.add("base model", f"{cfg.base_model} (frozen; dtype {cfg.dtype}, device {cfg.device})")
    # stage 1
    if r.source:
        where = r.source if Path(r.source).exists() else f"{r.source} split {r.split}"
        plan.add("1 responses", f"published: {where} (no generation)")
    else:
        from .responses import read_queries

        src = cfg.queries.source
        if Path(src).is_file():
            n = len(read_queries(cfg.queries))
            data = f"{n} queries from {src}"
        else:
            data = f"queries from hub dataset {src} split {cfg.queries.split}" + (
                f" (first {cfg.queries.limit})" if cfg.queries.limit else "")
        asked = {k: getattr(r, k) for k in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
                 if getattr(r, k) is not None}
        sampling = ", ".join(f"{k}={v}" for k, v in asked.items()) or "the model's generation_config"
        plan.add("1 responses", f"generate: {data}; max {r.max_new_tokens} new tokens, prompt budget "
                                f"{r.max_prompt_length}, sampling: {sampling}")
    # stage 2
    teacher_text, dim = _teacher(cfg, hidden)
    plan.add("2 teacher", teacher_text + (f"; dim {dim}" if dim else ""))
    # stage 3: schedule
    last = max(t.max_steps - 1, 0)
    peak = t.learning_rate
    stop_lr = peak * lr_factor(t, last)
    applied = sum(lr_factor(t, s) for s in range(t.max_steps))
    plan.add("3 train", f"{t.max_steps} steps of a {t.schedule} schedule over {t.schedule_steps} "
                        f"(warm-up {t.warmup_steps}); peak LR {peak:g}, LR at the stop {stop_lr:.3g} "
                        f"({100 * stop_lr / peak:.0f}% of peak)")
    local = t.batch_size // max(world_size, 1)
    micro = min(t.micro_batch_size or local, local)
    accum = -(-local // micro) if micro else 1
    plan.add("batch", f"{t.batch_size} examples per step = {world_size} process(es) x {local}"
                      + (f" in {accum} micro-batches of {micro}" if accum > 1 else ""))
    plan.add("tokens", f"K={t.num_special_tokens} special tokens (last_{t.num_special_tokens}_tokens), query "
                       f"max {t.max_length} tokens, response max {t.max_response_length}; loss: "
                       f"{t.rec_weight:g} x reconstruction + {t.align_weight:g} x alignment "
                       f"({t.loss_normalization} normalisation)")
    # parameters
    if hidden is not None and dim is not None:
        rows = t.num_special_tokens * hidden
        recon = hidden * hidden + hidden
        align = hidden * dim + dim
        trainable = rows + recon + align
        text = (f"trainable {_fmt_count(trainable)}: {t.num_special_tokens} x {hidden} token rows + "
                f"reconstruction head {hidden}x{hidden} + alignment head {hidden}x{dim} ({t.trainable_dtype})")
        plan.facts["trainable_params"] = trainable
    else:
        text = "trainable: unknown until the model's config.json is available"
        trainable = None
    total = _param_count(base_cfg) if base_cfg is not None else None
    text += f"; backbone {_fmt_count(total)} frozen" if total else "; backbone size: needs its config.json (not cached)"
    plan.add("parameters", text)
    plan.add("output", str(out_dir))
    plan.facts.update({"hidden": hidden, "teacher_dim": dim, "stop_lr": stop_lr, "lr_applied_steps": applied,
                       "backbone_params": total, "max_steps": t.max_steps, "schedule_steps": t.schedule_steps})
    return plan
