"""Training configuration: frozen dataclasses, read from a YAML or TOML pipeline file only at the edge.

A pipeline file has five sections, each optional except ``base_model`` and ``queries.source``::

    base_model: Qwen/Qwen3-0.6B          # hub id or directory (relative paths: relative to this file)
    seed: 0
    device: auto                         # auto | cpu | cuda | cuda:1 ...
    dtype: auto                          # auto (bf16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16
    queries:   {source, field, split, limit}
    responses: {max_new_tokens, batch_size, do_sample, temperature, top_p, top_k, repetition_penalty, seed,
                enable_thinking, system_prompt, max_prompt_length, source, split, query_field, response_field}
    teacher:   {model, pooling, batch_size, max_length, dtype}
    train:     {num_special_tokens, learning_rate, ..., see TrainConfig}

Relative paths inside the file (``base_model`` when it names an existing directory, ``queries.source``
when it names an existing file) are resolved against the directory holding the pipeline file, so a
pipeline runs the same from any working directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError

SCHEDULES = ("linear", "cosine", "constant")
POOLINGS = ("mean", "cls", "last")
LOSS_NORMALIZATIONS = ("global", "per_rank")
RESPONSE_ENDS = ("eos", "reference")
TOKEN_INITS = ("reference", "random")
TRAINABLE_DTYPES = ("float32", "model")
REPORTERS = ("tensorboard", "wandb")


@dataclass(frozen=True)
class QueriesConfig:
    """Where the training queries come from.

    ``source``: a ``.txt`` file (one query per line), a ``.jsonl`` file (field ``field``, or the first of
    query/prompt/question/text/instruction, or the first user turn of ``messages``), or a hub dataset id
    (e.g. ``allenai/tulu-3-sft-mixture``; needs the ``datasets`` package and hub access). Chat records
    (``messages``) are kept only when they hold exactly 2 messages, and the query is the first one's
    content: the reference's filter of the Tulu mixture.
    """

    source: str = ""  # may stay empty when responses.source gives published responses
    field: str | None = None
    split: str = "train"
    limit: int | None = None


@dataclass(frozen=True)
class ResponsesConfig:
    """How the frozen LLM answers the queries (stage 1), or where published responses come from.

    Sampling: every setting left at null comes from the model's own ``generation_config.json``, which is
    what the reference gets (it passes no sampling arguments; Qwen3 then samples with its temperature
    0.6, top_p 0.95, top_k 20). Set ``do_sample: false`` for greedy answers. The effective values are
    recorded in ``responses.settings.json``.

    ``source`` skips generation: a hub dataset (e.g. ``McGill-NLP/llm2vec-gen-tulu`` with ``split:
    Qwen3_8B``, the paper's responses of each backbone) or a local ``.jsonl``/``.parquet`` file, with
    ``query_field``/``response_field`` (default: question/answer as the published dataset, else
    query/response).
    """

    max_new_tokens: int = 500
    batch_size: int = 16
    do_sample: bool | None = None  # null: the model's generation_config decides
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None  # sampling seed; null: the pipeline's seed
    enable_thinking: bool = False  # passed to chat templates that know the switch (Qwen3), as the reference
    system_prompt: str | None = None
    max_prompt_length: int = 1024  # tokens of the templated prompt; the query text is cut, never the template
    dtype: str | None = None  # generation dtype; null: the pipeline's (the reference generates in float16)
    source: str | None = None  # published responses (hub dataset id or local .jsonl/.parquet): no generation
    split: str = "train"
    query_field: str | None = None
    response_field: str | None = None


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher whose embedding of each response the alignment loss matches (stage 2).

    ``model``:

    - ``llm2vec:MNTP+SIMCSE`` (also ``llm2vec:BASE+MNTP+SIMCSE``): the paper's teacher, LLM2Vec of the
      same backbone: bidirectional attention, the MNTP LoRA merged, the unsupervised-SimCSE LoRA on top,
      masked mean pooling, e.g. ``llm2vec:McGill-NLP/LLM2Vec-Qwen3-8B-mntp+McGill-NLP/LLM2Vec-Qwen3-8B-mntp-unsup-simcse``;
    - ``hf:NAME`` with ``pooling`` mean | cls | last (a plain Hugging Face encoder); the paper's V2
      teacher is ``hf:BAAI/bge-m3-unsupervised`` with ``pooling: cls``;
    - ``minilm`` (bundled all-MiniLM-L6-v2, offline), ``st:NAME`` (any sentence-transformers model, its
      own pooling), ``mean:BACKBONE`` (a causal LLM, mean pooling; not LLM2Vec: causal attention, no LoRA).
    """

    model: str = "minilm"
    pooling: str | None = None
    batch_size: int = 64
    max_length: int = 512
    dtype: str | None = None  # null: bf16 on CUDA (the reference's teacher dtype), float32 on CPU


@dataclass(frozen=True)
class TrainConfig:
    """Stage 3. Defaults follow the reference recipe (LLM2Vec-Gen, Qwen3 backbones)."""

    num_special_tokens: int = 10
    learning_rate: float = 3e-4  # the reference uses 5e-4 for non-Qwen3 backbones
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "linear"  # after warmup: linear decay to 0 at schedule_steps | cosine | constant
    schedule_steps: int = 20000  # horizon of warm-up + decay (the reference: 20,000, stopped at 5,000)
    max_steps: int = 5000  # where training stops (the reference's stop_after_steps)
    batch_size: int = 32  # global: examples per optimizer step over all processes
    micro_batch_size: int | None = None  # examples per forward pass per process (gradient accumulation)
    max_length: int = 512  # query tokens incl. the K special tokens
    max_response_length: int = 512  # response tokens incl. EOS
    query_instruction: str = ""  # prefix for training queries (the reference trains on the bare query)
    response_bos: bool = True  # the tokenizer's own special tokens on responses (Llama: BOS), as the reference
    response_end: str = "eos"  # eos: the real EOS where the LLM stopped | reference: literal "<|end_of_text|>"
    special_token_init: str = "reference"  # reference: as resize_token_embeddings | random: mean + N(0, std)
    trainable_dtype: str = "float32"  # float32 | model: rows and heads in the backbone dtype, as the reference
    loss_normalization: str = "global"  # global: tokens of the global batch | per_rank: the reference's DDP means
    rec_weight: float = 1.0
    align_weight: float = 1.0
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool | None = None  # None: on for CUDA, off on CPU
    eval_size: int = 0  # held-out queries (taken from the responses) for the eval loss
    eval_every: int = 500
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 1
    report_to: tuple[str, ...] = ()  # tensorboard and/or wandb; only when installed
    wandb_project: str = "ragen"


@dataclass(frozen=True)
class PipelineConfig:
    base_model: str
    queries: QueriesConfig = field(default_factory=QueriesConfig)
    responses: ResponsesConfig = field(default_factory=ResponsesConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    source: str = ""  # the file it was read from (informational)

    def fingerprint(self, section: str | None = None) -> str:
        """A short digest of the whole config or of one section (what a resume must match)."""
        data = dataclasses.asdict(self)
        data.pop("source")
        if section is not None:
            data = data[section]
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------
def validate(cfg: PipelineConfig) -> PipelineConfig:
    where = cfg.source or "config"
    t, r, te = cfg.train, cfg.responses, cfg.teacher

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise DataError(f"{where}: {msg}")

    need(bool(cfg.base_model), "base_model is required (hub id or directory)")
    need(bool(cfg.queries.source) or bool(r.source),
         "queries.source (.txt, .jsonl or a hub dataset id) or responses.source (published responses) is required")
    need(cfg.queries.limit is None or cfg.queries.limit > 0, "queries.limit must be > 0")
    need(r.max_new_tokens >= 1, "responses.max_new_tokens must be >= 1")
    need(r.batch_size >= 1, "responses.batch_size must be >= 1")
    need(r.temperature is None or r.temperature > 0,
         "responses.temperature must be > 0 (for greedy answers set responses.do_sample: false)")
    need(r.top_p is None or 0 < r.top_p <= 1, "responses.top_p must be in (0, 1]")
    need(r.top_k is None or r.top_k >= 0, "responses.top_k must be >= 0 (0 disables it)")
    need(r.repetition_penalty is None or r.repetition_penalty > 0, "responses.repetition_penalty must be > 0")
    need(r.max_prompt_length >= 16, "responses.max_prompt_length must be >= 16 tokens")
    need(r.dtype in (None, "auto", "float32", "bfloat16", "float16"),
         "responses.dtype must be null, auto, float32, bfloat16 or float16")
    need(te.pooling is None or te.pooling in POOLINGS, f"teacher.pooling must be one of {', '.join(POOLINGS)}")
    need(not te.model.startswith("hf:") or te.pooling is not None,
         "teacher.model 'hf:NAME' needs teacher.pooling (mean, cls or last)")
    need(te.dtype in (None, "auto", "float32", "bfloat16", "float16"),
         "teacher.dtype must be null, auto, float32, bfloat16 or float16")
    need(te.batch_size >= 1 and te.max_length >= 1, "teacher.batch_size and teacher.max_length must be >= 1")
    need(t.num_special_tokens >= 1, "train.num_special_tokens must be >= 1")
    need(t.learning_rate > 0, "train.learning_rate must be > 0")
    need(t.warmup_steps >= 0 and t.max_steps >= 1, "train.warmup_steps must be >= 0 and train.max_steps >= 1")
    need(t.schedule_steps >= 1, "train.schedule_steps must be >= 1 (the horizon of warm-up + decay)")
    need(t.schedule == "constant" or t.schedule_steps > t.warmup_steps,
         f"train.schedule_steps={t.schedule_steps} must exceed train.warmup_steps={t.warmup_steps}")
    need(t.schedule == "constant" or t.max_steps <= t.schedule_steps,
         f"train.max_steps={t.max_steps} exceeds train.schedule_steps={t.schedule_steps} (the learning rate is 0 "
         "from there on); raise train.schedule_steps")
    need(t.loss_normalization in LOSS_NORMALIZATIONS,
         f"train.loss_normalization must be one of {', '.join(LOSS_NORMALIZATIONS)}, got {t.loss_normalization!r}")
    need(t.response_end in RESPONSE_ENDS, f"train.response_end must be one of {', '.join(RESPONSE_ENDS)}")
    need(t.special_token_init in TOKEN_INITS, f"train.special_token_init must be one of {', '.join(TOKEN_INITS)}")
    need(t.trainable_dtype in TRAINABLE_DTYPES, f"train.trainable_dtype must be one of {', '.join(TRAINABLE_DTYPES)}")
    need(t.schedule in SCHEDULES, f"train.schedule must be one of {', '.join(SCHEDULES)}, got {t.schedule!r}")
    need(t.batch_size >= 1, "train.batch_size must be >= 1")
    need(t.micro_batch_size is None or t.micro_batch_size >= 1, "train.micro_batch_size must be >= 1")
    need(t.micro_batch_size is None or t.micro_batch_size <= t.batch_size,
         f"train.micro_batch_size={t.micro_batch_size} must be <= train.batch_size={t.batch_size} "
         "(examples per forward pass within one optimizer step)")
    need(t.max_length > t.num_special_tokens, "train.max_length must exceed train.num_special_tokens")
    need(t.max_response_length >= 2, "train.max_response_length must be >= 2")
    need(t.rec_weight >= 0 and t.align_weight >= 0 and t.rec_weight + t.align_weight > 0,
         "train.rec_weight and train.align_weight must be >= 0 and not both 0")
    need(t.max_grad_norm is None or t.max_grad_norm > 0, "train.max_grad_norm must be > 0 or null")
    need(t.eval_size >= 0 and t.eval_every >= 1 and t.save_every >= 1 and t.log_every >= 1,
         "train.eval_size must be >= 0; eval_every, save_every and log_every >= 1")
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
    bad = [x for x in t.report_to if x not in REPORTERS]
    need(not bad, f"train.report_to: unknown {bad}; expected any of {', '.join(REPORTERS)}")
    need(len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas), "train.adam_betas must be two numbers in [0, 1)")
    return cfg


# ----------------------------------------------------------------------------------------------------------
# reading files (the edge)
# ----------------------------------------------------------------------------------------------------------
def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Check/convert one plain value against a dataclass field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise DataError(f"{where}: must not be null")
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if annotation is bool:
        if not isinstance(value, bool):
            raise DataError(f"{where}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "3e-4" as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise DataError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise DataError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise DataError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    raise TypeError(f"unsupported annotation {annotation!r}")  # pragma: no cover - programming error


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise DataError(f"{where}: unknown key(s) {unknown}; valid keys: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{where}.{name}")
        else:
            kwargs[name] = _convert(value, hint, f"{where}.{name}")
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise DataError(f"{where}: missing required key(s) {missing}")
    return cls(**kwargs)


def _resolve_relative(value: str, root: Path) -> str:
    """A relative path that exists next to the config file wins; anything else (hub ids) stays as is."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = root / p
    if candidate.exists():
        return str(candidate.resolve())
    return value


def config_from_dict(data: dict[str, Any], *, root: str | Path | None = None, source: str = "config") -> PipelineConfig:
    """Build and validate a :class:`PipelineConfig` from plain data; relative paths resolve against ``root``."""
    if not isinstance(data, dict):
        raise DataError(f"{source}: expected a mapping of settings at the top level")
    data = dict(data)
    data["source"] = source
    if isinstance(data.get("queries"), str):
        data["queries"] = {"source": data["queries"]}
    cfg = _build(PipelineConfig, data, source)
    if root is not None:
        root = Path(root)
        rsrc = cfg.responses.source
        tmodel = cfg.teacher.model
        if tmodel.startswith("llm2vec:"):
            tmodel = "llm2vec:" + "+".join(_resolve_relative(x, root) for x in tmodel[len("llm2vec:"):].split("+"))
        elif tmodel.startswith(("hf:", "st:", "mean:", "cls:", "last:")):
            head, _, rest = tmodel.partition(":")
            tmodel = f"{head}:{_resolve_relative(rest, root)}" if rest else tmodel
        cfg = dataclasses.replace(
            cfg, base_model=_resolve_relative(cfg.base_model, root), teacher=dataclasses.replace(cfg.teacher, model=tmodel),
            queries=dataclasses.replace(cfg.queries, source=_resolve_relative(cfg.queries.source, root)
                                        if cfg.queries.source else ""),
            responses=dataclasses.replace(cfg.responses, source=_resolve_relative(rsrc, root) if rsrc else rsrc))
    return validate(cfg)


def utf8_error(path: str | Path, exc: UnicodeDecodeError, expected: str) -> DataError:
    return DataError(f"{path}: not UTF-8 text (invalid byte at offset {exc.start}); expected {expected}")


def read_utf8(path: str | Path, expected: str) -> str:
    """A text file's contents; bytes that are not UTF-8 are one clear error naming the file."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise utf8_error(path, exc, expected) from None


def load_config(path: str | Path) -> PipelineConfig:
    """Read a pipeline file (``.yaml``/``.yml`` or ``.toml``)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such pipeline file; expected a .yaml or .toml training config")
    text = read_utf8(p, "a UTF-8 .yaml or .toml training config")
    if p.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise ImportError("TOML pipeline files need Python 3.11+ or `pip install tomli`; "
                                  "or write the pipeline as YAML") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise DataError(f"{p}: not valid TOML ({exc})") from None
    elif p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise DataError(f"{p}: not valid YAML ({exc.__class__.__name__})") from None
    else:
        raise DataError(f"{p}: unknown config format {p.suffix!r}; expected .yaml, .yml or .toml")
    return config_from_dict(data or {}, root=p.resolve().parent, source=str(p))


def override_train(cfg: PipelineConfig, **changes: Any) -> PipelineConfig:
    """A copy with some ``train`` keys changed (CLI overrides such as --max-steps), validated."""
    return validate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes)))
