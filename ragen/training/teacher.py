"""Stage 2: teacher vectors of the responses, computed once and cached on disk.

The cache is ``teacher-<teacher fingerprint>-<responses digest>.npy`` (float32, no pickle) with a JSON
sidecar naming the teacher, the responses file and the row order (ids). Any change to the teacher's
weights or to a response text gives a new key, so a stale cache is never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._io import atomic_save_npy, atomic_write_json
from ..encoders import load_encoder
from ..encoders.base import Encoder, hash_parts
from ..encoders.baselines import PooledEncoder
from ..errors import DataError
from .config import TeacherConfig
from .responses import read_responses

logger = logging.getLogger(__name__)


def load_teacher(cfg: TeacherConfig, *, device: str | None = None) -> Encoder:
    """The teacher named by ``cfg.model``: ``llm2vec:...`` (the paper's teacher, see
    :mod:`ragen.training.llm2vec_teacher`) and ``hf:NAME`` + pooling here, every other form via ``load_encoder``."""
    if cfg.model.startswith("llm2vec:"):
        from .llm2vec_teacher import LLM2VecTeacher

        if cfg.pooling not in (None, "mean"):
            raise DataError(f"teacher {cfg.model!r}: LLM2Vec teachers pool by masked mean; drop teacher.pooling")
        return LLM2VecTeacher(cfg.model, device=device, dtype=cfg.dtype, max_length=cfg.max_length)
    if cfg.model.startswith("hf:"):
        name = cfg.model[3:]
        if not name or cfg.pooling is None:
            raise DataError(f"teacher {cfg.model!r}: 'hf:NAME' needs a model name and teacher.pooling (mean, cls, last)")
        return PooledEncoder(name, pooling=cfg.pooling, device=device, dtype=cfg.dtype, max_length=cfg.max_length)
    if cfg.pooling is not None:
        raise DataError(f"teacher.pooling applies to 'hf:NAME' teachers only; {cfg.model!r} brings its own pooling")
    return load_encoder(cfg.model, device=device)


def teacher_config_key(cfg: TeacherConfig) -> str:
    """A short key for what the teacher computes, without loading it: spec, pooling, max length (local
    paths by absolute location)."""
    model = cfg.model
    prefix, sep, rest = model.partition(":")
    has_prefix = bool(sep) and len(prefix) > 1
    parts = (rest if has_prefix else model).split("+") if prefix == "llm2vec" else [rest if has_prefix else model]
    parts = [str(Path(p).expanduser().resolve()) if Path(p).expanduser().exists() else p for p in parts]
    model = (prefix + ":" if has_prefix else "") + "+".join(parts)
    return hash_parts("teacher/1", model, cfg.pooling, cfg.max_length, *([cfg.dtype] if cfg.dtype else []))


def responses_digest(records: Sequence[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for rec in records:
        h.update(json.dumps([str(rec["id"]), rec["response"]], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:16]


def compute_teacher_vectors(
    responses_path: str | Path,
    cfg: TeacherConfig,
    cache_dir: str | Path,
    *,
    device: str | None = None,
    teacher: Encoder | None = None,
) -> tuple[np.ndarray, Path]:
    """Teacher vectors of every response, ``(n_responses, teacher_dim)`` float32 in file order, and the
    cache file holding them.

    The cache key is the teacher *configuration* (model, pooling, max length) and the responses' digest,
    so a cache hit never loads the teacher model (reruns, resumes and every non-main DDP rank only read the
    file). The loaded teacher's weight fingerprint is recorded in the sidecar. A teacher whose weights
    change in place under the same name needs the cache directory removed."""
    records = read_responses(Path(responses_path))
    if not records:
        raise DataError(f"{responses_path}: no responses; run generate-responses first")
    digest = responses_digest(records)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    stem = f"teacher-{teacher_config_key(cfg)}-{digest}"
    npy, sidecar = cache / f"{stem}.npy", cache / f"{stem}.json"
    if npy.is_file() and sidecar.is_file():
        try:
            vectors = np.load(npy, allow_pickle=False)
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            logger.warning("%s: unreadable teacher cache (%s); recomputing", npy, exc)
        else:
            if (vectors.ndim == 2 and vectors.shape[0] == len(records) and meta.get("dim") == vectors.shape[1]
                    and meta.get("responses_digest") == digest):
                logger.info("teacher vectors from cache %s", npy)
                return vectors.astype(np.float32, copy=False), npy
            logger.warning("%s: teacher cache does not match (shape %s); recomputing", npy, vectors.shape)
    teacher = teacher if teacher is not None else load_teacher(cfg, device=device)
    texts = [str(rec["response"]) for rec in records]
    vectors = np.asarray(teacher.encode_documents(texts, batch_size=cfg.batch_size), dtype=np.float32)
    if vectors.shape != (len(records), teacher.dim) or not np.isfinite(vectors).all():
        raise DataError(f"teacher {cfg.model!r} returned vectors of shape {vectors.shape} (or non-finite values) "
                        f"for {len(records)} responses")
    atomic_save_npy(npy, vectors)
    atomic_write_json(sidecar, {"teacher": cfg.model, "pooling": cfg.pooling, "teacher_fingerprint": teacher.fingerprint,
                                 "dim": teacher.dim, "responses_file": str(responses_path), "responses_digest": digest,
                                 "count": len(records), "ids": [str(r["id"]) for r in records]})
    return vectors, npy
