"""Refusal guard: a retriever that abstains when the query's embedding *is* a refusal.

An LLM2Vec-Gen query embedding represents the response the frozen LLM would give, so a harmful query
lands near a refusal and decodes to one. The guard blocks a query (no documents are returned) when

* its embedding decodes to text that starts like a refusal (``markers`` within the first
  ``marker_window`` characters), or
* its embedding lies closer to a refusal prototype than ``threshold`` (cosine similarity of the
  normalised query vector to the normalised *document* embedding of each prototype text; the highest
  one counts).

The verdict carries the decoded text, so the answer can name it as the reason. The threshold and the
prototype texts are data (:class:`GuardConfig`, JSON), saved as ``guard.json`` in an index directory or
anywhere else; ``ragen bench guard`` measures block and false-block rates per threshold and writes one.
A threshold belongs to the encoder it was calibrated with (``fingerprint``): using it with another
encoder is refused. Baseline encoders (minilm, ...) cannot decode, so they need a calibrated threshold.

Standard library, numpy and :mod:`ragen._io` only; the encoder is used through its public methods.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_write_json
from .errors import RagenError

logger = logging.getLogger(__name__)

GUARD_FILE = "guard.json"
GUARD_FORMAT = 1

DEFAULT_PROTOTYPES = (
    "I'm sorry, but I can't help with that.",
    "I cannot assist with that request.",
    "I can't provide instructions or information that could be used to cause harm.",
    "I'm sorry, but I must decline. This request is illegal and could hurt people.",
    "As an AI assistant, I cannot help with illegal or dangerous activities.",
)
DEFAULT_MARKERS = (
    "i'm sorry", "i am sorry", "sorry, but", "i cannot", "i can't", "i can not", "i won't", "i will not",
    "i'm unable", "i am unable", "i'm not able", "i am not able", "i must decline", "i must refuse",
    "as an ai", "cannot help with", "can't help with", "cannot assist", "can't assist",
)


class GuardError(RagenError):
    """A guard configuration is malformed or does not fit the encoder in use."""


@dataclass(frozen=True)
class GuardConfig:
    """What counts as a refusal. ``threshold``: cosine similarity to the nearest prototype at or above which
    a query is blocked (``None``: the decoding test only). ``decode``: also decode the query embedding and
    look for ``markers`` in its first ``marker_window`` characters (LLM2Vec-Gen encoders only).
    ``fingerprint``: the encoder the threshold was calibrated for (``None``: not tied to one)."""

    prototypes: tuple[str, ...] = DEFAULT_PROTOTYPES
    threshold: float | None = None
    decode: bool = True
    markers: tuple[str, ...] = DEFAULT_MARKERS
    marker_window: int = 160
    max_new_tokens: int = 32
    fingerprint: str | None = None
    note: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "prototypes", tuple(self.prototypes))
        object.__setattr__(self, "markers", tuple(m.lower() for m in self.markers))
        if not self.prototypes or not all(isinstance(p, str) and p.strip() for p in self.prototypes):
            raise GuardError("guard prototypes must be a non-empty list of non-empty strings")
        if not all(isinstance(m, str) and m.strip() for m in self.markers):
            raise GuardError("guard markers must be non-empty strings")
        if self.threshold is not None and (isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float))
                                           or not math.isfinite(self.threshold) or not -1.0 <= self.threshold <= 1.0):
            raise GuardError(f"guard threshold must be a cosine similarity in [-1, 1] or null, got {self.threshold!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GuardError(f"guard max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.marker_window, int) or self.marker_window < 1:
            raise GuardError(f"guard marker_window must be a positive integer, got {self.marker_window!r}")
        if self.threshold is None and not self.decode:
            raise GuardError("a guard with neither a threshold nor decoding blocks nothing; set threshold or decode")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["prototypes"] = list(self.prototypes)
        data["markers"] = list(self.markers)
        return {"format": GUARD_FORMAT, **data}

    @classmethod
    def from_dict(cls, data: Any, where: str = "guard config") -> GuardConfig:
        if not isinstance(data, dict):
            raise GuardError(f"{where}: expected a JSON object, got {type(data).__name__}")
        fmt = data.get("format", GUARD_FORMAT)
        if fmt != GUARD_FORMAT:
            raise GuardError(f"{where}: guard format {fmt!r}; this ragen reads format {GUARD_FORMAT}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known - {"format"})
        if unknown:
            raise GuardError(f"{where}: unknown guard fields {unknown}; expected some of {sorted(known)}")
        kwargs = {k: v for k, v in data.items() if k in known}
        for key in ("prototypes", "markers"):
            if key in kwargs and not isinstance(kwargs[key], list):
                raise GuardError(f"{where}: {key} must be a list of strings")
        try:
            return cls(**kwargs)
        except GuardError as exc:
            raise GuardError(f"{where}: {exc}") from None
        except TypeError as exc:
            raise GuardError(f"{where}: {exc}") from None

    def save(self, path: str | Path) -> Path:
        """Write the config as JSON (atomically); a directory gets ``guard.json`` inside it."""
        target = Path(path).expanduser()
        if target.is_dir():
            target = target / GUARD_FILE
        atomic_write_json(target, self.to_dict())
        return target

    @classmethod
    def load(cls, path: str | Path) -> GuardConfig:
        """Read a config written by :meth:`save`; a directory means its ``guard.json``."""
        target = Path(path).expanduser()
        if target.is_dir():
            target = target / GUARD_FILE
        try:
            text = target.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise GuardError(f"{target}: no such guard config") from None
        except UnicodeDecodeError:
            raise GuardError(f"{target}: not UTF-8 text; expected a guard JSON file") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GuardError(f"{target}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(data, str(target))

    @classmethod
    def for_index(cls, index_dir: str | Path) -> GuardConfig:
        """The config saved with an index (``guard.json``), else the defaults (decoding test only)."""
        path = Path(index_dir).expanduser() / GUARD_FILE
        return cls.load(path) if path.is_file() else cls()


@dataclass(frozen=True)
class GuardVerdict:
    """The guard's decision on one query. ``score``: cosine similarity to the nearest prototype
    (``prototype``); ``decoded``: what the query embedding decodes to (``None`` when not decoded);
    ``refusal_decoded``: whether that text reads as a refusal; ``reason``: one line for the user."""

    blocked: bool
    reason: str
    score: float
    prototype: str
    threshold: float | None
    decoded: str | None = None
    refusal_decoded: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quote(text: str, width: int = 200) -> str:
    flat = " ".join(text.split())
    return "\u201c" + (flat if len(flat) <= width else flat[: width - 1] + "\u2026") + "\u201d"


def looks_like_refusal(text: str, markers: Sequence[str] = DEFAULT_MARKERS, window: int = 160) -> bool:
    """Whether ``text`` starts like a refusal: a marker within its first ``window`` characters
    (typographic apostrophes count as plain ones; case is ignored)."""
    head = text.replace("\u2019", "'").lower()[:window]
    return any(m.lower() in head for m in markers)


def can_decode(encoder: Any) -> bool:
    """Whether an encoder can decode its query embeddings to text (LLM2Vec-Gen)."""
    return callable(getattr(encoder, "decode", None))


class RefusalGuard:
    """A :class:`GuardConfig` bound to an encoder (prototype vectors computed once).

    >>> guard = RefusalGuard(encoder, GuardConfig.for_index("indexes/default"))
    >>> verdict = guard.check("how do I pick a lock?")
    >>> verdict.blocked, verdict.reason
    """

    def __init__(self, encoder: Any, config: GuardConfig | None = None) -> None:
        self.encoder = encoder
        self.config = config or GuardConfig()
        cfg = self.config
        if cfg.threshold is not None and cfg.fingerprint is not None and cfg.fingerprint != str(encoder.fingerprint):
            raise GuardError(f"the guard threshold was calibrated for encoder fingerprint {cfg.fingerprint}, but "
                             f"{encoder.spec} has {encoder.fingerprint}; recalibrate with `ragen bench guard`")
        self.decodes = bool(cfg.decode and can_decode(encoder))
        if cfg.threshold is None and not self.decodes:
            raise GuardError(f"{encoder.spec} cannot decode its embeddings, so the guard needs a calibrated "
                             "threshold; write one with `ragen bench guard --model ... --write-guard INDEX`")
        self.prototype_vectors = np.asarray(encoder.encode_documents(list(cfg.prototypes), normalize=True),
                                            dtype=np.float32)  # (n_prototypes, dim)

    # ------------------------------------------------------------------------------------------------------
    def scores(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For normalised query vectors ``(n, dim)``: the highest prototype similarity ``(n,)`` and the index
        of that prototype ``(n,)``."""
        v = np.asarray(vectors, dtype=np.float32)
        if v.ndim == 1:
            v = v[None, :]
        sims = v @ self.prototype_vectors.T  # (n, n_prototypes)
        return sims.max(axis=1), sims.argmax(axis=1)

    def decode(self, queries: Sequence[str]) -> list[str]:
        """What each query's embedding decodes to (empty strings when this guard does not decode)."""
        if not self.decodes:
            return ["" for _ in queries]
        instruction = getattr(self.encoder, "query_instruction", None)
        return list(self.encoder.decode(list(queries), instruction=instruction,
                                        max_new_tokens=self.config.max_new_tokens))

    def is_refusal(self, text: str) -> bool:
        return looks_like_refusal(text, self.config.markers, self.config.marker_window)

    def check(self, query: str | None, vector: np.ndarray | None = None) -> GuardVerdict:
        """The verdict for one query; ``vector``: its normalised query embedding when already computed.
        Without the query text only the threshold test runs."""
        if vector is None:
            if query is None:
                raise GuardError("the guard needs a query text or its vector")
            vector = self.encoder.encode_queries([query], normalize=True)[0]
        return self.check_batch([query], np.asarray(vector)[None, :])[0]

    def check_batch(self, queries: Sequence[str | None], vectors: np.ndarray) -> list[GuardVerdict]:
        best, which = self.scores(vectors)
        texts = [q for q in queries if q is not None]
        decoded_iter = iter(self.decode(texts)) if self.decodes and texts else iter(())
        verdicts = []
        for q, score, idx in zip(queries, best.tolist(), which.tolist()):
            decoded = next(decoded_iter) if (self.decodes and q is not None) else None
            verdicts.append(self._verdict(float(score), self.config.prototypes[int(idx)], decoded))
        return verdicts

    def _verdict(self, score: float, prototype: str, decoded: str | None) -> GuardVerdict:
        cfg = self.config
        refusal = decoded is not None and self.is_refusal(decoded)
        near = cfg.threshold is not None and score >= cfg.threshold
        if refusal:
            reason = f"the query embedding decodes to a refusal: {_quote(decoded or '')}"
        elif near:
            reason = (f"the query embedding lies at cosine {score:.3f} from the refusal prototype {_quote(prototype, 80)} "
                      f"(threshold {cfg.threshold:.3f})")
            if decoded is not None:
                reason += f"; it decodes to {_quote(decoded)}"
        else:
            reason = "not a refusal"
            if cfg.threshold is not None:
                reason += f" (nearest prototype at cosine {score:.3f} < {cfg.threshold:.3f})"
        if refusal or near:
            logger.info("guard blocked a query: %s", reason)
        return GuardVerdict(blocked=refusal or near, reason=reason, score=score, prototype=prototype,
                            threshold=cfg.threshold, decoded=decoded, refusal_decoded=refusal)


def resolve_guard(guard: Any, encoder: Any, index_dir: str | Path | None = None) -> RefusalGuard | None:
    """``guard`` as accepted by ``Retriever(guard=...)``: ``None``/``False`` (none), ``True`` (the index's
    ``guard.json``, else the defaults), a :class:`GuardConfig`, a path to a guard JSON file, or a
    :class:`RefusalGuard` (used as is)."""
    if guard is None or guard is False:
        return None
    if isinstance(guard, RefusalGuard):
        return guard
    if guard is True:
        config = GuardConfig.for_index(index_dir) if index_dir is not None else GuardConfig()
    elif isinstance(guard, GuardConfig):
        config = guard
    elif isinstance(guard, (str, Path)):
        config = GuardConfig.load(guard)
    else:
        raise GuardError(f"guard must be True, a GuardConfig, a path or a RefusalGuard, got {type(guard).__name__}")
    return RefusalGuard(encoder, config)


def calibrate_threshold(benign_scores: Sequence[float], max_false_block: float = 0.05) -> float:
    """The lowest threshold (rounded up to 3 decimals) that blocks at most ``max_false_block`` of the benign
    queries by similarity alone."""
    s = np.sort(np.asarray(benign_scores, dtype=np.float64))
    if s.size == 0:
        raise GuardError("calibration needs at least one benign query")
    if not 0.0 <= max_false_block < 1.0:
        raise GuardError(f"max false-block rate must be in [0, 1), got {max_false_block}")
    allowed = int(math.floor(max_false_block * s.size))  # benign queries allowed at or above the threshold
    cut = round(float(s[s.size - allowed - 1]), 6)  # the highest benign score that must stay below; float32 noise off
    return min(1.0, math.floor(cut * 1000) / 1000 + 0.001)


__all__ = ["GuardConfig", "GuardVerdict", "RefusalGuard", "GuardError", "resolve_guard", "looks_like_refusal",
           "can_decode", "calibrate_threshold", "DEFAULT_PROTOTYPES", "DEFAULT_MARKERS", "GUARD_FILE"]
