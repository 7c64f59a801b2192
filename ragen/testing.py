"""Tiny random models for tests, examples and benchmarks (no downloads).

``make_backbone`` writes a randomly initialised Qwen3 or Llama causal LM with a byte-level BPE tokenizer
trained in a fraction of a second; ``make_checkpoint`` turns it into an LLM2Vec-Gen checkpoint in the
published layout. Shapes are parameters, so benchmarks build realistic sizes with the same code.
"""

from __future__ import annotations

from pathlib import Path

_CORPUS = (
    "the quick brown fox jumps over the lazy dog. how do plants grow? photosynthesis turns light into "
    "sugar. what is the capital of france? paris is the capital of france. summarize the following "
    "passage: a cache stores recent results so that repeated questions are answered faster. generate a "
    "passage that best answers this question: why is the sky blue? rayleigh scattering makes short "
    "wavelengths scatter more. the theorem follows from induction on the length of the proof. "
    "retrieval augmented generation finds documents and answers with them. 0123456789 {}[]()<>.,;:!?-_/"
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def count_rows(db: str | Path, table: str) -> int:
    """Rows of ``table`` in an index database another process may be writing (read-only; 0 when it
    cannot be read yet). For tests and benchmarks that watch a run's progress from outside."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{Path(db)}?mode=ro", uri=True, timeout=1)
        try:
            return int(con.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def make_tokenizer(vocab_size: int = 512, extra_corpus: list[str] | None = None):
    """A byte-level BPE tokenizer (Qwen-style special tokens, left padding, a minimal chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4 + list(extra_corpus or []), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="left")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_backbone(directory: str | Path, *, family: str = "qwen3", hidden_size: int = 64, num_layers: int = 2,
                  num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int | None = None,
                  vocab_size: int = 512, seed: int = 0, tokenizer=None) -> Path:
    """Write a random causal LM plus tokenizer to ``directory`` and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok = tokenizer if tokenizer is not None else make_tokenizer(vocab_size)
    common = dict(vocab_size=len(tok), hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  intermediate_size=intermediate_size or 2 * hidden_size, max_position_embeddings=2048,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                  tie_word_embeddings=True)
    torch.manual_seed(seed)
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=hidden_size // num_heads, **common))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(f"unknown family {family!r}; expected qwen3 or llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_checkpoint(directory: str | Path, base_model: str | Path, *, num_special_tokens: int = 10,
                    alignment_dim: int | None = 48, seed: int = 0) -> Path:
    """An (untrained, random) LLM2Vec-Gen checkpoint on ``base_model``, in the published layout."""
    from .encoders.llm2vec_gen import LLM2VecGen

    model = LLM2VecGen.initialize(str(base_model), num_special_tokens=num_special_tokens,
                                  alignment_dim=alignment_dim, device="cpu", dtype="float32", seed=seed)
    return model.save_pretrained(directory)


def add_to_hub_cache(cache_dir: str | Path, repo_id: str, source: str | Path, *, commit: str | None = None,
                     ref: str | None = "main") -> str:
    """Copy a model folder into a Hugging Face hub cache (``HF_HUB_CACHE`` layout) as ``repo_id`` at
    ``commit`` (40 hex digits; derived from the files when None), pointing ``ref`` at it. With
    ``HF_HUB_OFFLINE=1`` the hub code path then resolves ``repo_id`` exactly as it would a downloaded
    model, so tests exercise it without network. Returns the commit."""
    import hashlib
    import shutil

    src = Path(source)
    if commit is None:
        h = hashlib.sha1(repo_id.encode())
        for file in sorted(p for p in src.rglob("*") if p.is_file()):
            h.update(file.relative_to(src).as_posix().encode())
            h.update(file.read_bytes())
        commit = h.hexdigest()
    storage = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    if snapshot.exists():
        shutil.rmtree(snapshot)
    shutil.copytree(src, snapshot)
    if ref:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return commit


def teach_answers(backbone: str | Path, examples, *, steps: int = 1000, lr: float = 1e-2,
                  stop_loss: float = 0.005) -> float:
    """Fine-tune all weights of a tiny causal LM in place so that each chat prompt (templated with a generation
    prompt, as ragen's chat generation does) is answered with its text, then save it. ``examples``: pairs of
    ``(messages, answer)``. Stops early below ``stop_loss``; returns the final loss. For tests that need a
    backbone whose answers (and so whose LLM2Vec-Gen embeddings) are known."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(backbone))
    lm = AutoModelForCausalLM.from_pretrained(str(backbone), dtype=torch.float32)
    seqs, masks = [], []
    for messages, answer in examples:
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(p + r)
        masks.append([0] * len(p) + [1] * len(r))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (seq, mask) in enumerate(zip(seqs, masks)):
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        labels[i, : len(seq)] = torch.where(torch.tensor(mask) == 1, torch.tensor(seq), torch.tensor(-100))
    torch.manual_seed(0)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr)
    lm.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        loss = lm(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if loss.item() < stop_loss:
            break
    lm.save_pretrained(str(backbone))
    return float(loss.item())
