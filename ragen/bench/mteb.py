"""MTEB 2.x: run any ragen encoder through ``mteb.evaluate`` with the LLM2Vec-Gen evaluation's instructions.

:class:`MTEBEncoder` implements mteb 2.x's encoder protocol (``encode(DataLoader[BatchedInput], *,
task_metadata, hf_split, hf_subset, prompt_type)``). For encoders that take instructions (LLM2Vec-Gen),
documents get "Summarize the following passage:" and every other input the task's instruction from the
reference's ``generative.json`` (:data:`~ragen.bench.instructions.MTEB_INSTRUCTIONS`), joined as its
``scripts/mteb_eval.py`` joins them: ``instruction.strip() + " " + text.strip()``. Baselines (MiniLM, ``st:``)
embed the raw text. Similarity is cosine, as there.

:func:`local_retrieval_task` gives a registered MTEB retrieval task (e.g. ``SciFact``) its data from a local
BEIR-layout folder instead of the hub, so runs work offline. Needs ``pip install "ragen-toolkit[mteb]"``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..encoders.base import Encoder, accepts_keyword, takes_instructions
from ..errors import DataError, RagenError
from .data import join_instruction, join_text, load_beir, read_beir_corpus
from .instructions import MTEB_DOCUMENT_INSTRUCTION, MTEB_INSTRUCTIONS

logger = logging.getLogger(__name__)

MTEB_HINT = 'pip install "ragen-toolkit[mteb]" (or, from a checkout, pip install -e ".[mteb]")'


def require_mteb():
    try:
        import mteb
    except ImportError:
        raise ImportError(f"MTEB evaluation needs mteb 2.x: {MTEB_HINT}") from None
    major = int(str(getattr(mteb, "__version__", "0")).split(".")[0] or 0)
    if major < 2:
        raise ImportError(f"MTEB evaluation needs mteb 2.x, found {mteb.__version__}: {MTEB_HINT}")
    return mteb


def _base_class():
    require_mteb()
    from mteb.models.abs_encoder import AbsEncoder

    return AbsEncoder


def _texts(inputs: Any) -> list[str]:
    """The ``text`` field of every batch of an mteb DataLoader (or any iterable of such batches)."""
    out: list[str] = []
    for batch in inputs:
        texts = batch["text"] if isinstance(batch, Mapping) else batch
        out.extend(str(t) for t in texts)
    return out


def make_mteb_encoder(encoder: Encoder, *, spec: str | None = None, instructions: Mapping[str, str] | None = None,
                      document_instruction: str = MTEB_DOCUMENT_INSTRUCTION, batch_size: int = 32,
                      max_length: int | None = None) -> Any:
    """An mteb 2.x encoder (an ``AbsEncoder`` subclass instance) wrapping a ragen :class:`Encoder`."""
    AbsEncoder = _base_class()
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.types import PromptType

    table = dict(MTEB_INSTRUCTIONS if instructions is None else instructions)
    instructed = takes_instructions(encoder)
    takes_limit = accepts_keyword(encoder.encode_queries, "max_length")
    name = spec or encoder.spec
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name or name) or "encoder"

    class MTEBEncoder(AbsEncoder):  # type: ignore[misc, valid-type]
        """A ragen encoder speaking mteb 2.x's encoder protocol."""

        def __init__(self) -> None:
            self.model = encoder
            self.spec = name
            self.instructions = table
            self.document_instruction = document_instruction
            self.batch_size = batch_size
            self.seen_instructions: dict[str, str | None] = {}  # task name / "document" -> instruction used
            self.mteb_model_meta = ModelMeta.create_empty(overwrites={
                "name": f"ragen/{safe}", "revision": encoder.fingerprint[:16], "embed_dim": encoder.dim,
                "similarity_fn_name": ScoringFunction.COSINE, "use_instructions": instructed})

        def instruction_for(self, task_name: str, prompt_type: Any) -> str | None:
            if not instructed:
                return None
            if prompt_type == PromptType.document:
                return self.document_instruction
            if task_name not in self.instructions:
                raise RagenError(f"no LLM2Vec-Gen instruction for MTEB task {task_name!r} (generative.json has "
                                 f"{len(self.instructions)}); pass one with --instructions FILE.json")
            return self.instructions[task_name]

        def encode(self, inputs: Any, *, task_metadata: Any, hf_split: str, hf_subset: str,
                   prompt_type: Any = None, **kwargs: Any) -> np.ndarray:
            texts = _texts(inputs)
            instruction = self.instruction_for(task_metadata.name, prompt_type)
            key = "document" if prompt_type == PromptType.document else task_metadata.name
            self.seen_instructions[key] = instruction
            fn = encoder.encode_documents if prompt_type == PromptType.document else encoder.encode_queries
            extra: dict[str, Any] = {}
            if instruction is not None:  # the reference: instruction.strip() + " " + text.strip()
                extra["instruction"] = join_instruction("space", instruction)
                texts = [join_text("space", t) for t in texts]
            if takes_limit and max_length is not None:
                extra["max_length"] = max_length
            vecs = fn(texts, batch_size=int(kwargs.get("batch_size") or self.batch_size), normalize=False, **extra)
            return np.asarray(vecs, dtype=np.float32)

    return MTEBEncoder()


def local_retrieval_task(name: str, data: str | Path, *, split: str = "test") -> Any:
    """The registered MTEB retrieval task ``name`` (metadata, evaluator, metrics) with its data read from a
    local BEIR-layout folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``) instead of the hub."""
    mteb = require_mteb()
    from datasets import Dataset

    try:
        task = mteb.get_task(name)
    except (KeyError, ValueError) as exc:
        raise DataError(f"unknown MTEB task {name!r} ({str(exc).splitlines()[0][:120]})") from None
    if getattr(task.metadata, "type", None) != "Retrieval":
        raise DataError(f"--data {data}: local data is supported for retrieval tasks only; {name} is "
                        f"{task.metadata.type}")
    beir = load_beir(data, split=split)
    root = Path(data)
    ids, titles, texts = read_beir_corpus(root / "corpus.jsonl")
    corpus = Dataset.from_dict({"id": ids, "title": titles, "text": texts})
    raw_queries = {q: t for q, t in zip(beir.query_ids, beir.queries)}
    queries = Dataset.from_dict({"id": list(raw_queries), "text": list(raw_queries.values())})
    relevant = {q: {d: int(r) for d, r in beir.qrels[q].items()} for q in beir.query_ids}
    task.dataset = {"default": {split: {"corpus": corpus, "queries": queries, "relevant_docs": relevant,
                                        "top_ranked": None}}}
    task.data_loaded = True
    task._eval_splits = [split]  # mteb 2.x keeps the selected splits here (no setter)
    logger.info("MTEB task %s: %d documents, %d queries from %s", name, len(ids), len(raw_queries), root)
    return task


def resolve_tasks(names: Sequence[str] | None, benchmark: str | None) -> list[Any]:
    mteb = require_mteb()
    if bool(names) == bool(benchmark):
        raise RagenError("give either --task NAME (repeatable) or --benchmark NAME, e.g. --benchmark 'MTEB(eng, v2)'")
    if benchmark:
        try:
            return reference_splits(mteb.get_benchmark(benchmark).tasks)
        except (KeyError, ValueError) as exc:
            raise RagenError(f"unknown MTEB benchmark {benchmark!r} ({str(exc).splitlines()[0][:120]})") from None
    tasks = []
    for name in names or []:
        try:
            tasks.append(mteb.get_task(name))
        except (KeyError, ValueError) as exc:
            raise RagenError(f"unknown MTEB task {name!r} ({str(exc).splitlines()[0][:120]})") from None
    return reference_splits(tasks)


def reference_splits(tasks: Sequence[Any]) -> list[Any]:
    """Restrict each task to its ``test`` split where it has one, as the reference's ``eval_splits=["test"]``."""
    for task in tasks:
        if "test" in task.metadata.eval_splits:
            task._eval_splits = ["test"]
    return list(tasks)


def _main_scores(result: Any) -> dict[str, dict[str, float]]:
    """{task: {split/subset: main score}} from an mteb ModelResult."""
    out: dict[str, dict[str, float]] = {}
    for task_result in result.task_results:
        scores = {}
        for split, rows in task_result.scores.items():
            for row in rows:
                scores[f"{split}/{row.get('hf_subset', 'default')}"] = float(row["main_score"])
        out[task_result.task_name] = scores
    return out


def render_mteb_markdown(report: Mapping[str, Any]) -> str:
    tasks = report["tasks"]
    lines = ["# mteb benchmark", "", f"- command: `{report.get('command', '')}`",
             (f"- created: {report.get('created', '')}; mteb {report.get('mteb_version')}, ragen "
              f"{report.get('versions', {}).get('ragen')}"),
             (f"- protocol: documents \"{report['protocol']['document_instruction']}\", queries the task's "
              f"generative.json instruction, joined `{report['protocol']['join']}`, cosine similarity "
              "(instructions only for encoders that take them)"),
             f"- mteb's own result files: `{report.get('mteb_results', 'results/')}`", "",
             "| encoder | role | " + " | ".join(f"{t} ({report['main_score'][t]})" for t in tasks) + " |",
             "|---|---|" + "---:|" * len(tasks)]
    for enc in report["encoders"]:
        cells = []
        for t in tasks:
            scores = enc["main_scores"].get(t, {})
            cells.append(" / ".join(f"{100 * v:.2f}" for v in scores.values()) if scores else "–")
        lines.append(f"| `{enc['spec']}` | {enc.get('role', '')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_mteb(encoders: Sequence[tuple[str, Encoder]], tasks: Sequence[Any], out_dir: Path, *,
             batch_size: int = 32, max_length: int | None = None, instructions: Mapping[str, str] | None = None,
             show_progress: bool = False) -> dict[str, Any]:
    """Evaluate each encoder on every task with ``mteb.evaluate``; mteb's result files go to
    ``out_dir/results/...``. Returns ragen's report dict (written next to them by the caller)."""
    mteb = require_mteb()
    entries = []
    for spec, encoder in encoders:
        model = make_mteb_encoder(encoder, spec=spec, instructions=instructions, batch_size=batch_size,
                                  max_length=max_length)
        result = mteb.evaluate(model, list(tasks), cache=mteb.ResultCache(out_dir), overwrite_strategy="always",
                               encode_kwargs={"batch_size": batch_size}, show_progress_bar=show_progress)
        entries.append({"spec": spec, "fingerprint": encoder.fingerprint, "mteb_model": model.mteb_model_meta.name,
                        "instructions_applied": takes_instructions(encoder),
                        "instructions_used": model.seen_instructions, "main_scores": _main_scores(result)})
    return {"bench": "mteb", "tasks": [t.metadata.name for t in tasks],
            "main_score": {t.metadata.name: t.metadata.main_score for t in tasks},
            "protocol": {"document_instruction": MTEB_DOCUMENT_INSTRUCTION, "join": "instruction.strip() + ' ' + "
                         "text.strip()", "similarity": "cosine", "max_length": max_length,
                         "instructions": "LLM2Vec-Gen generative.json, for encoders that take instructions"},
            "mteb_version": getattr(mteb, "__version__", None), "encoders": entries}


__all__ = ["make_mteb_encoder", "local_retrieval_task", "resolve_tasks", "run_mteb", "require_mteb",
           "render_mteb_markdown"]
