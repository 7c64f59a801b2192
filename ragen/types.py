"""Small value types shared across ragen. Standard library and numpy only."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Chunk:
    """A piece of a source file, the unit that is embedded and retrieved.

    ``chunk_id`` is stable across runs for the same file content: ``"<relative path>#<position>"``.
    ``start``/``end`` are character offsets into the file's decoded text.
    """

    chunk_id: str
    path: str
    position: int
    text: str
    start: int
    end: int
    content_hash: str


@dataclass(frozen=True)
class Hit:
    """One search result: a chunk with its rank (1-based) and similarity score."""

    rank: int
    score: float
    chunk_id: str
    path: str
    text: str
    start: int
    end: int
