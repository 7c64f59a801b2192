"""Shared CLI plumbing: the typer app, consoles, error handling, logging setup."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TypeVar

import typer
from rich.console import Console

from ..errors import RagenError

app = typer.Typer(
    name="ragen",
    help="Retrieval with LLM2Vec-Gen generative embeddings: index folders, query them, benchmark, train.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# stdout carries results (tables, JSON); everything else (progress, notices, errors) goes to stderr.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

DEFAULT_MODEL = "McGill-NLP/LLM2Vec-Gen-Qwen3-06B"

T = TypeVar("T")


def default_model() -> str:
    return os.environ.get("RAGEN_MODEL") or DEFAULT_MODEL


def quiet_libraries() -> None:
    """Keep third-party progress bars and warnings off the terminal; ragen shows its own progress."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Through the environment, read when transformers is first imported: a model-free command (info,
    # query --server) must not pay seconds to import transformers just to quiet it.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if "transformers" in sys.modules:  # already imported: its settings were read; set them directly
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore")


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


def run_command(fn: Callable[[], T]) -> T:
    """Run a command body; bad input becomes one line on stderr and a non-zero exit."""
    quiet_libraries()
    try:
        return fn()
    except RagenError as exc:
        fail(str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__)
    except ImportError as exc:
        fail(str(exc).splitlines()[0])
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    except OSError as exc:  # disk full, permission denied, ...: say which file, no traceback
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        fail(f"{where}{exc.strerror or exc}")
    raise AssertionError("unreachable")  # pragma: no cover


def read_texts_arg(texts: list[str], file: str | None) -> list[str]:
    """Texts from arguments, or one per line from a file (``-`` for stdin)."""
    if file:
        if file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            try:
                with open(file, encoding="utf-8") as f:
                    lines = f.read().splitlines()
            except FileNotFoundError:
                raise RagenError(f"{file}: no such file") from None
        return [line for line in lines if line.strip()] + list(texts)
    return list(texts)
