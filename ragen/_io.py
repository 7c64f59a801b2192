"""Small I/O helpers shared by every layer: atomic file writes and strict JSONL reading.

Readers see the old file or the new one, never a mix, whatever happens to the writer (an exception,
``kill -9``, a full disk): data goes to a temporary file beside the target, is fsynced, then renamed over
it (``os.replace`` is atomic on POSIX), and the directory entry is fsynced. Standard library, numpy and
``ragen.errors`` only, so every layer may import it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError


def _umask_mode() -> int:
    """0o666 less the process umask: what a plain ``open(path, "w")`` gives (mkstemp gives 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to (by any library: faiss, torch, safetensors).

    On normal exit the file is fsynced, given ordinary permissions and renamed over ``path``; on an
    exception it is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike[str], data: Any, *, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False, default=str) + "\n")


def atomic_save_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """``np.save`` without pickle, atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(array), allow_pickle=False)


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSONL file. A missing file, a line that is not
    JSON, or a line that is not a JSON object raises :class:`~ragen.errors.DataError` naming ``file:line``."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg}); expected one object per line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object per line, got {type(row).__name__}")
            yield n, row


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The objects of a JSONL file (see :func:`iter_jsonl`)."""
    for _, row in iter_jsonl(path):
        yield row
