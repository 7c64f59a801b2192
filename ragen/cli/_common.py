"""Shared CLI plumbing: the typer app, consoles, error handling, logging setup, safe display of user text."""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from typing import Annotated, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import RagenError

T = TypeVar("T")


class _Group(typer.core.TyperGroup):
    """The ``ragen`` command group: usage errors (unknown option, missing argument, bad value) become one
    ``error:`` line and exit code 2, as every other error is one line; no boxes, no traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from typer._click import exceptions as click_exc

        try:
            code = super().main(args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                                **extra)
        except click_exc.NoArgsIsHelpError as exc:
            print(exc.format_message(), file=sys.stderr)
            code = 2
        except click_exc.UsageError as exc:
            hint = ""
            if exc.ctx is not None:
                hint = f" (see `{exc.ctx.command_path} --help`)"
            err.print(f"[bold red]error:[/] {shown(exc.format_message(), oneline=True)}{escape(hint)}",
                      highlight=False)
            code = exc.exit_code
        except click_exc.ClickException as exc:
            err.print(f"[bold red]error:[/] {shown(exc.format_message(), oneline=True)}", highlight=False)
            code = exc.exit_code
        except click_exc.Abort:
            err.print("[yellow]interrupted[/]")
            code = 130
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="ragen",
    cls=_Group,
    help="Retrieval with LLM2Vec-Gen generative embeddings: index folders, query them, benchmark, train.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help like other tools: no boxes, no <bool> on flags
    context_settings={"help_option_names": ["-h", "--help"]},
)
# stdout carries results (tables, JSON); everything else (progress, notices, errors) goes to stderr.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

DEFAULT_MODEL = "McGill-NLP/LLM2Vec-Gen-Qwen3-06B"

_state = {"verbose": bool(os.environ.get("RAGEN_VERBOSE"))}


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        print(f"ragen {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", is_eager=True, callback=_version,
                                                    help="Print the ragen version and exit.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show library warnings and debug notes.")] = False,
) -> None:
    """Retrieval with LLM2Vec-Gen generative embeddings: index folders, query them, benchmark, train."""
    _state["verbose"] = verbose or bool(os.environ.get("RAGEN_VERBOSE"))  # per invocation


def verbose() -> bool:
    return _state["verbose"]


def default_model() -> str:
    return os.environ.get("RAGEN_MODEL") or DEFAULT_MODEL


# ------------------------------------------------------------------------------------------ safe display
# ESC-introduced sequences: CSI (ESC [ ... final), OSC/DCS/SOS/PM/APC strings (ended by BEL or ESC \), and
# two-character escapes; then any remaining C0/C1 control and the Unicode bidi overrides (text that would
# reorder what the terminal shows).
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[\]PX^_][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]?|"
                      r"\x9b[0-?]*[ -/]*[@-~]|[\x9d\x90\x98\x9e\x9f][^\x07\x1b\x9c]*(?:\x07|\x9c|\x1b\\)?")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_SURROGATES = re.compile(r"[\ud800-\udfff]")


def clean(text: object, *, oneline: bool = False) -> str:
    """``text`` safe for a terminal: escape sequences and control characters removed, lone surrogates
    (undecodable bytes in a file name or argument) shown as ``\\xNN``; ``oneline`` also folds newlines and
    tabs into spaces."""
    s = str(text)
    if _SURROGATES.search(s):
        s = s.encode("utf-8", "surrogateescape" if _only_escapes(s) else "backslashreplace").decode(
            "utf-8", "backslashreplace")
    s = _ESCAPES.sub("", s)
    if oneline:
        s = re.sub(r"[\r\n\t]+", " ", s)
    else:
        s = s.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROLS.sub("", s)


def _only_escapes(s: str) -> bool:
    """Whether every surrogate in ``s`` is one that ``surrogateescape`` made from an undecodable byte."""
    return all("\udc80" <= ch <= "\udcff" for ch in _SURROGATES.findall(s))


def shown(text: object, *, oneline: bool = False) -> str:
    """``text`` cleaned for the terminal and escaped for rich markup: for any user-supplied string (queries,
    paths, snippets, error messages, decoded text) printed through rich."""
    return escape(clean(text, oneline=oneline))


class _CleanFormatter(logging.Formatter):
    """Log lines name user files: strip escape sequences and control characters from them too."""

    def format(self, record: logging.LogRecord) -> str:
        return clean(super().format(record))


_JSON_UNSAFE = re.compile(r"[\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def json_line(value: object, **kwargs) -> str:
    """``json.dumps(value, ensure_ascii=False)`` that is also safe on a terminal: the C1 controls and bidi
    overrides that JSON leaves raw are written as ``\\uXXXX`` escapes (the same JSON value)."""
    import json

    text = json.dumps(value, ensure_ascii=False, **kwargs)
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


# ------------------------------------------------------------------------------------------ running
def quiet_libraries() -> None:
    """Keep third-party progress bars and warnings off the terminal; ragen shows its own progress.

    Configured through the environment (read when those libraries are imported), so that commands that
    need no model never import torch or transformers. ``--verbose`` keeps library warnings visible.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    level = logging.INFO if verbose() else logging.WARNING
    handler = logging.StreamHandler()
    handler.setFormatter(_CleanFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])  # no-op when the application configured logging
    import warnings

    if verbose():
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
        warnings.simplefilter("default")
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "transformers" in sys.modules:  # already imported (e.g. a test process): set it directly
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")  # numba, transformers and torch deprecations: shown with --verbose


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {shown(message, oneline=True)}", highlight=False)
    raise typer.Exit(code)


class Terminated(BaseException):
    """Raised in the main thread when SIGTERM arrives, so a command stops the way Ctrl-C stops it."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def run_command(fn: Callable[[], T]) -> T:
    """Run a command body; bad input becomes one line on stderr and a non-zero exit; SIGINT and SIGTERM
    say that the command was interrupted (exit 130 and 143)."""
    quiet_libraries()
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (an embedding application): leave the handler alone
        pass
    try:
        return fn()
    except RagenError as exc:
        fail(str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__)
    except ImportError as exc:
        fail(str(exc).splitlines()[0])
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    except Terminated:
        err.print("[yellow]interrupted (SIGTERM)[/]")
        raise typer.Exit(143) from None
    except UnicodeError as exc:  # an undecodable argument or file that reached a library
        fail(f"text that is not valid UTF-8 ({exc.__class__.__name__}: {exc.reason})")
    except OSError as exc:  # disk full, permission denied, ...: say which file, no traceback
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        fail(f"{where}{exc.strerror or exc}")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
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
