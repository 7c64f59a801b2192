"""Reading and writing the published LLM2Vec-Gen checkpoint layout.

Layout (``McGill-NLP/LLM2Vec-Gen-*`` on the hub, or a local directory)::

    run_config.yml                 flat YAML: model_name_or_path, torch_dtype, encoding_mode, special_tokens, ...
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   backbone tokenizer + the K special tokens
    encoder/adapter_config.json    PEFT TRAINABLE_TOKENS adapter on embed_tokens (token_indices)
    encoder/adapter_model.safetensors
        base_model.model.embed_tokens.trainable_tokens_delta   (K, hidden): the trained rows themselves
        base_model.model.embed_tokens.base_layer.weight        (V', hidden): resized matrix, when present
    encoder/config.json            backbone config + num_special_tokens, special_tokens_ids
    reconstruction_mlp, alignment_mlp   torch.save({"state_dict", "config"}) of one linear head each (optional)
    encoder_decoder_config.json    {"encoding_mode", "save_decoder"}

Nothing here imports peft: the adapter is two tensors and a JSON file.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from .._io import atomic_path, atomic_write_text
from ..errors import CheckpointError
from .hub import Resolved, resolve_model

logger = logging.getLogger(__name__)

ADAPTER_ROWS_KEY = "base_model.model.embed_tokens.trainable_tokens_delta"
ADAPTER_BASE_KEY = "base_model.model.embed_tokens.base_layer.weight"
HEAD_FILES = ("reconstruction_mlp", "alignment_mlp")
_HUB_PATTERNS = ["*.json", "*.yml", "*.yaml", "*.jinja", "*.txt", "*.model", "encoder/*", *HEAD_FILES]
_ENCODING_MODE = re.compile(r"last_(\d+)_tokens")


# ----------------------------------------------------------------------------------------------------------
# run_config.yml
# ----------------------------------------------------------------------------------------------------------
class _TolerantLoader(yaml.SafeLoader):
    """SafeLoader that reads ``!!python/...`` tags as plain values instead of constructing objects.

    The reference writes its run config by appending ``key: value`` lines, which can carry Python tags
    (e.g. for dtypes). We never execute them; a tagged scalar becomes its string, a tagged sequence its
    first element.
    """


def _construct_python_tag(loader: yaml.SafeLoader, _suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        values = loader.construct_sequence(node, deep=True)
        return values[0] if values else None
    return None


_TolerantLoader.add_multi_constructor("tag:yaml.org,2002:python/", _construct_python_tag)


def read_run_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; an LLM2Vec-Gen checkpoint needs run_config.yml "
                              "(model_name_or_path, encoding_mode, special_tokens)")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_TolerantLoader)  # noqa: S506 (safe subclass)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def parse_encoding_mode(mode: str, num_special_tokens: int, where: str) -> int:
    """``last_N_tokens`` -> N, validated against the number of special tokens."""
    m = _ENCODING_MODE.fullmatch(str(mode))
    if not m:
        raise CheckpointError(f"{where}: unknown encoding_mode {mode!r}; expected 'last_N_tokens' (e.g. last_10_tokens)")
    n = int(m.group(1))
    if not 1 <= n <= num_special_tokens:
        raise CheckpointError(f"{where}: encoding_mode {mode!r} pools {n} positions but the checkpoint has "
                              f"{num_special_tokens} special tokens")
    return n


# ----------------------------------------------------------------------------------------------------------
# linear heads (reconstruction_mlp / alignment_mlp)
# ----------------------------------------------------------------------------------------------------------
class ProjectionHead(torch.nn.Module):
    """One linear map applied to the pooled positions, in the reference's ``ProjectionModel`` format.

    ``pooling_mode``: ``linear`` (per position; ``size`` > 1 means one linear per position),
    ``mean_linear`` (average the positions first), ``first_N_linear`` (project the first
    ``input_dim`` features).
    """

    def __init__(self, input_dim: int, output_dim: int, *, size: int = 1, pooling_mode: str = "linear",
                 dtype: str = "torch.float32") -> None:
        super().__init__()
        if not (pooling_mode in ("linear", "mean_linear") or re.fullmatch(r"first_\d+_linear", pooling_mode)):
            raise ValueError(f"unknown pooling_mode {pooling_mode!r}; expected linear, mean_linear or first_N_linear")
        self.input_dim, self.output_dim, self.size = input_dim, output_dim, size
        self.pooling_mode, self.saved_dtype = pooling_mode, dtype
        self.source_path: Path | None = None
        if size == 1:
            self.projection: torch.nn.Module = torch.nn.Linear(input_dim, output_dim)
        else:
            self.projection = torch.nn.ModuleList(torch.nn.Linear(input_dim, output_dim) for _ in range(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, positions, in)
        if self.pooling_mode == "mean_linear":
            x = x.reshape(x.shape[0], -1, self.input_dim).mean(dim=1, keepdim=True)  # (batch, 1, in)
        elif self.pooling_mode != "linear":
            x = x[:, :, : self.input_dim]
        if isinstance(self.projection, torch.nn.ModuleList):
            if x.shape[1] != len(self.projection):
                raise ValueError(f"head has {len(self.projection)} per-position projections, got {x.shape[1]} positions")
            return torch.stack([proj(x[:, i]) for i, proj in enumerate(self.projection)], dim=1)
        return self.projection(x)  # (batch, positions, out)

    @property
    def projection_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def config(self) -> dict[str, Any]:
        return {"input_dim": self.input_dim, "output_dim": self.output_dim, "dtype": self.saved_dtype,
                "size": self.size, "pooling_mode": self.pooling_mode}

    def save(self, path: Path, *, dtype: str | None = None) -> None:
        """Write the reference's format. ``dtype`` (e.g. ``"bfloat16"``) is recorded as the head's dtype: the
        reference builds the head in that dtype, which must match the backbone's ``torch_dtype``."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        config = self.config()
        if dtype:
            config["dtype"] = "torch." + dtype.replace("torch.", "")
        _atomic_torch_save({"state_dict": state, "config": config}, path)

    @classmethod
    def load(cls, path: Path) -> ProjectionHead:
        """Read a head file, validating everything the forward pass relies on (one line per fault)."""
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for corrupt/unsafe files; all become one line
            raise CheckpointError(f"{path}: not a loadable head file ({exc.__class__.__name__}: "
                                  f"{str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
        if not isinstance(blob, dict) or not isinstance(blob.get("state_dict"), dict) \
                or not isinstance(blob.get("config"), dict):
            raise CheckpointError(f"{path}: expected a dict with a 'state_dict' dict and a 'config' dict, got "
                                  f"{type(blob).__name__}")
        cfg, state = blob["config"], blob["state_dict"]

        def positive_int(key: str, default: Any = None) -> int:
            value = cfg.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CheckpointError(f"{path}: config {key!r} must be a positive integer, got {value!r}")
            return value

        input_dim, output_dim, size = positive_int("input_dim"), positive_int("output_dim"), positive_int("size", 1)
        pooling_mode, dtype = cfg.get("pooling_mode", "linear"), cfg.get("dtype", "torch.float32")
        if not isinstance(pooling_mode, str) or not isinstance(dtype, str):
            raise CheckpointError(f"{path}: config 'pooling_mode' and 'dtype' must be strings")
        if dtype.replace("torch.", "") not in ("float32", "float16", "bfloat16", "float64"):
            raise CheckpointError(f"{path}: config dtype {dtype!r} is not a floating-point torch dtype")
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise CheckpointError(f"{path}: state_dict[{key!r}] must be a floating-point tensor, "
                                      f"got {type(value).__name__}")
        try:
            head = cls(input_dim, output_dim, size=size, pooling_mode=pooling_mode, dtype=dtype)
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != expected:
            bad = sorted(set(expected) ^ set(got)) or [k for k in expected if expected[k] != got[k]]
            key = bad[0]
            raise CheckpointError(f"{path}: state_dict[{key!r}] has shape {got.get(key, 'missing')}, expected "
                                  f"{expected.get(key, 'no such tensor')} for a {input_dim}->{output_dim} head "
                                  f"of size {size}")
        for key, value in state.items():
            check_finite(value, path, f"state_dict[{key!r}]")
        head.load_state_dict(state)
        head.source_path = path
        return head


def check_finite(tensor: torch.Tensor, where: Path | str, name: str) -> None:
    """Refuse NaN/inf weights: they would turn every embedding into NaN (and break JSON output)."""
    if not tensor.is_floating_point() or not tensor.numel():
        return
    # A sum is ~20x cheaper than isfinite() over a whole backbone and is non-finite whenever any element is
    # (NaN and inf propagate); only then count exactly (a finite-weights sum cannot overflow in practice).
    if bool(torch.isfinite(tensor.detach().sum())):
        return
    bad = int((~torch.isfinite(tensor.detach())).sum())
    if bad:
        raise CheckpointError(f"{where}: tensor {name} holds {bad} NaN/inf value(s); expected finite weights "
                              "(the checkpoint is corrupt or its training diverged)")


def read_encoder_decoder_config(path: Path) -> dict[str, Any]:
    """``encoder_decoder_config.json``: a mapping with ``encoding_mode`` (str) and ``save_decoder`` (bool)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object with encoding_mode and save_decoder, "
                              f"got {type(data).__name__}")
    if "encoding_mode" in data and not isinstance(data["encoding_mode"], str):
        raise CheckpointError(f"{path}: 'encoding_mode' must be a string like 'last_10_tokens', "
                              f"got {data['encoding_mode']!r}")
    return data


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# ----------------------------------------------------------------------------------------------------------
# locating a checkpoint
# ----------------------------------------------------------------------------------------------------------
def resolve_checkpoint(name_or_path: str, *, revision: str | None = None) -> Resolved:
    """A local directory as is; otherwise a hub repo id, fetched (or taken from the HF cache) at ``revision``."""
    return resolve_model(name_or_path, what="checkpoint", revision=revision, patterns=_HUB_PATTERNS)


def resolve_checkpoint_dir(name_or_path: str) -> Path:
    return resolve_checkpoint(name_or_path).path


def resolve_base_model(model_name_or_path: str, checkpoint_dir: Path) -> str:
    """Where the backbone lives. Relative paths in run_config.yml were written relative to the training
    job's working directory; try that, then the checkpoint directory and its parent."""
    candidate = Path(model_name_or_path).expanduser()
    if candidate.is_absolute() or candidate.is_dir():
        return str(candidate)
    for root in (checkpoint_dir, checkpoint_dir.parent):
        if (root / candidate).is_dir():
            return str(root / candidate)
    return model_name_or_path  # a hub id


# ----------------------------------------------------------------------------------------------------------
# the trainable-tokens adapter
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Adapter:
    token_indices: tuple[int, ...]
    rows: torch.Tensor  # (K, hidden): the trained embedding rows for token_indices, in that order
    base_layer: torch.Tensor | None  # (V', hidden) resized embedding matrix, when the checkpoint has it


def read_adapter(encoder_dir: Path) -> Adapter:
    cfg_path = encoder_dir / "adapter_config.json"
    weights_path = encoder_dir / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: missing; expected the PEFT TRAINABLE_TOKENS adapter config")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "TRAINABLE_TOKENS" or not cfg.get("token_indices"):
        got = cfg.get("peft_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise CheckpointError(f"{cfg_path}: expected peft_type TRAINABLE_TOKENS with token_indices, "
                              f"got peft_type={got!r}")
    raw = cfg["token_indices"]
    if not isinstance(raw, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in raw):
        raise CheckpointError(f"{cfg_path}: token_indices must be a list of non-negative token ids, got {raw!r:.80}")
    if len(set(raw)) != len(raw):
        raise CheckpointError(f"{cfg_path}: token_indices lists a token id twice: {raw!r:.80}")
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path}: missing; expected the trained special-token rows")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights_path), framework="pt") as f:
            keys = set(f.keys())
            if ADAPTER_ROWS_KEY not in keys:
                raise CheckpointError(f"{weights_path}: no tensor {ADAPTER_ROWS_KEY!r}")
            rows = f.get_tensor(ADAPTER_ROWS_KEY)
            base = f.get_tensor(ADAPTER_BASE_KEY) if ADAPTER_BASE_KEY in keys else None
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights_path}: not a valid safetensors file ({exc})") from None
    indices = tuple(raw)
    if rows.ndim != 2 or rows.shape[0] != len(indices) or not rows.is_floating_point():
        raise CheckpointError(f"{weights_path}: {ADAPTER_ROWS_KEY} has shape {tuple(rows.shape)} ({rows.dtype}), "
                              f"expected floating-point ({len(indices)}, hidden) for {len(indices)} token_indices")
    check_finite(rows, weights_path, ADAPTER_ROWS_KEY)
    if base is not None:
        if base.ndim != 2 or base.shape[1] != rows.shape[1] or not base.is_floating_point():
            raise CheckpointError(f"{weights_path}: {ADAPTER_BASE_KEY} has shape {tuple(base.shape)}, expected "
                                  f"floating-point (vocab, {rows.shape[1]})")
        check_finite(base, weights_path, ADAPTER_BASE_KEY)
    return Adapter(indices, rows, base)


def write_adapter(encoder_dir: Path, adapter: Adapter, backbone_config: dict[str, Any], base_name: str) -> None:
    from safetensors.torch import save_file

    encoder_dir.mkdir(parents=True, exist_ok=True)
    tensors = {ADAPTER_ROWS_KEY: adapter.rows.detach().cpu().contiguous()}
    if adapter.base_layer is not None:
        tensors[ADAPTER_BASE_KEY] = adapter.base_layer.detach().cpu().contiguous()
    with atomic_path(encoder_dir / "adapter_model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    adapter_cfg = {
        "auto_mapping": None, "base_model_name_or_path": base_name, "inference_mode": True,
        "init_weights": True, "peft_type": "TRAINABLE_TOKENS", "revision": None,
        "target_modules": "embed_tokens", "task_type": None, "token_indices": list(adapter.token_indices),
    }
    atomic_write_text(encoder_dir / "adapter_config.json", json.dumps(adapter_cfg, indent=2))
    config = dict(backbone_config)
    config["num_special_tokens"] = len(adapter.token_indices)
    config["special_tokens_ids"] = list(adapter.token_indices)
    atomic_write_text(encoder_dir / "config.json", json.dumps(config, indent=2, sort_keys=True))
