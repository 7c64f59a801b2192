"""Benchmarks: dataset loaders (BEIR layout, AdvBench-IR, BRIGHT), pure metrics, exact search, runs, reports.

Typical use::

    from ragen.bench import load_beir, RunSettings, ranker_spec, run_benchmark, build_report, write_report

    task = load_beir("data/scifact")
    settings = RunSettings(similarity="cos")
    results = run_benchmark("beir", [task], [ranker_spec("bm25", "baseline", settings),
                                             ranker_spec("minilm", "baseline", settings)], settings)
    write_report(build_report("beir", [task], results, settings, source="data/scifact",
                              command="(python)", protocol="beir/test"), Path("out"))
"""

from __future__ import annotations

from .data import (ADVBENCH_PROTOCOLS, BRIGHT_INSTRUCTIONS, BRIGHT_TASKS, AdvBenchIR, Corpus, RetrievalTask,
                   advbench_tasks, load_advbench_ir, load_beir, load_bright, load_distractors)
from .metrics import evaluate_run
from .report import build_report, render_markdown, write_report
from .runner import (DenseRanker, EncoderResult, RankerSpec, RunSettings, ranker_spec, relative_reductions,
                     run_benchmark)
from .search import topk_inner_product

__all__ = ["ADVBENCH_PROTOCOLS", "BRIGHT_INSTRUCTIONS", "BRIGHT_TASKS", "AdvBenchIR", "Corpus", "RetrievalTask",
           "advbench_tasks", "load_advbench_ir", "load_beir", "load_bright", "load_distractors", "evaluate_run",
           "build_report", "render_markdown", "write_report", "DenseRanker", "EncoderResult", "RankerSpec",
           "RunSettings", "ranker_spec", "relative_reductions", "run_benchmark", "topk_inner_product"]
