"""Stage 1: the frozen LLM's own responses to the training queries.

Each query is wrapped in the backbone's chat template with the generation prompt (Qwen3: thinking off),
answered in length-sorted batches, and appended to a JSONL shard as soon as its batch finishes, so an
interrupted run resumes where it stopped. Process ``r`` of ``w`` answers the pending ones among queries ``r, r+w,
...``; :func:`merge_responses` joins the shards into ``responses.jsonl`` in query order.

Record format (one JSON object per line)::

    {"id": "...", "query": "...", "response": "...", "num_tokens": 123, "finish_reason": "stop" | "length"}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_json, atomic_write_text, iter_jsonl
from ..errors import CheckpointError, DataError
from ..errors import install_hint
from .config import PipelineConfig, QueriesConfig, ResponsesConfig, read_utf8, utf8_error

logger = logging.getLogger(__name__)

RESPONSES_FILE = "responses.jsonl"
_QUERY_FIELDS = ("query", "prompt", "question", "text", "instruction", "input")


@dataclass(frozen=True)
class Query:
    id: str
    text: str


# ----------------------------------------------------------------------------------------------------------
# reading queries
# ----------------------------------------------------------------------------------------------------------
def _query_from_record(rec: Any, field: str | None, where: str) -> str | None:
    """The query text of one record, or None for records to skip (multi-turn conversations)."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if field is not None:
        if field not in rec:
            raise DataError(f"{where}: no field {field!r} (queries.field); keys: {sorted(rec)[:10]}")
        value = rec[field]
    elif "messages" in rec and not any(k in rec for k in _QUERY_FIELDS):
        value = rec["messages"]
    else:
        key = next((k for k in _QUERY_FIELDS if k in rec), None)
        if key is None:
            raise DataError(f"{where}: no query field; expected one of {', '.join(_QUERY_FIELDS)} or 'messages' "
                            "(or set queries.field)")
        value = rec[key]
    if isinstance(value, list):  # chat messages: the reference keeps exactly 2-message conversations
        if len(value) != 2 or not isinstance(value[0], dict):
            return None
        first = value[0].get("content")
        return first if isinstance(first, str) else None
    if not isinstance(value, str):
        raise DataError(f"{where}: query must be a string, got {type(value).__name__}")
    return value


def _with_ids(items: Iterable[tuple[str | None, str]]) -> list[Query]:
    """Stable ids: the record's own id where given, else a digest of the text (duplicates get a suffix)."""
    out: list[Query] = []
    seen: dict[str, int] = {}
    for given, text in items:
        base = str(given) if given is not None else hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.append(Query(base if n == 0 else f"{base}-{n}", text))
    return out


def read_queries(cfg: QueriesConfig) -> list[Query]:
    """Queries from a .txt/.jsonl file or a hub dataset; empty texts are dropped."""
    src = cfg.source
    path = Path(src).expanduser()
    items: list[tuple[str | None, str]] = []
    if path.is_file():
        if path.suffix.lower() in (".jsonl", ".json"):
            try:
                for n, rec in iter_jsonl(path):
                    text = _query_from_record(rec, cfg.field, f"{path}:{n}")
                    if text is not None and text.strip():
                        items.append((rec.get("id"), text.strip()))
            except UnicodeDecodeError as exc:
                raise utf8_error(path, exc, "UTF-8 JSON lines (one query object per line)") from None
        else:
            text = read_utf8(path, "UTF-8 text, one query per line")
            items = [(None, line.strip()) for line in text.splitlines() if line.strip()]
    elif path.exists():
        raise DataError(f"{src}: is a directory; expected a .txt or .jsonl file or a hub dataset id")
    elif "/" in src and not src.startswith((".", "/", "~")) and src.count("/") == 1:
        items = _read_hub_queries(cfg)
    else:
        raise DataError(f"{src}: no such file; expected a .txt or .jsonl file or a hub dataset id (owner/name)")
    if cfg.limit is not None:
        items = items[: cfg.limit]
    if not items:
        raise DataError(f"{src}: no queries found")
    return _with_ids(items)


def _read_hub_queries(cfg: QueriesConfig) -> list[tuple[str | None, str]]:
    try:
        import datasets
    except ImportError:
        raise ImportError("reading queries from a hub dataset needs the 'datasets' package: pip install datasets") from None
    try:
        ds = datasets.load_dataset(cfg.source, split=cfg.split, streaming=cfg.limit is not None)
    except Exception as exc:  # network, auth, missing split: all mean "not readable here"
        raise DataError(f"cannot load hub dataset {cfg.source!r} split {cfg.split!r} "
                        f"({str(exc).splitlines()[0][:160] if str(exc) else exc.__class__.__name__})") from None
    items: list[tuple[str | None, str]] = []
    for i, rec in enumerate(ds):
        text = _query_from_record(dict(rec), cfg.field, f"{cfg.source}[{i}]")
        if text is not None and text.strip():
            items.append((rec.get("id"), text.strip()))
        if cfg.limit is not None and len(items) >= cfg.limit:
            break
    return items


# ----------------------------------------------------------------------------------------------------------
# JSONL shards
# ----------------------------------------------------------------------------------------------------------
def read_responses(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """Records of a responses file. Every record is written with its newline in one write, so a last line
    without a newline is a torn write from an interrupted run: it is dropped, and with ``repair`` cut off
    the file so appends continue cleanly. A bad complete line is an error."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete_end = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    records = []
    for n, raw in enumerate(data[:complete_end].split(b"\n")[:-1], 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            rec = None
        if not isinstance(rec, dict) or not {"id", "query", "response"} <= set(rec):
            raise DataError(f"{path}:{n}: not a response record; expected JSON with id, query, response")
        records.append(rec)
    if complete_end < len(data):
        logger.warning("%s: dropping a torn last line (interrupted write)", path)
        if repair:
            with open(path, "r+b") as f:
                f.truncate(complete_end)
    return records


def _shard_path(out_dir: Path, rank: int, world: int) -> Path:
    return out_dir / f"responses.shard-{rank}-of-{world}.jsonl"


def _all_done(out_dir: Path) -> dict[str, dict[str, Any]]:
    done: dict[str, dict[str, Any]] = {}
    for rec in read_responses(out_dir / RESPONSES_FILE):
        done[str(rec["id"])] = rec
    for shard in sorted(out_dir.glob("responses.shard-*.jsonl")):
        for rec in read_responses(shard):
            done[str(rec["id"])] = rec
    return done


# ----------------------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------------------
def load_generator(base_model: str, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """The frozen causal LM and its tokenizer (left padding), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(base_model, trust_remote_code=False)
        lm = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load base model {base_model!r} ({str(exc).splitlines()[0][:160]}); "
                              "pass a local directory where the hub is unreachable") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lm.requires_grad_(False)
    return lm.to(device).eval(), tok


def build_prompt(tokenizer: Any, query: str, cfg: ResponsesConfig) -> str:
    """The chat-formatted prompt with the generation prompt appended. ``enable_thinking`` is passed only
    to templates that use it (Qwen3); a tokenizer without a chat template gets the bare query."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return query
    messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + \
        [{"role": "user", "content": query}]
    extra = {"enable_thinking": cfg.enable_thinking} if "enable_thinking" in str(template) else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)


def stop_token_ids(lm: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    for src in (getattr(lm.generation_config, "eos_token_id", None), lm.config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return sorted(ids)


def fit_prompt(tokenizer: Any, query: str, cfg: ResponsesConfig) -> str:
    """The templated prompt within ``cfg.max_prompt_length`` tokens. The reference truncates the
    templated prompt itself (cutting the generation prompt off long queries); here the end of the query
    text is cut instead, so the chat template and its generation prompt always survive."""
    budget = cfg.max_prompt_length
    prompt = build_prompt(tokenizer, query, cfg)
    n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if n <= budget:
        return prompt
    ids = tokenizer(query, add_special_tokens=False)["input_ids"]
    keep = len(ids) - (n - budget)
    while keep > 0:  # token merges at the query's edges can shift the count by a token or two
        prompt = build_prompt(tokenizer, tokenizer.decode(ids[:keep]), cfg)
        n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n <= budget:
            return prompt
        keep -= max(1, n - budget)
    raise DataError(f"responses.max_prompt_length={budget}: the chat template alone needs more tokens")


_SAMPLING = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")


def generation_config(lm: Any, tokenizer: Any, cfg: ResponsesConfig) -> Any:
    """The model's own generation config with only the explicitly set options overridden (the reference
    passes none, so the model's defaults apply: Qwen3 samples)."""
    import copy

    gen = copy.deepcopy(lm.generation_config)
    for key in _SAMPLING:
        value = getattr(cfg, key)
        if value is not None:
            setattr(gen, key, value)
    if not gen.do_sample:  # greedy: neutral sampling knobs (the model's own would only draw a warning)
        gen.temperature, gen.top_p, gen.top_k = 1.0, 1.0, 50
    gen.max_new_tokens = cfg.max_new_tokens
    gen.max_length = None
    gen.eos_token_id = stop_token_ids(lm, tokenizer)
    gen.pad_token_id = tokenizer.pad_token_id
    return gen


def effective_settings(gen: Any, seed: int) -> dict[str, Any]:
    """What the generation really used (recorded in responses.settings.json)."""
    out: dict[str, Any] = {k: getattr(gen, k, None) for k in _SAMPLING}
    if not out["do_sample"]:
        out.update(temperature=None, top_p=None, top_k=None)  # unused by greedy decoding
    out.update(max_new_tokens=gen.max_new_tokens, seed=seed if out["do_sample"] else None)
    return json.loads(json.dumps(out, default=str))


@torch.inference_mode()
def answer(lm: Any, tokenizer: Any, queries: list[str], cfg: ResponsesConfig, *, seed: int = 0) -> list[dict[str, Any]]:
    """Generate one response per query (a single batch): ``{"response", "num_tokens", "finish_reason"}``."""
    device = next(lm.parameters()).device
    prompts = [fit_prompt(tokenizer, q, cfg) for q in queries]
    enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
    gen_cfg = generation_config(lm, tokenizer, cfg)
    stops = list(gen_cfg.eos_token_id)
    if gen_cfg.do_sample:
        torch.manual_seed(seed)
    gen = lm.generate(**enc, generation_config=gen_cfg)
    new = gen[:, enc["input_ids"].shape[1]:].cpu().tolist()  # (batch, generated)
    out = []
    for row in new:
        cut = next((j for j, t in enumerate(row) if t in stops), None)
        tokens = row if cut is None else row[:cut]
        out.append({"response": tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                    "num_tokens": len(tokens), "finish_reason": "length" if cut is None else "stop"})
    return out


def _append_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


SETTINGS_FILE = "responses.settings.json"


def _generation_settings(cfg: PipelineConfig) -> dict[str, Any]:
    """What determines a response: the model, the generation settings and the seed (JSON round-tripped).
    The recorded file adds ``effective`` (what the model's generation_config made of them)."""
    data = {"base_model": cfg.base_model, "responses": dataclasses.asdict(cfg.responses), "seed": sampling_seed(cfg)}
    return json.loads(json.dumps(data, default=str))


def sampling_seed(cfg: PipelineConfig) -> int:
    return cfg.responses.seed if cfg.responses.seed is not None else cfg.seed


def check_generation_settings(cfg: PipelineConfig, out_dir: str | Path) -> None:
    """Refuse to mix responses made with other settings into this run; record the settings of a new one.

    Responses are reused across re-runs and resumes, so an output directory must never hold answers from
    another base model, temperature or max_new_tokens: training on them would silently learn the wrong
    thing."""
    out = Path(out_dir)
    path = out / SETTINGS_FILE
    want = _generation_settings(cfg)
    existing = (out / RESPONSES_FILE).is_file() or any(out.glob("responses.shard-*.jsonl"))
    if path.is_file():
        try:
            have = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            have = None
        if isinstance(have, dict):
            have = {k: v for k, v in have.items() if k != "effective"}
        if have != want:
            changed = sorted(k for k in want if not isinstance(have, dict) or have.get(k) != want[k])
            what = ", ".join(changed) if changed else f"unreadable {SETTINGS_FILE}"
            raise DataError(f"{out}: its responses were generated with other settings ({what}); use a new "
                            f"--output directory, or delete {out}/responses*.jsonl and {SETTINGS_FILE} to regenerate")
    elif existing:
        raise DataError(f"{out}: holds responses without {SETTINGS_FILE} (unknown model and settings); use a new "
                        "--output directory, or delete its responses*.jsonl to regenerate")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, want)


def generate_responses(
    cfg: PipelineConfig,
    out_dir: str | Path,
    *,
    shard: tuple[int, int] = (0, 1),
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Answer this shard's pending queries, appending to its shard file; returns how many were generated.

    ``progress(done, total)`` is called after each batch (counts for this shard)."""
    rank, world = shard
    if not 0 <= rank < world:
        raise DataError(f"shard {rank}/{world}: expected 0 <= index < count")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_generation_settings(cfg, out)
    queries = read_queries(cfg.queries)
    shard_file = _shard_path(out, rank, world)
    read_responses(shard_file, repair=True)
    done = _all_done(out)
    # Fixed assignment (query i -> shard i mod w), so concurrently running shards never overlap.
    mine = [q for i, q in enumerate(queries) if i % world == rank and q.id not in done]
    if not mine:
        return 0
    logger.info("generating %d responses (%d already done, shard %d/%d)", len(mine), len(done), rank, world)
    if cfg.responses.dtype is not None:
        from ..encoders.base import resolve_dtype

        dtype = resolve_dtype(cfg.responses.dtype, device)
    lm, tok = load_generator(cfg.base_model, device, dtype)
    record = {**_generation_settings(cfg),
              "effective": effective_settings(generation_config(lm, tok, cfg.responses), sampling_seed(cfg))}
    if rank == 0:
        atomic_write_json(out / SETTINGS_FILE, record)
    lengths = [len(q.text) for q in mine]
    order = sorted(range(len(mine)), key=lambda i: -lengths[i])
    bs = cfg.responses.batch_size
    finished = 0
    for start in range(0, len(order), bs):
        batch = [mine[i] for i in order[start:start + bs]]
        seed = int(hashlib.sha1(f"{sampling_seed(cfg)}:{batch[0].id}".encode()).hexdigest()[:8], 16)
        results = answer(lm, tok, [q.text for q in batch], cfg.responses, seed=seed)
        _append_jsonl(shard_file, [{"id": q.id, "query": q.text, **r} for q, r in zip(batch, results)])
        finished += len(batch)
        if progress is not None:
            progress(finished, len(mine))
    return finished


def merge_responses(cfg: PipelineConfig, out_dir: str | Path) -> Path:
    """Join all shards (and an earlier ``responses.jsonl``) into ``responses.jsonl`` in query order."""
    out = Path(out_dir)
    queries = read_queries(cfg.queries)
    done = _all_done(out)
    missing = [q.id for q in queries if q.id not in done]
    if missing:
        raise DataError(f"{out}: {len(missing)} of {len(queries)} queries have no response yet (e.g. {missing[0]}); "
                        "run generate-responses on every shard first")
    target = out / RESPONSES_FILE
    atomic_write_text(target, "".join(json.dumps(done[q.id], ensure_ascii=False) + "\n" for q in queries))
    for shard in out.glob("responses.shard-*.jsonl"):
        shard.unlink()
    return target


# ----------------------------------------------------------------------------------------------------------
# published responses (stage 1 skipped)
# ----------------------------------------------------------------------------------------------------------
_PUBLISHED_QUERY_FIELDS = ("question", "query", "prompt")
_PUBLISHED_RESPONSE_FIELDS = ("answer", "response", "output")


def _published_rows(cfg: ResponsesConfig) -> tuple[str, Iterable[dict[str, Any]]]:
    """``(where, rows)`` of ``responses.source``: a local .jsonl/.json/.parquet file, or a hub dataset split."""
    src = str(cfg.source)
    path = Path(src).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            def rows() -> Iterable[dict[str, Any]]:
                try:
                    for _, rec in iter_jsonl(path):
                        yield rec
                except UnicodeDecodeError as exc:
                    raise utf8_error(path, exc, "UTF-8 JSON lines with question/answer fields") from None
            return str(path), rows()
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ImportError(f"parquet responses need pyarrow: {install_hint('train')}") from None
            try:
                table = pq.read_table(path)
            except (OSError, ValueError) as exc:  # pyarrow raises ArrowInvalid (a ValueError) on bad files
                raise DataError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0][:120]})") from None
            return str(path), table.to_pylist()
        raise DataError(f"{path}: unknown responses file type {suffix!r}; expected .jsonl, .json or .parquet")
    if path.exists():
        raise DataError(f"{src}: is a directory; expected a .jsonl/.parquet file or a hub dataset id (owner/name)")
    if src.count("/") != 1 or src.startswith((".", "/", "~")):
        raise DataError(f"{src}: no such file; expected a .jsonl/.parquet file or a hub dataset id (owner/name)")
    try:
        import datasets
    except ImportError:
        raise ImportError(f"published responses from the hub need the datasets package: {install_hint('train')}") \
            from None
    try:
        ds = datasets.load_dataset(src, split=cfg.split)
    except Exception as exc:  # network, auth, missing split: all mean "not readable here"
        raise DataError(f"cannot load hub dataset {src!r} split {cfg.split!r} "
                        f"({str(exc).splitlines()[0][:160] if str(exc) else exc.__class__.__name__}); "
                        "the paper's responses are McGill-NLP/llm2vec-gen-tulu, one split per backbone "
                        "(e.g. Qwen3_8B)") from None
    return f"{src}[{cfg.split}]", (dict(r) for r in ds)


def read_published_responses(cfg: PipelineConfig) -> list[dict[str, Any]]:
    """Response records from ``responses.source`` (fields question/answer as McGill-NLP/llm2vec-gen-tulu,
    or query/response; ``responses.query_field``/``response_field`` name others). Ids: the row's ``id``
    (or ``original_id``), else its position. ``queries.limit`` keeps the first N. Every published answer
    counts as finished (the reference ends every answer with its end marker)."""
    r = cfg.responses
    where, rows = _published_rows(r)
    out: list[dict[str, Any]] = []
    qf, rf = r.query_field, r.response_field
    for i, rec in enumerate(rows):
        if not isinstance(rec, dict):
            raise DataError(f"{where}[{i}]: expected a record with question/answer fields")
        qkey = qf or next((k for k in _PUBLISHED_QUERY_FIELDS if k in rec), None)
        rkey = rf or next((k for k in _PUBLISHED_RESPONSE_FIELDS if k in rec), None)
        if qkey is None or rkey is None or qkey not in rec or rkey not in rec:
            raise DataError(f"{where}[{i}]: no {'query' if qkey is None or qkey not in rec else 'response'} field; "
                            f"keys: {sorted(rec)[:10]} (set responses.query_field/response_field)")
        query, response = rec[qkey], rec[rkey]
        if not isinstance(query, str) or not isinstance(response, str):
            raise DataError(f"{where}[{i}]: {qkey!r} and {rkey!r} must be strings")
        given = rec.get("id", rec.get("original_id"))
        out.append({"id": str(given) if given is not None else str(i), "query": query, "response": response,
                    "finish_reason": "stop"})
        if cfg.queries.limit is not None and len(out) >= cfg.queries.limit:
            break
    if not out:
        raise DataError(f"{where}: no responses")
    seen: dict[str, int] = {}
    for rec in out:  # duplicate ids get a suffix, as for queries
        n = seen.get(rec["id"], 0)
        seen[rec["id"]] = n + 1
        if n:
            rec["id"] = f"{rec['id']}-{n}"
    return out


def import_responses(cfg: PipelineConfig, out_dir: str | Path) -> Path:
    """Stage 1 from published responses: write them as ``responses.jsonl`` (no model is loaded)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_generation_settings(cfg, out)
    records = read_published_responses(cfg)
    target = out / RESPONSES_FILE
    atomic_write_text(target, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))
    return target


def responses_complete(cfg: PipelineConfig, out_dir: str | Path) -> bool:
    """``responses.jsonl`` answers exactly the current queries, in order, with the current settings. When
    the query set changed, it is not complete: generation fills the gaps and the merge drops the extras."""
    path = Path(out_dir) / RESPONSES_FILE
    if not path.is_file():
        return False
    check_generation_settings(cfg, out_dir)
    if cfg.responses.source:
        return True  # imported as a whole, under the same recorded source
    return [str(r["id"]) for r in read_responses(path)] == [q.id for q in read_queries(cfg.queries)]
