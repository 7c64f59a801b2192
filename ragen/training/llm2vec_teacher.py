"""The paper's teacher: LLM2Vec of the same backbone, read natively (no ``trust_remote_code``, no pickle).

``teacher.model: llm2vec:MNTP+SIMCSE`` (or ``llm2vec:BASE+MNTP+SIMCSE``, or ``llm2vec:MNTP`` alone), e.g.
``llm2vec:McGill-NLP/LLM2Vec-Qwen3-8B-mntp+McGill-NLP/LLM2Vec-Qwen3-8B-mntp-unsup-simcse``:

1. the backbone named by the MNTP adapter's ``adapter_config.json`` (``base_model_name_or_path``), or
   BASE when given, loaded as a plain transformers ``AutoModel``;
2. the MNTP LoRA merged into its weights (``W += scale * B @ A``);
3. the unsupervised-SimCSE LoRA applied on top, unmerged (``y = W x + scale * B (A x)``), as the
   reference does with PEFT;
4. run **without the causal mask** (every token attends to every non-padding token), which is what
   LLM2Vec's ``*BiModel`` classes do;
5. masked mean pooling of the final hidden states over the response tokens (BOS included where the
   tokenizer adds one), inputs truncated to ``max_length`` tokens, as the reference's teacher.

The LoRA files are the ones PEFT writes: ``adapter_config.json`` + ``adapter_model.safetensors``. A
first part without ``adapter_config.json`` is taken as a plain base model (bidirectional, no MNTP).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..encoders.base import hash_parts, l2_normalize, length_sorted_batches, resolve_device, resolve_dtype, tensor_digest_bytes
from ..errors import CheckpointError, DataError

logger = logging.getLogger(__name__)

PREFIX = "llm2vec:"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ----------------------------------------------------------------------------------------------------------
# PEFT LoRA files
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraAdapter:
    """One LoRA adapter: per target module, ``(A (r, in), B (out, r), scale)``, keyed by module path."""

    source: str
    base_model: str | None
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def _local_dir(name: str, files: Sequence[str], *, required: Sequence[str] = ()) -> Path | None:
    """A local directory, or the named files of a hub repository fetched into the cache (None when the
    name is neither a directory nor a reachable hub repo holding ``required``)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name.count("/") != 1:
        return None
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return None
    folder: Path | None = None
    for f in files:
        try:
            folder = Path(hf_hub_download(name, f)).parent
        except (EntryNotFoundError, RepositoryNotFoundError, LocalEntryNotFoundError) as exc:
            if f in required:
                if isinstance(exc, LocalEntryNotFoundError):
                    raise CheckpointError(f"{name}: {f} is not in the local cache and the hub is unreachable; "
                                          f"download it where the hub is reachable (`hf download {name} --local-dir "
                                          "DIR`) and pass DIR") from None
                return None
        except OSError as exc:
            if f in required:
                raise CheckpointError(f"{name}: cannot fetch {f} ({str(exc).splitlines()[0][:160]})") from None
    return folder


def is_adapter(name: str) -> bool:
    d = _local_dir(name, (ADAPTER_CONFIG,))
    return d is not None and (d / ADAPTER_CONFIG).is_file()


def read_lora(name: str) -> LoraAdapter:
    """Read a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) from a directory
    or a hub repository. Only plain LoRA is accepted (no DoRA, no trained biases)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = _local_dir(name, (ADAPTER_CONFIG, ADAPTER_WEIGHTS), required=(ADAPTER_CONFIG, ADAPTER_WEIGHTS))
    if d is None or not (d / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{name}: no {ADAPTER_CONFIG}; expected a PEFT LoRA adapter (directory or hub id)")
    try:
        cfg = json.loads((d / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{d / ADAPTER_CONFIG}: not readable JSON ({exc.__class__.__name__})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{d / ADAPTER_CONFIG}: expected a JSON object")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise CheckpointError(f"{d / ADAPTER_CONFIG}: peft_type {cfg.get('peft_type')!r}; expected LORA")
    if cfg.get("use_dora") or str(cfg.get("bias", "none")) != "none":
        raise CheckpointError(f"{d / ADAPTER_CONFIG}: DoRA or trained LoRA biases are not supported; expected plain LoRA")
    weights = d / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{d}: no {ADAPTER_WEIGHTS}; expected PEFT's safetensors adapter file "
                              "(pickled adapter_model.bin is not read)")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({exc})") from None
    r0, alpha0 = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    ranks, alphas = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rslora, fan_in_fan_out = bool(cfg.get("use_rslora")), bool(cfg.get("fan_in_fan_out"))
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        b = tensors.get(module + ".lora_B.weight")
        if b is None:
            raise CheckpointError(f"{weights}: {key} has no matching lora_B")
        name_ = _module_name(module)
        r = int(next((v for k, v in ranks.items() if name_.endswith(k)), r0))
        alpha = float(next((v for k, v in alphas.items() if name_.endswith(k)), alpha0))
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{weights}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                                  "form a low-rank update")
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        if fan_in_fan_out:
            a, b = b.T.contiguous(), a.T.contiguous()
        layers[name_] = (a.float(), b.float(), scale)
    if not layers:
        raise CheckpointError(f"{weights}: no lora_A/lora_B tensors; expected a PEFT LoRA adapter")
    base = cfg.get("base_model_name_or_path")
    return LoraAdapter(source=name, base_model=str(base) if base else None, layers=layers)


def _module_name(key: str) -> str:
    """PEFT's saved key (``base_model.model.[model.]layers.0.self_attn.q_proj``) -> the module path in a
    transformers ``AutoModel`` (``layers.0.self_attn.q_proj``)."""
    for prefix in ("base_model.model.", "model."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _linear_modules(model: torch.nn.Module, adapter: LoraAdapter) -> dict[str, torch.nn.Linear]:
    modules = dict(model.named_modules())
    out = {}
    for name, (a, b, _) in adapter.layers.items():
        mod = modules.get(name) or modules.get(name.removeprefix("model."))
        if not isinstance(mod, torch.nn.Linear):
            raise CheckpointError(f"{adapter.source}: LoRA targets {name!r}, which is not a linear layer of the "
                                  "backbone; is it the adapter of another model?")
        if a.shape[1] != mod.in_features or b.shape[0] != mod.out_features:
            raise CheckpointError(f"{adapter.source}: {name}: LoRA shapes {tuple(b.shape)}x{tuple(a.shape)} do not fit "
                                  f"the backbone's {mod.out_features}x{mod.in_features} layer")
        out[name] = mod
    return out


@torch.no_grad()
def merge_lora(model: torch.nn.Module, adapter: LoraAdapter) -> None:
    """``W <- W + scale * B @ A`` for every target layer (computed in float32 or wider, stored in W's dtype)."""
    for name, mod in _linear_modules(model, adapter).items():
        a, b, scale = adapter.layers[name]
        w = mod.weight
        work = torch.promote_types(w.dtype, torch.float32)  # float32 at least, float64 stays float64
        w.copy_((w.to(work) + scale * (b.to(work) @ a.to(work)).to(w.device)).to(w.dtype))


class LoraLinear(torch.nn.Module):
    """A frozen linear layer plus an unmerged LoRA update: ``base(x) + scale * (x A^T) B^T``."""

    def __init__(self, base: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.base = base
        dtype, device = base.weight.dtype, base.weight.device
        self.register_buffer("lora_a", a.to(device=device, dtype=dtype))
        self.register_buffer("lora_b", b.to(device=device, dtype=dtype))
        self.scale = scale

    @property
    def weight(self) -> torch.Tensor:  # for code that inspects the layer (dtype/device)
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale


def apply_lora(model: torch.nn.Module, adapter: LoraAdapter) -> None:
    """Wrap every target layer in :class:`LoraLinear` (the adapter stays separate, as PEFT keeps it)."""
    targets = _linear_modules(model, adapter)
    modules = dict(model.named_modules())
    for name, mod in targets.items():
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        a, b, scale = adapter.layers[name]
        setattr(parent, child, LoraLinear(mod, a, b, scale))


def parse_spec(spec: str) -> tuple[str | None, str | None, str | None]:
    """``llm2vec:[BASE+]MNTP[+SIMCSE]`` -> (base or None, mntp or None, simcse or None). With two parts
    the first is the MNTP adapter (or a plain base when it holds no adapter_config.json)."""
    body = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    parts = [p.strip() for p in body.split("+")]
    if not body.strip() or any(not p for p in parts) or len(parts) > 3:
        raise DataError(f"teacher {spec!r}: expected llm2vec:MNTP+SIMCSE, llm2vec:BASE+MNTP+SIMCSE or llm2vec:MNTP "
                        "(adapter directories or hub ids)")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    first = parts[0]
    second = parts[1] if len(parts) == 2 else None
    if is_adapter(first):
        return None, first, second
    return first, None, second


# ----------------------------------------------------------------------------------------------------------
# the encoder
# ----------------------------------------------------------------------------------------------------------
def bidirectional_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) padding mask -> (B, 1, S, S) additive mask: every query attends to every real token."""
    keep = mask[:, None, None, :].bool().expand(-1, 1, mask.shape[1], -1)
    return torch.zeros(keep.shape, dtype=dtype, device=mask.device).masked_fill(~keep, torch.finfo(dtype).min)


def make_bidirectional(model: torch.nn.Module) -> None:
    """Turn off causality everywhere transformers looks for it (the mask we pass is bidirectional too)."""
    if hasattr(model, "config"):
        model.config.is_causal = False
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False


class LLM2VecTeacher:
    """LLM2Vec (bidirectional backbone + MNTP merged + SimCSE LoRA) with masked mean pooling."""

    def __init__(self, spec: str, *, device: str | None = None, dtype: Any = None, max_length: int = 512) -> None:
        from transformers import AutoModel, AutoTokenizer

        self._spec = spec if spec.startswith(PREFIX) else PREFIX + spec
        base, mntp_name, simcse_name = parse_spec(self._spec)
        mntp = read_lora(mntp_name) if mntp_name else None
        simcse = read_lora(simcse_name) if simcse_name else None
        base = base or (mntp.base_model if mntp else None)
        if not base:
            raise CheckpointError(f"{mntp_name}: {ADAPTER_CONFIG} names no base_model_name_or_path; use "
                                  "llm2vec:BASE+MNTP+SIMCSE")
        self.base_model, self.max_length = base, max_length
        dev = resolve_device(device)
        # The reference reads the tokenizer from the MNTP repository (it ships one), else from the base.
        tok_dir = _local_dir(mntp_name, _TOKENIZER_FILES) if mntp_name else None
        tok_src = str(tok_dir) if tok_dir is not None and (tok_dir / "tokenizer_config.json").is_file() else base
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tok_src, trust_remote_code=False)
            self.model = AutoModel.from_pretrained(base, dtype=resolve_dtype(dtype, dev), trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"teacher {spec!r}: cannot load {base!r} ({str(exc).splitlines()[0][:160]}); "
                                  "pass a local directory where the hub is unreachable") from None
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.requires_grad_(False)
        if mntp is not None:
            merge_lora(self.model, mntp)
        if simcse is not None:
            apply_lora(self.model, simcse)
        make_bidirectional(self.model)
        self.model.to(dev).eval()
        self.device = dev
        self._digest = hash_parts("llm2vec-teacher/1", base, self.max_length,
                                  *(tensor_digest_bytes(t) for ad in (mntp, simcse) if ad
                                    for a, b, _ in list(ad.layers.values())[:2] for t in (a, b)),
                                  tensor_digest_bytes(next(self.model.parameters()).flatten()[:4096]))

    @property
    def dim(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    @property
    def spec(self) -> str:
        return self._spec

    @property
    def fingerprint(self) -> str:
        return self._digest

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], *, batch_size: int = 32, normalize: bool = False) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not a single string; wrap it in a list")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        ids = self.tokenizer([t.strip() for t in texts], truncation=True, max_length=self.max_length)["input_ids"]
        pad = self.tokenizer.pad_token_id
        ids = [row if row else [pad] for row in ids]
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        dtype = next(self.model.parameters()).dtype
        for idx in length_sorted_batches([len(r) for r in ids], batch_size):
            width = max(len(ids[i]) for i in idx)
            batch = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):  # left padding, as the reference's teacher tokenizer
                batch[row, width - len(ids[i]):] = torch.tensor(ids[i])
                mask[row, width - len(ids[i]):] = 1
            mask = mask.to(self.device)
            # Positions count real tokens only, so a left-padded text is computed as it is alone.
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            hidden = self.model(input_ids=batch.to(self.device), attention_mask=bidirectional_mask(mask, dtype),
                                position_ids=positions).last_hidden_state.float()
            m = mask.unsqueeze(-1).float()
            out[idx] = ((hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)).cpu().numpy()
        return l2_normalize(out) if normalize else out

    def encode_queries(self, texts: Sequence[str], *, batch_size: int = 32, normalize: bool = False) -> np.ndarray:
        return self.encode(texts, batch_size=batch_size, normalize=normalize)

    def encode_documents(self, texts: Sequence[str], *, batch_size: int = 32, normalize: bool = False) -> np.ndarray:
        return self.encode(texts, batch_size=batch_size, normalize=normalize)
