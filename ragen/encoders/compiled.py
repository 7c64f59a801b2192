"""Opt-in ``torch.compile`` of an encoder's backbone forward, with length buckets (``compile=True``).

A compiled forward is specialised to its input shapes (``dynamic=False``: the fastest kernels, no symbolic
shapes), so every new (batch, length) shape costs one compile. To keep their number bounded, batches are
padded up to a bucket before the compiled call:

- length: four buckets per doubling, at least 16 tokens (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224,
  256, 320, ...), never above the call's ``max_length``: for 512, 16 lengths, and a batch gains at most a
  quarter of its length (coarser buckets compile less often but pad more: multiples of 64 padded a
  mixed-length benchmark by 55%);
- batch: the next power of two, never above the call's ``batch_size`` (for 32: 6 sizes); the extra rows
  repeat the first row and are dropped from the output.

Padding goes where the encoder already pads (LLM2Vec-Gen on the left, mean/cls/last pooling on the right)
with attention mask 0, so it does not change a vector beyond float rounding (tested against eager). Only
inference paths use the compiled forward; training and decoding stay eager.

Compile is a speed setting: it changes neither the fingerprint nor what an index records. Where it cannot
work (no ``torch.compile``, Apple ``mps``, no C++ compiler for inductor on CPU, no Triton on CUDA, or a
compile that fails on the first call) the encoder logs ONE warning and runs uncompiled.

Inductor keeps its compiled kernels on disk (the FX graph cache, on by default), so a second process
compiling the same shapes is much faster. The cache lives in ``$TORCHINDUCTOR_CACHE_DIR``, by default
``<tempdir>/torchinductor_<user>`` (e.g. ``/tmp/torchinductor_alice``); set the variable to keep it across
reboots or share it between machines with the same torch version and hardware.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: Buckets per doubling of the length.
BUCKETS_PER_OCTAVE = 4
#: The smallest length bucket (and the finest step).
MIN_BUCKET = 16
#: Dynamo's per-function recompile limit is raised to at least this (its default, 8, is below the number
#: of bucketed shapes one encode with mixed lengths can meet: 16 lengths x 6 batch sizes at 512 / 32).
RECOMPILE_LIMIT = 128


def bucket_length(n: int, cap: int | None = None, *, smallest: int = MIN_BUCKET,
                  per_octave: int = BUCKETS_PER_OCTAVE) -> int:
    """The padded length for a batch whose longest input has ``n`` tokens: the next multiple of a step
    that is a ``per_octave``-th of the power of two just below ``n`` (at least ``smallest``), so a batch
    gains at most 1/``per_octave`` of its length; at most ``cap`` (the input limit) when ``n`` fits under it
    (longer inputs get the uncapped bucket, so their shapes stay bounded too)."""
    if n < 1:
        raise ValueError(f"length must be positive, got {n}")
    if n <= smallest:
        bucket = smallest
    else:
        below = 1 << ((n - 1).bit_length() - 1)  # the largest power of two under n
        step = max(smallest, below // per_octave)
        bucket = -(-n // step) * step
    if cap is not None and n <= cap < bucket:
        bucket = cap
    return bucket


def bucket_batch(b: int, cap: int | None = None) -> int:
    """The padded batch size for ``b`` rows: the next power of two, at most ``cap`` (the call's
    ``batch_size``) but never below ``b``."""
    if b < 1:
        raise ValueError(f"batch size must be positive, got {b}")
    bucket = 1
    while bucket < b:
        bucket *= 2
    return max(b, min(bucket, cap)) if cap is not None else bucket


def pad_to_bucket(ids: torch.Tensor, mask: torch.Tensor, *, pad_id: int, side: str, max_length: int | None = None,
                  batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` (batch, seq) padded up to the bucket shape: ``pad_id`` with mask 0 on ``side``
    (``"left"`` or ``"right"``, where the encoder already pads), then rows repeating the first row. The
    first ``batch`` rows of a result computed from them are the original rows' results."""
    b, width = ids.shape
    target = bucket_length(width, max_length)
    if target > width:
        extra_ids = torch.full((b, target - width), pad_id, dtype=ids.dtype, device=ids.device)
        extra_mask = torch.zeros((b, target - width), dtype=mask.dtype, device=mask.device)
        if side == "left":
            ids, mask = torch.cat([extra_ids, ids], dim=1), torch.cat([extra_mask, mask], dim=1)
        elif side == "right":
            ids, mask = torch.cat([ids, extra_ids], dim=1), torch.cat([mask, extra_mask], dim=1)
        else:
            raise ValueError(f"side must be left or right, got {side!r}")
    rows = bucket_batch(b, None if batch_size is None else max(batch_size, b))
    if rows > b:
        ids = torch.cat([ids, ids[:1].expand(rows - b, -1)], dim=0)
        mask = torch.cat([mask, mask[:1].expand(rows - b, -1)], dim=0)
    return ids, mask


def compile_unavailable(device: str) -> str | None:
    """Why ``torch.compile`` cannot run on ``device`` here, or None when it can."""
    if not callable(getattr(torch, "compile", None)):
        return f"torch {torch.__version__} has no torch.compile (needs torch 2.0 or later)"
    kind = torch.device(device).type
    if kind == "mps":
        return "torch.compile is not used on Apple mps (inductor's Metal backend is experimental)"
    if kind == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except (ImportError, RuntimeError, OSError, AttributeError) as exc:
            msg = str(exc).strip().splitlines()
            return f"inductor finds no C++ compiler for CPU kernels ({msg[0][:120] if msg else type(exc).__name__}); " \
                   "install g++ or clang, or set CXX"
        return None
    if kind == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            return "this torch build cannot tell whether Triton is installed"
        if not has_triton():
            return "inductor needs Triton for CUDA kernels and it is not installed (pip install triton)"
        return None
    return f"torch.compile is not set up for device {device!r} in ragen"


def _compile_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this forward could not be compiled" (not "the model failed")."""
    errors: list[type[BaseException]] = []
    try:
        from torch._dynamo.exc import TorchDynamoException

        errors.append(TorchDynamoException)  # BackendCompilerFailed, Unsupported, InductorError (torch >= 2.6)
    except ImportError:
        pass
    try:
        from torch._inductor.exc import CppCompileError

        errors.append(CppCompileError)
    except ImportError:
        pass
    return tuple(errors) or (RuntimeError,)


class CompiledForward:
    """``forward(*tensors)`` run through ``torch.compile(dynamic=False)``, falling back to the eager
    function (one warning) when compiling is not possible here or fails on a call.

    A genuine error of the model itself reappears from the eager re-run, so the fallback never hides one.
    ``shapes`` records the distinct input shapes compiled so far (one compile each)."""

    def __init__(self, forward: Callable[..., Any], *, device: str, name: str) -> None:
        self.eager = forward
        self.name = name
        self.shapes: set[tuple[tuple[int, ...], ...]] = set()
        #: Why this forward runs eager (None while compiled).
        self.fallback_reason: str | None = compile_unavailable(device)
        self._compiled: Callable[..., Any] | None = None
        if self.fallback_reason is None:
            try:
                self._raise_recompile_limit()
                self._compiled = torch.compile(forward, dynamic=False)
            except _compile_errors() as exc:
                self.fallback_reason = f"torch.compile failed ({_first_line(exc)})"
        if self.fallback_reason is not None:
            self._warn()
        else:
            logger.info("%s: backbone forward compiled with torch.compile(dynamic=False); each new bucketed "
                        "shape compiles once (inductor cache: %s)", name, inductor_cache_dir())

    @property
    def active(self) -> bool:
        """Whether calls go through the compiled forward."""
        return self._compiled is not None

    def __call__(self, *tensors: torch.Tensor) -> Any:
        if self._compiled is not None:
            try:
                out = self._compiled(*tensors)
            except _compile_errors() as exc:
                self._compiled = None
                self.fallback_reason = f"torch.compile failed ({_first_line(exc)})"
                self._warn()
            else:
                self.shapes.add(tuple(tuple(t.shape) for t in tensors))
                return out
        return self.eager(*tensors)

    def _warn(self) -> None:
        logger.warning("%s: running uncompiled: %s", self.name, self.fallback_reason)

    @staticmethod
    def _raise_recompile_limit() -> None:
        import torch._dynamo.config as dynamo_config

        for key in ("recompile_limit", "cache_size_limit"):  # the name changed in torch 2.6
            if hasattr(dynamo_config, key):
                setattr(dynamo_config, key, max(int(getattr(dynamo_config, key)), RECOMPILE_LIMIT))
                return


def inductor_cache_dir() -> str:
    """Where inductor keeps compiled kernels: ``$TORCHINDUCTOR_CACHE_DIR`` or torch's default."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return os.environ["TORCHINDUCTOR_CACHE_DIR"]
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        return default_cache_dir()
    except ImportError:
        import getpass
        import tempfile

        return os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")


def _first_line(exc: BaseException, limit: int = 160) -> str:
    inner = getattr(exc, "inner_exception", None)  # BackendCompilerFailed wraps the compiler's own error
    if isinstance(inner, BaseException):
        exc = inner
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else type(exc).__name__


__all__ = ["BUCKETS_PER_OCTAVE", "MIN_BUCKET", "CompiledForward", "bucket_batch", "bucket_length", "compile_unavailable",
           "inductor_cache_dir", "pad_to_bucket"]
