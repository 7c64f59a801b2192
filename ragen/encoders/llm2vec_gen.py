"""LLM2Vec-Gen: a frozen decoder LLM plus K trained special tokens; the embedding is the model's potential
response, read off the final hidden states of the last K positions.

Computation (identical to the reference ``llm2vec-gen`` package, checked against its golden outputs):

    text + "<question1>...<questionK>"  --tokenize, truncate text so the K tokens survive, left pad-->
    backbone (inner model, no LM head)  -> last_hidden_state[:, -n:]            # (batch, n, hidden)
    reconstruction_mlp (if present)     -> reconstruction states (decodable)    # (batch, n, hidden)
    alignment_mlp (if present)          -> alignment states                     # (batch, n, dim)
    mean over the n positions           -> embedding                            # (batch, dim)

Differences from the reference that do not change results: the backbone is loaded once (the encoder
is the causal LM's inner model, the trained rows are spliced into the input embeddings instead of
resizing the vocabulary), batches are sorted by length, and decoding is batched with a KV cache.
One that changes rounding only: the heads and the mean run in float32 (``numerics="fp32"``, the default);
``numerics="reference"`` runs them in the checkpoint dtype as the reference does (bit-identical bf16).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_write_text
from ..errors import CheckpointError, RagenError
from .base import (
    DEFAULT_DOCUMENT_INSTRUCTION,
    DEFAULT_QUERY_INSTRUCTION,
    clean_texts,
    hash_parts,
    l2_normalize,
    length_sorted_batches,
    resolve_device,
    resolve_dtype,
    tensor_digest_bytes,
)
from .checkpoint import (
    HEAD_FILES,
    Adapter,
    ProjectionHead,
    check_finite,
    parse_encoding_mode,
    read_adapter,
    read_encoder_decoder_config,
    read_run_config,
    resolve_base_model,
    resolve_checkpoint,
    write_adapter,
)
from .hub import offline_hint, quiet_hub, refuse_remote_code, resolve_model

logger = logging.getLogger(__name__)

# Tokens that end a response in the backbone families LLM2Vec-Gen was published for. The reference adds
# <|endoftext|> (Qwen) and <|end_of_text|> (Llama) to the config's EOS; we take whichever exist.
# Tokens that end a turn in the chat families ragen targets (Qwen, Llama 3, Mistral-style).
_STOP_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "</s>")


def stop_token_ids(lm: Any, tokenizer: Any) -> frozenset[int]:
    """Every id that ends generation for this LM: its configured EOS ids (model config, generation config,
    tokenizer) plus the end-of-turn tokens of the chat families ragen targets, where the vocabulary has them.
    Decoding an embedding and answering a question stop on the same set."""
    ids: set[int] = set()
    gen_cfg = getattr(lm, "generation_config", None)
    for src in (lm.config.eos_token_id, getattr(gen_cfg, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in _STOP_TOKENS if t in vocab)
    return frozenset(ids)


def _load_tokenizer(path: Path, *, trust_remote_code: bool = False, what: str = "checkpoint"):
    from transformers import AutoTokenizer

    refuse_remote_code(path, trust_remote_code=trust_remote_code, what=what)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (path / name).is_file():
            try:
                json.loads((path / name).read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{path / name}: not valid JSON ({exc.__class__.__name__}); expected the "
                                      f"{what}'s tokenizer") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # tokenizers raises bare Exception on a malformed tokenizer.json; report it
        raise CheckpointError(f"{path}: cannot load the tokenizer ({_first_line(exc)}); expected "
                              "tokenizer.json/tokenizer_config.json with the special tokens") from None
    tok.padding_side = "left"
    return tok


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:limit] if text else exc.__class__.__name__)


def _check_safetensors(folder: Path) -> None:
    """Read every safetensors header in a model folder, so a corrupt file is named before loading."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file}: not a valid safetensors file ({_first_line(exc, 120)}); expected the "
                                  "backbone's weights (re-download it)") from None


def _load_causal_lm(base: str, dtype: torch.dtype, device: str, *, folder: Path | None = None,
                    trust_remote_code: bool = False, check_weights: bool = True):
    """The frozen backbone from a local folder (hub ids are resolved to one by :mod:`.hub` first)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    folder = folder if folder is not None else Path(base)
    if folder.is_dir():
        refuse_remote_code(folder, trust_remote_code=trust_remote_code, what=f"base model {base!r}")
        _check_safetensors(folder)
    try:
        with quiet_hub():
            lm = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, SafetensorError, KeyError, TypeError) as exc:
        hint = "check that it holds config.json and safetensors weights" if folder.is_dir() else offline_hint(base)
        raise CheckpointError(f"cannot load base model {base!r} ({_first_line(exc)}); {hint}; "
                              "pass it with base_model=/--base-model") from None
    lm.requires_grad_(False)
    lm = lm.to(device).eval()
    if check_weights:
        for name, param in lm.named_parameters():
            check_finite(param, f"base model {base!r}", name)
    return lm


def cache_keyword(lm: Any) -> str:
    """The keyword the installed ``forward`` takes for the KV cache.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name goes in 5.40); asking the
    signature keeps decoding working on both sides of the rename without deprecation warnings."""
    import inspect

    try:
        params = inspect.signature(type(lm).forward).parameters
    except (TypeError, ValueError):
        params = {}
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out: Any, preferred: str) -> Any:
    keys = out.keys() if callable(getattr(out, "keys", None)) else ()
    for name in (preferred, "cache", "past_key_values"):
        if name in keys:
            return out[name]
    return getattr(out, preferred, None)


NUMERICS = ("fp32", "reference")


class LLM2VecGen:
    """An LLM2Vec-Gen encoder. Build it with :meth:`from_pretrained`."""

    def __init__(
        self,
        lm: Any,
        tokenizer: Any,
        *,
        special_tokens: Sequence[str],
        special_rows: torch.Tensor,
        num_pooled: int,
        reconstruction_head: ProjectionHead | None,
        alignment_head: ProjectionHead | None,
        run_config: dict[str, Any],
        base_model: str,
        source: str,
        has_base_layer: bool = False,
        query_instruction: str = DEFAULT_QUERY_INSTRUCTION,
        document_instruction: str = DEFAULT_DOCUMENT_INSTRUCTION,
        numerics: str = "fp32",
    ) -> None:
        if numerics not in NUMERICS:
            raise RagenError(f"unknown numerics {numerics!r}; expected one of {', '.join(NUMERICS)}")
        self.numerics = numerics
        self.lm = lm
        self.tokenizer = tokenizer
        self.special_tokens = tuple(special_tokens)
        self.num_pooled = num_pooled
        self.run_config = dict(run_config)
        self.base_model = base_model
        self.source = source
        self.has_base_layer = has_base_layer
        self.query_instruction = query_instruction
        self.document_instruction = document_instruction
        self.device = str(next(lm.parameters()).device)
        self.dtype = next(lm.parameters()).dtype

        ids = tokenizer.convert_tokens_to_ids(list(special_tokens))
        unk = tokenizer.unk_token_id
        missing = [t for t, i in zip(special_tokens, ids) if i is None or (unk is not None and i == unk)]
        if missing:
            raise CheckpointError(f"tokenizer of {source} lacks the special tokens {missing}; "
                                  "expected them as added tokens (tokenizer.json of the checkpoint)")
        if len(set(ids)) != len(ids):
            raise CheckpointError(f"tokenizer of {source} maps several special tokens to one id")
        self.special_ids = [int(i) for i in ids]
        if special_rows.shape[0] != len(ids):
            raise CheckpointError(f"{source}: {special_rows.shape[0]} trained rows for {len(ids)} special tokens")
        hidden = lm.config.get_text_config().hidden_size
        if special_rows.shape[1] != hidden:
            raise CheckpointError(f"{source}: trained rows have width {special_rows.shape[1]} but base model "
                                  f"{base_model!r} has hidden size {hidden}; is it the right base model?")
        _check_head_dims(reconstruction_head, alignment_head, hidden, num_pooled, source)
        # Heads stay in float32 by default: they are tiny and this keeps bf16 backbones from adding rounding
        # here. numerics="reference" runs copies in the dtype each head file records, as the reference does.
        self.reconstruction_head = reconstruction_head.float().to(self.device).eval() if reconstruction_head else None
        self.alignment_head = alignment_head.float().to(self.device).eval() if alignment_head else None
        for head in (self.reconstruction_head, self.alignment_head):
            if head is not None:
                head.requires_grad_(False)
        self._ref_heads: tuple[ProjectionHead | None, ProjectionHead | None] | None = None
        #: Hub commits this encoder was loaded from ({"checkpoint": sha|None, "base_model": sha|None}); None
        #: means a local directory. An index manifest records them.
        self.resolved_revisions: dict[str, str | None] = {"checkpoint": None, "base_model": None}
        self._special_ids_t = torch.tensor(self.special_ids, device=self.device)
        self._special_rows = special_rows.to(self.device, self.dtype)  # (K, hidden)
        self._row_of = torch.full((max(self.special_ids) + 1,), -1, dtype=torch.long, device=self.device)
        self._row_of[self._special_ids_t] = torch.arange(len(ids), device=self.device)
        self._stop_ids = self._find_stop_ids()
        self._fingerprint: str | None = None
        self._compiled: Any = None  # a CompiledForward once enable_compile() ran

    # ------------------------------------------------------------------------------------------------------
    # loading
    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        base_model: str | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        numerics: str = "fp32",
        revision: str | None = None,
        base_revision: str | None = None,
        trust_remote_code: bool = False,
        compile: bool = False,
    ) -> LLM2VecGen:
        """Load a checkpoint in the published layout (local directory or hub id).

        ``base_model`` overrides ``run_config.yml``'s ``model_name_or_path`` (for offline clusters that keep
        backbones locally). ``device``: ``cuda``, else ``mps``, else ``cpu``. ``dtype``: bf16 on CUDA,
        float32 elsewhere; with ``numerics="reference"`` the default is the checkpoint's ``torch_dtype``.
        ``numerics``: ``"fp32"`` (heads and mean in float32) or ``"reference"`` (heads and mean in the
        checkpoint dtype, as the reference package computes them: bit-identical bf16 vectors).
        ``revision`` / ``base_revision`` pin hub revisions of the checkpoint / backbone; the commits actually
        loaded are in :attr:`resolved_revisions`. ``trust_remote_code``: a checkpoint or backbone that ships
        its own code (``auto_map``) is refused unless this is True. ``compile``: run the backbone through
        ``torch.compile`` with length buckets (:meth:`enable_compile`; a speed setting, off by default).

        Every checkpoint file is validated here, before the backbone loads; a fault is one
        :class:`CheckpointError` line naming the file.
        """
        if numerics not in NUMERICS:
            raise RagenError(f"unknown numerics {numerics!r}; expected one of {', '.join(NUMERICS)}")
        source = str(name_or_path)
        resolved = resolve_checkpoint(source, revision=revision)
        ckpt = resolved.path
        refuse_remote_code(ckpt, trust_remote_code=trust_remote_code, what="checkpoint")
        refuse_remote_code(ckpt / "encoder", trust_remote_code=trust_remote_code, what="checkpoint")
        run_config = read_run_config(ckpt / "run_config.yml")
        special_tokens = run_config.get("special_tokens")
        if not isinstance(special_tokens, list) or not special_tokens or not all(isinstance(t, str) for t in special_tokens):
            raise CheckpointError(f"{ckpt / 'run_config.yml'}: 'special_tokens' must be a non-empty list of strings")
        max_len = run_config.get("max_input_length", 512)
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= len(special_tokens):
            raise CheckpointError(f"{ckpt / 'run_config.yml'}: max_input_length must be an integer above the "
                                  f"{len(special_tokens)} special tokens, got {max_len!r}")
        mode = run_config.get("encoding_mode", f"last_{len(special_tokens)}_tokens")
        ed_path = ckpt / "encoder_decoder_config.json"
        if ed_path.is_file():
            ed = read_encoder_decoder_config(ed_path)
            mode = ed.get("encoding_mode", mode)
            if ed.get("save_decoder"):
                raise CheckpointError(f"{ed_path}: save_decoder=true (a separately trained decoder) is not "
                                      "supported; LLM2Vec-Gen decodes with the frozen backbone")
        num_pooled = parse_encoding_mode(mode, len(special_tokens), str(ed_path if ed_path.is_file() else ckpt / "run_config.yml"))
        tokenizer = _load_tokenizer(ckpt, trust_remote_code=trust_remote_code)
        adapter = read_adapter(ckpt / "encoder")
        token_ids = tokenizer.convert_tokens_to_ids(special_tokens)
        unk = tokenizer.unk_token_id
        missing = [t for t, i in zip(special_tokens, token_ids) if i is None or (unk is not None and i == unk)]
        if missing:
            raise CheckpointError(f"{ckpt / 'tokenizer.json'}: lacks the special tokens {missing[:3]}"
                                  f"{'...' if len(missing) > 3 else ''} listed in run_config.yml; expected the "
                                  "checkpoint's own tokenizer (backbone tokenizer plus the special tokens)")
        if sorted(token_ids) != sorted(adapter.token_indices):
            raise CheckpointError(f"{ckpt / 'encoder/adapter_config.json'}: token_indices {list(adapter.token_indices)} "
                                  f"do not match the tokenizer's special-token ids {token_ids}")
        # Trained rows in the order of the special tokens.
        order = [adapter.token_indices.index(i) for i in token_ids]
        rows = adapter.rows[order]
        heads = {}
        for name in HEAD_FILES:
            heads[name] = ProjectionHead.load(ckpt / name) if (ckpt / name).is_file() else None
        _check_head_dims(heads["reconstruction_mlp"], heads["alignment_mlp"], int(rows.shape[1]), num_pooled,
                         str(ckpt))

        if base_model is None:
            if "model_name_or_path" not in run_config:
                raise CheckpointError(f"{ckpt / 'run_config.yml'}: no model_name_or_path; pass base_model=")
            base_model = resolve_base_model(str(run_config["model_name_or_path"]), ckpt)
        base = resolve_model(base_model, what="base model", revision=base_revision,
                             hint="pass the backbone with base_model=/--base-model")
        if numerics == "reference" and (dtype is None or dtype == "auto") and run_config.get("torch_dtype"):
            dtype = str(run_config["torch_dtype"])
        dev = resolve_device(device)
        lm = _load_causal_lm(base_model, resolve_dtype(dtype, dev), dev, folder=base.path,
                             trust_remote_code=trust_remote_code)
        if adapter.base_layer is not None:
            _check_base_layer(adapter, lm, token_ids, ckpt, base_model)
        model = cls(lm, tokenizer, special_tokens=special_tokens, special_rows=rows, num_pooled=num_pooled,
                    reconstruction_head=heads["reconstruction_mlp"], alignment_head=heads["alignment_mlp"],
                    run_config=run_config, base_model=base_model, source=source,
                    has_base_layer=adapter.base_layer is not None, numerics=numerics)
        model.resolved_revisions = {"checkpoint": resolved.commit, "base_model": base.commit}
        if compile:
            model.enable_compile()
        return model

    @classmethod
    def initialize(
        cls,
        base_model: str,
        *,
        num_special_tokens: int = 10,
        alignment_dim: int | None = None,
        reconstruction_head: bool = True,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        seed: int = 0,
    ) -> LLM2VecGen:
        """A new, untrained LLM2Vec-Gen model on a backbone: K special tokens ``<question1>..<questionK>``
        added to its tokenizer, their rows drawn at the scale of the backbone's embeddings, a
        reconstruction head (hidden -> hidden) and an alignment head (hidden -> ``alignment_dim``, the
        teacher's dimension; none when ``alignment_dim`` is None). Training starts from here."""
        base = resolve_model(base_model, what="base model")
        tokenizer = _load_tokenizer(base.path, what=f"base model {base_model!r}")
        special = [f"<question{i + 1}>" for i in range(num_special_tokens)]
        tokenizer.add_special_tokens({"additional_special_tokens": special}, replace_extra_special_tokens=False)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        dev = resolve_device(device)
        lm = _load_causal_lm(base_model, resolve_dtype(dtype, dev), dev, folder=base.path)
        gen = torch.Generator().manual_seed(seed)
        embed = lm.get_input_embeddings().weight.detach().float().cpu()
        hidden = embed.shape[1]
        rows = embed.mean(0) + torch.randn((num_special_tokens, hidden), generator=gen) * embed.std()  # (K, hidden)
        torch.manual_seed(seed)
        recon = ProjectionHead(hidden, hidden) if reconstruction_head else None
        align = ProjectionHead(hidden, alignment_dim) if alignment_dim else None
        run_config = {"model_name_or_path": base_model, "torch_dtype": str(lm.dtype).replace("torch.", ""),
                      "encoding_mode": f"last_{num_special_tokens}_tokens", "max_input_length": 512,
                      "special_tokens": special}
        model = cls(lm, tokenizer, special_tokens=special, special_rows=rows, num_pooled=num_special_tokens,
                    reconstruction_head=recon, alignment_head=align, run_config=run_config, base_model=base_model,
                    source=base_model)
        model.resolved_revisions = {"checkpoint": None, "base_model": base.commit}
        return model

    # ------------------------------------------------------------------------------------------------------
    # properties
    # ------------------------------------------------------------------------------------------------------
    @property
    def num_special_tokens(self) -> int:
        return len(self.special_ids)

    @property
    def hidden_size(self) -> int:
        return int(self._special_rows.shape[1])

    @property
    def dim(self) -> int:
        return self.alignment_head.output_dim if self.alignment_head is not None else (
            self.reconstruction_head.output_dim if self.reconstruction_head is not None else self.hidden_size)

    @property
    def spec(self) -> str:
        return self.source

    @property
    def max_input_length(self) -> int:
        return int(self.run_config.get("max_input_length", 512))

    def document_token_budget(self):
        """A :class:`~ragen.encoders.base.TokenBudget` for documents: the input limit (``max_input_length``,
        at most the 512 tokens :meth:`encode` truncates to) minus the document instruction, BOS and the K
        special tokens."""
        if getattr(self, "_budget", None) is None:
            from .base import make_token_budget

            self._budget = make_token_budget(self.tokenizer, min(self.max_input_length, 512),
                                             prefix=self.document_instruction or "",
                                             suffix="".join(self.special_tokens), name=self.source)
        return self._budget

    @property
    def fingerprint(self) -> str:
        """Identifies the function this encoder computes, independent of device and dtype."""
        if self._fingerprint is None:
            embed = self.lm.get_input_embeddings().weight
            last_name, last_param = list(self.lm.named_parameters())[-1]
            cfg = self.lm.config.to_dict()
            cfg_keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "intermediate_size", "vocab_size", "rope_theta")
            heads = []
            for head in (self.reconstruction_head, self.alignment_head):
                heads.append(None if head is None else
                             [head.config()["pooling_mode"]] + [tensor_digest_bytes(v).hex()[:32] for v in head.state_dict().values()])
            self._fingerprint = hash_parts(
                "llm2vec-gen/1", self.special_tokens, self.num_pooled, {k: cfg.get(k) for k in cfg_keys},
                tensor_digest_bytes(self._special_rows), tensor_digest_bytes(embed[:64]),
                last_name, tensor_digest_bytes(last_param.flatten()[:4096]), heads,
            )
        return self._fingerprint

    # ------------------------------------------------------------------------------------------------------
    # tokenization and the forward pass
    # ------------------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], max_length: int = 512) -> list[list[int]]:
        """Token ids per text, the K special tokens always last.

        Matches the reference: tokenize ``text + specials`` truncated to ``max_length``; where truncation cut
        into the special tokens, overwrite the last K positions with them (so the text is what gets cut).
        """
        texts = clean_texts(texts)
        k = len(self.special_ids)
        if max_length <= k:
            raise RagenError(f"max_length must exceed the {k} special tokens, got {max_length}")
        if not texts:
            return []
        suffix = "".join(self.special_tokens)
        # Very long texts: tokenize a generous prefix only. Byte-level BPE is local to pre-token pieces, so
        # the first max_length tokens of the prefix equal those of the full text when the prefix yields
        # comfortably more than max_length tokens; otherwise fall back to the full text.
        limit = max_length * 16
        long_idx = [i for i, t in enumerate(texts) if len(t) > limit]
        work = list(texts)
        for i in long_idx:
            head = self.tokenizer(texts[i][:limit], add_special_tokens=False)["input_ids"]
            if len(head) >= max_length + 16:
                work[i] = texts[i][:limit]
        enc = self.tokenizer([t + suffix for t in work], add_special_tokens=True, truncation=True,
                             max_length=max_length)["input_ids"]
        special = set(self.special_ids)
        out = []
        for ids in enc:
            if sum(1 for t in ids if t in special) < k:
                ids = ids[:-k] + self.special_ids if len(ids) >= k else self.special_ids[-len(ids):]
            out.append(list(ids))
        return out

    def _embed_ids(self, ids: torch.Tensor, special_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings with the trained rows spliced in for the special tokens.

        ``special_rows`` (K, hidden) replaces the stored rows; training passes its trainable parameter so
        gradients flow into it."""
        rows = self._special_rows if special_rows is None else special_rows
        table = self.lm.get_input_embeddings()
        is_special = torch.isin(ids, self._special_ids_t)  # (batch, seq)
        x = table(ids.masked_fill(is_special, 0))  # (batch, seq, hidden)
        if bool(is_special.any()):
            x[is_special] = rows[self._row_of[ids[is_special]]].to(x.dtype)
        return x

    def _pad_left(self, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids in batch)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _heads(self) -> tuple[ProjectionHead | None, ProjectionHead | None]:
        """(reconstruction, alignment) heads as this encoder's numerics run them."""
        if self.numerics != "reference":
            return self.reconstruction_head, self.alignment_head
        if self._ref_heads is None:
            import copy

            def in_saved_dtype(head: ProjectionHead | None) -> ProjectionHead | None:
                if head is None:
                    return None
                dtype = getattr(torch, head.saved_dtype.replace("torch.", ""))
                return copy.deepcopy(head).to(self.device, dtype).eval()

            self._ref_heads = (in_saved_dtype(self.reconstruction_head), in_saved_dtype(self.alignment_head))
        return self._ref_heads

    def enable_compile(self) -> bool:
        """Run the backbone of inference calls (encode, reconstruction states, logit lens) through
        ``torch.compile(dynamic=False)``, batches padded on the left up to length/batch buckets
        (:mod:`ragen.encoders.compiled`). Vectors stay equal to float tolerance; training and decoding stay
        eager. Returns whether compile is active: where it is unavailable, one warning and eager."""
        if self._compiled is None:
            from .compiled import CompiledForward

            n = self.num_pooled
            backbone = self.lm.base_model

            def forward(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                return backbone(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state[:, -n:, :]

            self._compiled = CompiledForward(forward, device=self.device, name=self.source)
        return self._compiled.active

    @property
    def compiled(self) -> bool:
        """Whether inference runs the compiled backbone (False: never asked for, or fell back)."""
        return self._compiled is not None and self._compiled.active

    def _inference_states(self, batch: list[list[int]], batch_size: int | None = None) -> torch.Tensor:
        """:meth:`last_hidden_states` of a token-id batch, through the compiled backbone when enabled."""
        ids, mask = self._pad_left(batch)
        if not self.compiled:
            return self.last_hidden_states(ids, mask)
        from .compiled import pad_to_bucket

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids_b, mask_b = pad_to_bucket(ids, mask, pad_id=pad, side="left", max_length=self.max_input_length,
                                      batch_size=batch_size)
        return self._compiled(self._embed_ids(ids_b), mask_b)[: ids.shape[0]]

    def _reconstruction_states(self, batch: list[list[int]], batch_size: int | None = None) -> torch.Tensor:
        """(batch, n, hidden): final hidden states of the last n positions after reconstruction_mlp.

        float32 by default; with numerics="reference" in the reconstruction head's dtype (the reference
        feeds the backbone's states to a head built in the checkpoint dtype)."""
        states = self._inference_states(batch, batch_size)  # (batch, n, hidden), backbone dtype
        recon, _ = self._heads()
        if self.numerics != "reference":
            states = states.float()
        if recon is not None:
            states = recon(states.to(recon.projection_dtype))
        return states

    def pad_batch(self, batch: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad token id lists (from :meth:`tokenize`): ``(ids, attention_mask)``, both (batch, seq)."""
        return self._pad_left([list(b) for b in batch])

    def last_hidden_states(self, ids: torch.Tensor, mask: torch.Tensor, *,
                           special_rows: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, n, hidden) final hidden states of the last n positions, before any head, in the
        backbone's dtype. Differentiable (not under inference mode) with respect to ``special_rows``,
        which replaces the stored rows: the hook the training loop uses."""
        out = self.lm.base_model(inputs_embeds=self._embed_ids(ids, special_rows), attention_mask=mask, use_cache=False)
        return out.last_hidden_state[:, -self.num_pooled:, :]  # (batch, n, hidden)

    def set_special_rows(self, rows: torch.Tensor) -> None:
        """Replace the special-token rows (K, hidden), e.g. with freshly trained ones."""
        if tuple(rows.shape) != tuple(self._special_rows.shape):
            raise RagenError(f"special rows must have shape {tuple(self._special_rows.shape)}, got {tuple(rows.shape)}")
        self._special_rows = rows.detach().to(self.device, self.dtype).clone()
        self._fingerprint = None

    def _pool(self, recon_states: torch.Tensor) -> torch.Tensor:
        """Alignment head then the mean over the n positions; in float32, or (numerics="reference") in the
        alignment head's dtype, as the reference computes them. Returns float32 either way."""
        _, align = self._heads()
        states = align(recon_states.to(align.projection_dtype)) if align is not None else recon_states
        return states.mean(dim=1).float()  # (batch, dim)

    def _apply_instruction(self, texts: Sequence[str] | str, instruction: str | None) -> list[str]:
        texts = clean_texts(texts)
        return [clean_texts([instruction])[0] + t for t in texts] if instruction else texts

    # ------------------------------------------------------------------------------------------------------
    # public encoding API
    # ------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str],
        *,
        instruction: str | None = None,
        batch_size: int = 32,
        max_length: int = 512,
        normalize: bool = False,
        show_progress: bool = False,
    ) -> np.ndarray:
        """Embed texts: float32 array ``(len(texts), dim)``, rows in input order."""
        token_ids = self.tokenize(self._apply_instruction(texts, instruction), max_length)
        out = np.zeros((len(token_ids), self.dim), dtype=np.float32)
        for idx in _progress(length_sorted_batches([len(t) for t in token_ids], batch_size), show_progress,
                             total=-(-len(token_ids) // batch_size), desc="encode"):
            emb = self._pool(self._reconstruction_states([token_ids[i] for i in idx], batch_size))
            out[idx] = emb.cpu().numpy()
        return l2_normalize(out) if normalize else out

    def encode_queries(self, texts: Sequence[str], *, instruction: str | None = None, batch_size: int = 32,
                       max_length: int = 512, normalize: bool = False, show_progress: bool = False) -> np.ndarray:
        """:meth:`encode` with the query instruction (default: "Generate a passage that best answers ...")."""
        return self.encode(texts, instruction=self.query_instruction if instruction is None else instruction,
                           batch_size=batch_size, max_length=max_length, normalize=normalize, show_progress=show_progress)

    def encode_documents(self, texts: Sequence[str], *, instruction: str | None = None, batch_size: int = 32,
                         max_length: int = 512, normalize: bool = False, show_progress: bool = False) -> np.ndarray:
        """:meth:`encode` with the document instruction (default: "Summarize the following passage: ")."""
        return self.encode(texts, instruction=self.document_instruction if instruction is None else instruction,
                           batch_size=batch_size, max_length=max_length, normalize=normalize, show_progress=show_progress)

    @torch.inference_mode()
    def reconstruction_states(self, texts: Sequence[str], *, instruction: str | None = None, batch_size: int = 32,
                              max_length: int = 512) -> np.ndarray:
        """The decodable states: float32 ``(len(texts), n, hidden)``."""
        token_ids = self.tokenize(self._apply_instruction(texts, instruction), max_length)
        out = np.zeros((len(token_ids), self.num_pooled, self.reconstruction_dim), dtype=np.float32)
        for idx in length_sorted_batches([len(t) for t in token_ids], batch_size):
            out[idx] = self._reconstruction_states([token_ids[i] for i in idx], batch_size).float().cpu().numpy()
        return out

    @property
    def reconstruction_dim(self) -> int:
        return self.reconstruction_head.output_dim if self.reconstruction_head is not None else self.hidden_size

    # ------------------------------------------------------------------------------------------------------
    # decoding: what the embedding "says"
    # ------------------------------------------------------------------------------------------------------
    def _find_stop_ids(self) -> list[int]:
        return sorted(stop_token_ids(self.lm, self.tokenizer))

    @torch.inference_mode()
    def generate_from_states(self, states: np.ndarray | torch.Tensor, *, max_new_tokens: int = 64,
                             batch_size: int = 16) -> list[list[int]]:
        """Greedy decoding by the frozen causal LM from reconstruction states ``(n_texts, n, hidden)``.

        The states are a soft prompt of equal length for every text, so batches need no padding; the KV
        cache makes each step cost one position instead of the whole prefix. Each id list ends at (and
        includes) the first stop token, like the reference.
        """
        states_t = torch.as_tensor(np.asarray(states) if not isinstance(states, torch.Tensor) else states)
        if states_t.ndim == 2:
            states_t = states_t.unsqueeze(0)
        if states_t.ndim != 3 or states_t.shape[-1] != self.hidden_size:
            raise RagenError(f"states must have shape (n, positions, {self.hidden_size}), got {tuple(states_t.shape)}")
        stop = torch.tensor(self._stop_ids, device=self.device)
        table = self.lm.get_input_embeddings()
        cache_kw = cache_keyword(self.lm)
        results: list[list[int]] = []
        for start in range(0, states_t.shape[0], batch_size):
            x = states_t[start:start + batch_size].to(self.device, self.dtype)  # (b, n, hidden)
            out = self.lm(inputs_embeds=x, use_cache=True, logits_to_keep=1)
            steps: list[torch.Tensor] = []
            done = torch.zeros(x.shape[0], dtype=torch.bool, device=self.device)
            for _ in range(max_new_tokens):
                nxt = out.logits[:, -1, :].argmax(dim=-1)  # (b,)
                steps.append(nxt)
                done |= torch.isin(nxt, stop)
                if bool(done.all()) or len(steps) == max_new_tokens:
                    break
                out = self.lm(inputs_embeds=table(nxt[:, None]), use_cache=True, logits_to_keep=1,
                              **{cache_kw: output_cache(out, cache_kw)})
            ids = torch.stack(steps, dim=1).cpu().tolist() if steps else [[] for _ in range(x.shape[0])]
            for row in ids:
                cut = next((j + 1 for j, t in enumerate(row) if t in self._stop_ids), len(row))
                results.append(row[:cut])
        return results

    def decode_ids(self, texts: Sequence[str], *, instruction: str | None = None, max_new_tokens: int = 64,
                   batch_size: int = 16, max_length: int = 512) -> list[list[int]]:
        """Greedy token ids the frozen LLM generates from each text's reconstruction states."""
        states = self.reconstruction_states(texts, instruction=instruction, batch_size=batch_size, max_length=max_length)
        return self.generate_from_states(states, max_new_tokens=max_new_tokens, batch_size=batch_size)

    def decode(self, texts: Sequence[str], *, instruction: str | None = None, max_new_tokens: int = 64,
               batch_size: int = 16, max_length: int = 512) -> list[str]:
        """What each text's embedding "says": the response decoded from its reconstruction states."""
        ids = self.decode_ids(texts, instruction=instruction, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, max_length=max_length)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]

    @torch.inference_mode()
    def top_tokens(self, texts: Sequence[str], k: int = 5, *, instruction: str | None = None,
                   max_length: int = 512, batch_size: int = 32) -> list[list[list[tuple[str, float]]]]:
        """Logit lens, as the reference's ``logit_lens_analysis.py`` computes it: both heads removed, the
        frozen decoder's ``lm_head`` applied to the raw final-layer states of the n pooled positions; for
        each text and position, the top-k tokens with their probabilities (softmax over the vocabulary).

        ``instruction``: prefix applied before encoding (default none: the reference lens reads the bare
        input text)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise RagenError(f"k must be a positive integer, got {k!r}")
        token_ids = self.tokenize(self._apply_instruction(texts, instruction), max_length)
        head = self.lm.get_output_embeddings()
        k = min(k, int(head.weight.shape[0]))
        result: list[list[list[tuple[str, float]]]] = [[] for _ in token_ids]
        for idx in length_sorted_batches([len(t) for t in token_ids], batch_size):
            states = self._inference_states([token_ids[i] for i in idx], batch_size)  # (b, n, hidden)
            logits = head(states)  # (b, n, vocab), in the backbone dtype like the reference
            top = logits.topk(k, dim=-1)
            probs = torch.softmax(logits.float(), dim=-1).gather(-1, top.indices)
            for row, i in enumerate(idx):
                result[i] = [[(self.tokenizer.decode([int(t)]), float(p)) for p, t in zip(ps, ts)]
                             for ps, ts in zip(probs[row].cpu(), top.indices[row].cpu())]
        return result

    # ------------------------------------------------------------------------------------------------------
    # saving
    # ------------------------------------------------------------------------------------------------------
    def trained_rows(self) -> torch.Tensor:
        """(K, hidden) float32 copy of the special-token rows, in special-token order."""
        return self._special_rows.detach().float().cpu().clone()

    def save_pretrained(self, directory: str | os.PathLike[str], *, special_rows: torch.Tensor | None = None) -> Path:
        """Write the published layout; ``from_pretrained`` on it reproduces identical embeddings.

        ``special_rows`` overrides the stored rows (the training loop passes its trained parameter).
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        rows = (self._special_rows if special_rows is None else special_rows).detach().cpu()
        embed = self.lm.get_input_embeddings().weight.detach().cpu()
        base_layer = None
        if self.has_base_layer:
            # The reference stores the frozen, resized input matrix; special rows beyond the backbone's
            # vocabulary hold their trained values (they are replaced on load either way).
            vocab = max(len(self.tokenizer), max(self.special_ids) + 1)
            base_layer = torch.zeros((vocab, embed.shape[1]), dtype=rows.dtype)
            n = min(vocab, embed.shape[0])
            base_layer[:n] = embed[:n].to(rows.dtype)
            for j, tid in enumerate(self.special_ids):
                if tid >= embed.shape[0]:
                    base_layer[tid] = rows[j]
        backbone_cfg = self.lm.config.to_dict()
        backbone_cfg["vocab_size"] = max(len(self.tokenizer), int(backbone_cfg.get("vocab_size", 0)))
        write_adapter(out / "encoder", Adapter(tuple(self.special_ids), rows, base_layer), backbone_cfg, self.base_model)
        torch_dtype = str(self.run_config.get("torch_dtype") or str(self.dtype).replace("torch.", ""))
        for name, head in (("reconstruction_mlp", self.reconstruction_head), ("alignment_mlp", self.alignment_head)):
            if head is not None:
                head.save(out / name, dtype=torch_dtype)
            elif (out / name).exists():
                (out / name).unlink()
        run_config = dict(self.run_config)
        run_config.update(model_name_or_path=self.base_model, encoding_mode=f"last_{self.num_pooled}_tokens",
                          special_tokens=list(self.special_tokens))
        run_config.setdefault("torch_dtype", str(self.dtype).replace("torch.", ""))
        run_config.setdefault("max_input_length", 512)
        import yaml

        atomic_write_text(out / "run_config.yml", yaml.safe_dump(run_config, sort_keys=False, allow_unicode=True))
        atomic_write_text(out / "encoder_decoder_config.json",
                          json.dumps({"encoding_mode": f"last_{self.num_pooled}_tokens", "save_decoder": False}, indent=2))
        _save_tokenizer(self.tokenizer, out, self.special_tokens)
        return out


def _save_tokenizer(tokenizer: Any, out: Path, special_tokens: Sequence[str]) -> None:
    """Save the tokenizer in the layout both transformers 5 and the reference (transformers 4.x) read:
    a generic fast-tokenizer class and the special tokens under ``additional_special_tokens``."""
    tokenizer.save_pretrained(str(out))
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["additional_special_tokens"] = list(special_tokens)
    cfg["extra_special_tokens"] = {}
    cfg["padding_side"] = "left"
    for key in ("backend", "is_local", "local_files_only"):
        cfg.pop(key, None)
    atomic_write_text(cfg_path, json.dumps(cfg, indent=2, ensure_ascii=False))
    special_map = {"additional_special_tokens": list(special_tokens)}
    for key in ("eos_token", "pad_token", "bos_token", "unk_token"):
        if getattr(tokenizer, key, None):
            special_map[key] = str(getattr(tokenizer, key))
    atomic_write_text(out / "special_tokens_map.json", json.dumps(special_map, indent=2, ensure_ascii=False))


def _check_head_dims(recon: ProjectionHead | None, align: ProjectionHead | None, hidden: int, num_pooled: int,
                     where: str) -> None:
    """Each head must take what the previous stage produces, at load time rather than mid-encode."""
    width = hidden
    for name, head in (("reconstruction_mlp", recon), ("alignment_mlp", align)):
        if head is None:
            continue
        path = getattr(head, "source_path", None) or f"{where}/{name}"
        first_n = head.pooling_mode.startswith("first_")
        if (head.input_dim > width) if first_n else (head.input_dim != width):
            raise CheckpointError(f"{path}: the head takes input_dim {head.input_dim} but receives {width}-wide "
                                  f"states ({'backbone hidden size' if width == hidden and name == 'reconstruction_mlp' else 'reconstruction_mlp output'}); "
                                  "is it the head of another model?")
        if head.size != 1 and (head.pooling_mode != "linear" or head.size != num_pooled):
            raise CheckpointError(f"{path}: size {head.size} needs pooling_mode 'linear' and one projection per "
                                  f"pooled position ({num_pooled})")
        width = head.output_dim


def _check_base_layer(adapter: Adapter, lm: Any, special_ids: Sequence[int], ckpt: Path, base_model: str) -> None:
    """The stored resized matrix must agree with the backbone on ordinary tokens: a mismatch means the
    base model is not the one the checkpoint was trained on."""
    assert adapter.base_layer is not None
    embed = lm.get_input_embeddings().weight
    n = min(adapter.base_layer.shape[0], embed.shape[0])
    specials = set(special_ids)
    sample = [i for i in torch.linspace(0, n - 1, steps=min(n, 256)).long().tolist() if i not in specials]
    stored = adapter.base_layer[sample].float()
    ours = embed[sample].detach().float().cpu()
    tol = 1e-6 if embed.dtype == torch.float32 and adapter.base_layer.dtype == torch.float32 else 1e-2
    if adapter.base_layer.shape[1] != embed.shape[1] or not torch.allclose(stored, ours, atol=tol, rtol=tol):
        raise CheckpointError(f"{ckpt / 'encoder/adapter_model.safetensors'}: its embedding matrix differs from "
                              f"base model {base_model!r}; the checkpoint was trained on another backbone")


def _progress(iterable, enabled: bool, *, total: int, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch")
