"""Training LLM2Vec-Gen special tokens on a frozen LLM: responses -> teacher vectors -> losses -> checkpoint.

Stages (each a function here and a ``ragen`` CLI command):

1. :func:`generate_responses` / :func:`merge_responses` — the frozen LLM answers the queries (JSONL).
2. :func:`compute_teacher_vectors` — teacher embeddings of the responses, cached on disk.
3. :func:`fit` / :func:`run_pipeline` — the training loop; the result loads with ``LLM2VecGen.from_pretrained``.

Configuration: :class:`PipelineConfig` (frozen dataclasses), read from YAML/TOML by :func:`load_config`.
"""

from __future__ import annotations

from .config import (PipelineConfig, QueriesConfig, ResponsesConfig, TeacherConfig, TrainConfig, config_from_dict,
                     load_config, override_train)
from .data import Batch, Collator, Example, build_examples, global_batch_indices, split_eval
from .loop import TrainCallback, TrainResult, TrainableLLM2VecGen, fit, latest_checkpoint, run_pipeline
from .responses import Query, generate_responses, merge_responses, read_queries, read_responses
from .teacher import compute_teacher_vectors, load_teacher

__all__ = [
    "PipelineConfig", "QueriesConfig", "ResponsesConfig", "TeacherConfig", "TrainConfig", "config_from_dict",
    "load_config", "override_train", "Batch", "Collator", "Example", "build_examples", "global_batch_indices",
    "split_eval", "TrainCallback", "TrainResult", "TrainableLLM2VecGen", "fit", "latest_checkpoint",
    "run_pipeline", "Query", "generate_responses", "merge_responses", "read_queries", "read_responses",
    "compute_teacher_vectors", "load_teacher",
]
