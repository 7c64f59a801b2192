"""Training LLM2Vec-Gen special tokens on a frozen LLM: responses -> teacher vectors -> losses -> checkpoint.

Stages (each a function here and a ``ragen`` CLI command):

1. :func:`generate_responses` / :func:`merge_responses` — the frozen LLM answers the queries (JSONL), or
   :func:`import_responses` — published responses (``responses.source``), no generation.
2. :func:`compute_teacher_vectors` — teacher embeddings of the responses, cached on disk (the paper's
   teacher: :class:`LLM2VecTeacher`, ``teacher.model: llm2vec:MNTP+SIMCSE``).
3. :func:`fit` / :func:`run_pipeline` — the training loop; the result loads with ``LLM2VecGen.from_pretrained``.

Configuration: :class:`PipelineConfig` (frozen dataclasses), read from YAML/TOML by :func:`load_config`.
"""

from __future__ import annotations

from .config import (PipelineConfig, QueriesConfig, ResponsesConfig, TeacherConfig, TrainConfig, config_from_dict,
                     load_config, override_train)
from .data import Batch, Collator, Example, build_examples, global_batch_indices, split_eval
from .llm2vec_teacher import LLM2VecTeacher
from .loop import TrainCallback, TrainResult, TrainableLLM2VecGen, fit, latest_checkpoint, lr_factor, run_pipeline
from .plan import build_plan
from .responses import (Query, generate_responses, import_responses, merge_responses, read_published_responses,
                        read_queries, read_responses)
from .teacher import compute_teacher_vectors, load_teacher

__all__ = [
    "PipelineConfig", "QueriesConfig", "ResponsesConfig", "TeacherConfig", "TrainConfig", "config_from_dict",
    "load_config", "override_train", "Batch", "Collator", "Example", "build_examples", "global_batch_indices",
    "split_eval", "TrainCallback", "TrainResult", "TrainableLLM2VecGen", "fit", "latest_checkpoint",
    "run_pipeline", "Query", "generate_responses", "merge_responses", "read_queries", "read_responses",
    "compute_teacher_vectors", "load_teacher", "LLM2VecTeacher", "lr_factor", "build_plan", "import_responses",
    "read_published_responses",
]
