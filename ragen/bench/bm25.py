"""BM25 (via the maintained ``bm25s`` package) as a ranker, with the same ordering rules as dense search."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..encoders.base import hash_parts
from ..errors import EncoderSpecError
from .data import RetrievalTask
from .search import topk_from_scores

logger = logging.getLogger(__name__)


def _require_bm25s():
    try:
        import bm25s
    except ImportError:
        raise ImportError("the bm25 baseline needs the 'bench' extra: pip install 'ragen-toolkit[bench]' (bm25s)") from None
    # bm25s pins its logger to DEBUG on import, which floods any DEBUG-level root handler; let it inherit.
    logging.getLogger("bm25s").setLevel(logging.NOTSET)
    return bm25s


@dataclass(frozen=True)
class BM25Config:
    """Okapi BM25 parameters; ``method`` is a ``bm25s`` variant (lucene, robertson, atire, bm25l, bm25+)."""

    k1: float = 0.9
    b: float = 0.4
    method: str = "lucene"
    stopwords: str = "en"

    @classmethod
    def from_spec(cls, spec: str) -> BM25Config:
        """``"bm25"`` or ``"bm25:k1=1.2,b=0.75,method=robertson"``."""
        name, _, rest = spec.partition(":")
        if name != "bm25":
            raise EncoderSpecError(f"not a bm25 spec: {spec!r}")
        values: dict[str, object] = {}
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, val = item.partition("=")
            if not eq or key not in ("k1", "b", "method", "stopwords"):
                raise EncoderSpecError(f"bad bm25 option {item!r} in {spec!r}; expected k1=, b=, method=, stopwords=")
            if key in ("k1", "b"):
                try:
                    values[key] = float(val)
                except ValueError:
                    raise EncoderSpecError(f"bm25 option {key} must be a number, got {val!r}") from None
            else:
                values[key] = val
        return cls(**values)  # type: ignore[arg-type]


class BM25Ranker:
    """Lexical baseline. Defaults k1=0.9, b=0.4: Pyserini's, and those of BRIGHT's published BM25 runs.

    Tokenisation: ``bm25s.tokenize`` (lower-case, ``\\w\\w+`` tokens, English stopwords, no stemming).
    """

    kind = "bm25"
    uses_instructions = False

    def __init__(self, config: BM25Config = BM25Config(), *, spec: str = "bm25", role: str = "baseline") -> None:
        _require_bm25s()
        self.config = config
        self.spec = spec
        self.role = role
        self._index: tuple[str, object, tuple[int, ...]] | None = None

    @property
    def fingerprint(self) -> str:
        import bm25s

        return hash_parts("bm25s", getattr(bm25s, "__version__", "?"), self.config.k1, self.config.b,
                          self.config.method, self.config.stopwords)

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        import bm25s

        return bm25s.tokenize(texts, stopwords=self.config.stopwords, return_ids=False, show_progress=False)

    def _retriever(self, task: RetrievalTask):
        rows = tuple(range(len(task.corpus))) if task.active is None else task.active
        key = task.corpus.fingerprint + hash_parts(rows)
        if self._index is None or self._index[0] != key:
            import bm25s

            retriever = bm25s.BM25(k1=self.config.k1, b=self.config.b, method=self.config.method)
            retriever.index(self._tokenize([task.corpus.texts[i] for i in rows]), show_progress=False)
            self._index = (key, retriever, rows)
        return self._index[1], self._index[2]

    def rank(self, task: RetrievalTask, depth: int, advance: Callable[[int], None] | None = None
             ) -> dict[str, list[str]]:
        retriever, rows = self._retriever(task)
        local = {task.corpus.ids[r]: j for j, r in enumerate(rows)}  # doc id -> column in the BM25 index
        vocab = retriever.vocab_dict
        ranking: dict[str, list[str]] = {}
        for qid, tokens in zip(task.query_ids, self._tokenize(list(task.queries))):
            known = [t for t in tokens if t in vocab]
            scores = retriever.get_scores(known) if known else np.zeros(len(rows), dtype=np.float32)
            excl = [local[d] for d in task.excluded.get(qid, ()) if d in local]
            s, idx = topk_from_scores(scores, depth, exclude=excl)
            # A document sharing no term with the query (score 0) is not retrieved, as in Lucene/Pyserini.
            ranking[qid] = [task.corpus.ids[rows[i]] for i, sc in zip(idx, s) if i >= 0 and sc > 0]
            if advance is not None:
                advance(1)
        return ranking


__all__ = ["BM25Config", "BM25Ranker"]
