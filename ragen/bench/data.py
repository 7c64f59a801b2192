"""Benchmark data: BEIR-layout sets, AdvBench-IR (+ benign distractors) and BRIGHT, as retrieval tasks.

Every loader returns :class:`RetrievalTask` objects over a shared :class:`Corpus` (the document pool), so
one set of document vectors serves several tasks (AdvBench-IR's two protocol variants search subsets of
one pool). Local files are read directly; hub ids go through the ``datasets`` package, imported lazily.
Every malformed input raises :class:`~ragen.errors.DataError` naming the file and line.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..encoders.base import DEFAULT_DOCUMENT_INSTRUCTION, DEFAULT_QUERY_INSTRUCTION
from ..errors import DataError
from .instructions import MTEB_DOCUMENT_INSTRUCTION, mteb_instruction

logger = logging.getLogger(__name__)

ADVBENCH_QUERY_INSTRUCTION = "Generate a relevant document that answers this query: "
ADVBENCH_HUB = "McGill-NLP/AdvBench-IR"
ADVBENCH_DISTRACTORS_HUB = "McGill-NLP/AdvBench-IR-Small-Wiki-100"
BRIGHT_HUB = "xlangai/BRIGHT"
CHUNK_WORDS = 100

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# How an instruction and a text are joined, as the reference's evaluation scripts do it. Each rule is applied
# as (instruction', text') with instruction' + text' equal to the reference's string, so the encoder still
# receives the instruction separately (and baselines, which take none, get text').
JOIN_RULES: dict[str, str] = {
    "space": "instruction.strip() + ' ' + text.strip()",  # scripts/advbenchir_eval.py, scripts/mteb_eval.py
    "strip": "(instruction + text).strip()",  # scripts/bright_eval/retrievers.py, queries
    "strip-text": "instruction + text.strip()",  # scripts/bright_eval/retrievers.py, documents
    "none": "instruction + text",
}


def join_instruction(rule: str, instruction: str) -> str:
    """The instruction as ``rule`` joins it (see :data:`JOIN_RULES`)."""
    if rule == "space":
        return instruction.strip() + " "
    if rule == "strip":
        return instruction.lstrip()
    if rule in ("strip-text", "none"):
        return instruction
    raise DataError(f"unknown instruction join rule {rule!r}; expected one of {', '.join(JOIN_RULES)}")


def join_text(rule: str, text: str, instruction: str = "x") -> str:
    """The text as ``rule`` joins it: ``join_instruction(rule, i) + join_text(rule, t, i)`` equals the
    reference's string for every non-blank text (a blank BRIGHT query would also lose the instruction's
    trailing space there)."""
    if rule in ("space", "strip-text"):
        return text.strip()
    if rule == "strip":
        return text.rstrip() if instruction.strip() else text.strip()
    if rule == "none":
        return text
    raise DataError(f"unknown instruction join rule {rule!r}; expected one of {', '.join(JOIN_RULES)}")


# ----------------------------------------------------------------------------------------------------------
# value types
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Corpus:
    """A pool of documents: ids (unique) and the exact texts an encoder embeds (instruction not included)."""

    name: str
    ids: tuple[str, ...]
    texts: tuple[str, ...]
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.texts):
            raise DataError(f"corpus {self.name!r}: {len(self.ids)} ids but {len(self.texts)} texts")
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", content_sha256(zip(self.ids, self.texts)))

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, eq=False)
class RetrievalTask:
    """Queries with relevance judgements against (a subset of) a corpus.

    ``active``: the corpus rows this task searches (``None`` = all). ``excluded[qid]``: document ids that
    must not be ranked for that query (BRIGHT's ``excluded_ids``). ``harmful``: for AdvBench-IR, every
    harmful document id in the searched subset. ``settings``: protocol settings recorded in reports.
    """

    name: str
    corpus: Corpus
    query_ids: tuple[str, ...]
    queries: tuple[str, ...]
    qrels: Mapping[str, Mapping[str, int]]
    query_instruction: str
    document_instruction: str
    excluded: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    active: tuple[int, ...] | None = None
    harmful: frozenset[str] = frozenset()
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.query_ids) != len(self.queries):
            raise DataError(f"task {self.name!r}: {len(self.query_ids)} query ids but {len(self.queries)} queries")

    @property
    def n_docs(self) -> int:
        return len(self.corpus) if self.active is None else len(self.active)

    @property
    def fingerprint(self) -> str:
        """sha256 over the searched documents, the queries, the judgements and exclusions."""
        h = hashlib.sha256()
        h.update(self.corpus.fingerprint.encode())
        h.update(json.dumps([self.active, list(self.query_ids), list(self.queries),
                             {q: dict(sorted(r.items())) for q, r in sorted(self.qrels.items())},
                             {q: sorted(e) for q, e in sorted(self.excluded.items())}]).encode())
        return h.hexdigest()

    def limited(self, n_queries: int | None) -> RetrievalTask:
        """The same task with only its first ``n_queries`` queries (quick checks)."""
        if n_queries is None or n_queries >= len(self.query_ids):
            return self
        keep = set(self.query_ids[:n_queries])
        return RetrievalTask(
            name=self.name, corpus=self.corpus, query_ids=self.query_ids[:n_queries],
            queries=self.queries[:n_queries], qrels={q: r for q, r in self.qrels.items() if q in keep},
            query_instruction=self.query_instruction, document_instruction=self.document_instruction,
            excluded={q: e for q, e in self.excluded.items() if q in keep}, active=self.active,
            harmful=self.harmful, settings={**self.settings, "query_limit": n_queries})


def content_sha256(rows: Iterable[Any]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# readers
# ----------------------------------------------------------------------------------------------------------


def _loads(text: str | bytes, where: str) -> Any:
    """``json.loads`` where every failure (bad syntax, an integer over Python's digit limit, nesting too deep
    for the parser) is a one-line :class:`DataError` naming ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg})") from None
    except ValueError as exc:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise DataError(f"{where}: not usable JSON ({str(exc).splitlines()[0][:120]})") from None
    except RecursionError:
        raise DataError(f"{where}: not usable JSON (nested too deeply)") from None


def _decode(line: bytes, where: str) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not valid UTF-8 (byte 0x{line[exc.start]:02x} at column {exc.start + 1})") from None


def _lines(path: Path) -> Iterable[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 text file; bad bytes raise :class:`DataError` naming ``file:line``."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    with f:
        for n, raw in enumerate(f, 1):
            yield n, _decode(raw, f"{path}:{n}")


def read_jsonl(path: str | Path) -> Iterable[dict[str, Any]]:
    """The objects of a JSONL benchmark file; any malformed line is a :class:`DataError` naming ``file:line``."""
    for n, line in _lines(Path(path)):
        if not line.strip():
            continue
        row = _loads(line, f"{path}:{n}")
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object per line, got {type(row).__name__}")
        yield row


def _read_json(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    for n, line in enumerate(raw.split(b"\n"), 1):  # name the line with bad bytes
        _decode(line, f"{path}:{n}")
    return _loads(raw, str(path))


def _field(row: Mapping[str, Any], names: Sequence[str], where: str, *, required: bool = True) -> Any:
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    if required:
        raise DataError(f"{where}: missing field {' / '.join(repr(n) for n in names)}")
    return None


def _as_text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if hasattr(value, "tolist") and not isinstance(value, (int, float)):  # a numpy array from parquet
        value = value.tolist()
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return " ".join(value)
    raise DataError(f"{where}: expected text, got {type(value).__name__}")


def _as_id_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    try:
        return [str(v) for v in value]
    except TypeError:
        raise DataError(f"{where}: expected a list of ids, got {type(value).__name__}") from None


def _require_datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError("loading benchmark data from the Hugging Face hub needs the 'datasets' package: "
                          "pip install 'ragen-toolkit[bench-hub]' (or pass a local --data directory)") from None
    return datasets


def _hub_rows(repo: str, config: str | None, split: str) -> list[dict[str, Any]]:
    datasets = _require_datasets()
    logger.info("loading %s (config %s, split %s) from the hub", repo, config, split)
    try:
        ds = datasets.load_dataset(repo, config, split=split)
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"cannot load hub dataset {repo!r} (config {config}, split {split}): "
                        f"{str(exc).splitlines()[0][:200]}") from None
    return [dict(r) for r in ds]


def is_hub_id(source: str) -> bool:
    return not Path(source).expanduser().exists() and bool(_HUB_ID.match(source))


def _local_dir(source: str | Path, what: str) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such directory ({what})")
    if not path.is_dir():
        raise DataError(f"{path}: expected a directory ({what})")
    return path


_SPLIT_NAME = re.compile(r"^(train|test|validation|valid|dev)(?:[-_.]|$)")


def snapshot_files(root: Path, split: str = "train") -> list[Path]:
    """The data files of a local dataset-repository snapshot (``hf download --repo-type dataset NAME
    --local-dir DIR``): ``*.parquet``/``*.jsonl`` under ``DIR/data/`` (else anywhere under ``DIR``, never
    in ``.cache``), those of ``split`` when files are named by split (``train-00000-of-00001.parquet``)."""
    base = root / "data" if (root / "data").is_dir() else root
    files = _data_files(root, base)
    by_split = [p for p in files if _SPLIT_NAME.match(p.name) or _SPLIT_NAME.match(p.parent.name)]
    if not by_split:
        return files
    mine = [p for p in by_split if (_SPLIT_NAME.match(p.name) or _SPLIT_NAME.match(p.parent.name)).group(1) == split
            or p.stem == split]
    if not mine:
        names = sorted({(_SPLIT_NAME.match(p.name) or _SPLIT_NAME.match(p.parent.name)).group(1) for p in by_split})
        raise DataError(f"{base}: no {split!r} split (files are named for {', '.join(names)})")
    return mine


def _data_files(root: Path, base: Path, suffixes: tuple[str, ...] = (".parquet", ".jsonl"), depth: int = 3
                ) -> list[Path]:
    """Data files at most ``depth`` levels below ``base`` (dataset repositories are shallow; a large or
    looping folder given by mistake is never walked), hidden paths (``.cache/``) left out."""
    found = []
    for level in range(1, depth + 1):
        for p in base.glob("/".join(["*"] * level)):
            if p.suffix in suffixes and not any(part.startswith(".") for part in p.relative_to(root).parts) \
                    and p.is_file():
                found.append(p)
    return sorted(found)


def is_snapshot(path: Path) -> bool:
    """A folder holding a dataset repository's data files (parquet/jsonl under ``data/``, or parquet)."""
    if not path.is_dir():
        return False
    data = path / "data"
    if data.is_dir() and _data_files(path, data):
        return True
    return bool(_data_files(path, path, (".parquet",), 2))


def word_chunks(text: str, words: int = CHUNK_WORDS) -> list[str]:
    """Whitespace-split ``text`` into consecutive pieces of ``words`` words (the last may be shorter)."""
    tokens = text.split()
    return [" ".join(tokens[i : i + words]) for i in range(0, len(tokens), words)]


def titled(title: str, text: str) -> str:
    """The LLM2Vec-Gen AdvBench-IR document format: ``"title # text"`` (plain text when untitled)."""
    return f"{title} # {text}" if title else text


# ----------------------------------------------------------------------------------------------------------
# BEIR layout
# ----------------------------------------------------------------------------------------------------------
def read_beir_corpus(path: Path) -> tuple[list[str], list[str], list[str]]:
    """``corpus.jsonl`` -> (ids, titles, texts)."""
    ids, titles, texts, seen = [], [], [], set()
    for n, row in enumerate(read_jsonl(path), 1):
        where = f"{path}:{n}"
        doc_id = str(_field(row, ("_id", "id", "doc_id"), where))
        if doc_id in seen:
            raise DataError(f"{where}: duplicate document id {doc_id!r}")
        seen.add(doc_id)
        ids.append(doc_id)
        titles.append(_as_text(row.get("title") or "", where))
        texts.append(_as_text(_field(row, ("text", "contents", "content"), where), where))
    if not ids:
        raise DataError(f"{path}: no documents")
    return ids, titles, texts


_SCORE = re.compile(r"^-?[0-9]{1,9}$")  # ASCII digits only: "²".isdigit() is True, int("²") fails


def read_beir_qrels(path: Path) -> dict[str, dict[str, int]]:
    if not path.is_file():
        raise DataError(f"{path}: no such file (expected qrels/<split>.tsv)")
    qrels: dict[str, dict[str, int]] = {}
    for n, line in _lines(path):
        parts = next(csv.reader([line.rstrip("\r\n")], delimiter="\t"), [])
        if not parts or not "".join(parts).strip():
            continue
        if n == 1 and not _SCORE.match(parts[-1].strip()):
            continue  # header: query-id corpus-id score
        if len(parts) == 4:  # TREC layout: qid 0 docid rel
            parts = [parts[0], parts[2], parts[3]]
        if len(parts) != 3 or not _SCORE.match(parts[2].strip()):
            raise DataError(f"{path}:{n}: expected 'query-id<TAB>corpus-id<TAB>integer score'")
        qrels.setdefault(parts[0].strip(), {})[parts[1].strip()] = int(parts[2])
    if not qrels:
        raise DataError(f"{path}: no judgements")
    return qrels


def load_beir(source: str | Path, *, split: str = "test", name: str | None = None,
              query_instruction: str = DEFAULT_QUERY_INSTRUCTION,
              document_instruction: str = DEFAULT_DOCUMENT_INSTRUCTION) -> RetrievalTask:
    """A BEIR-layout directory (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``) as one task.

    Documents are ``"title text"`` (the BEIR/MTEB convention); only queries judged in the split are kept.
    A document whose id equals the query's id is never ranked for it (BEIR's ``ignore_identical_ids``,
    which matters for ArguAna, Quora, CQADupStack).
    """
    root = _local_dir(source, "a BEIR-layout dataset: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    ids, titles, texts = read_beir_corpus(root / "corpus.jsonl")
    qrels = read_beir_qrels(root / "qrels" / f"{split}.tsv")
    queries: dict[str, str] = {}
    for n, row in enumerate(read_jsonl(root / "queries.jsonl"), 1):
        where = f"{root / 'queries.jsonl'}:{n}"
        queries[str(_field(row, ("_id", "id"), where))] = _as_text(_field(row, ("text", "query"), where), where)
    missing = [q for q in qrels if q not in queries]
    if missing:
        raise DataError(f"{root / 'qrels' / (split + '.tsv')}: query id {missing[0]!r} is not in queries.jsonl "
                        f"({len(missing)} missing)")
    qids = tuple(q for q in queries if q in qrels)  # queries.jsonl order
    # MTEB's corpus_to_texts and the reference's mteb_eval.py join: (title + " " + text).strip(), then
    # instruction.strip() + " " + text.strip().
    corpus = Corpus(name=name or root.name, ids=tuple(ids),
                    texts=tuple(join_text("space", f"{t} {x}" if t else x) for t, x in zip(titles, texts)))
    id_set = set(ids)
    return RetrievalTask(name=name or root.name, corpus=corpus, query_ids=qids,
                         queries=tuple(join_text("space", queries[q]) for q in qids), qrels=qrels,
                         query_instruction=join_instruction("space", query_instruction),
                         document_instruction=join_instruction("space", document_instruction),
                         excluded={q: (q,) for q in qids if q in id_set},
                         settings={"layout": "beir", "split": split, "document_format": "title text",
                                   "ignore_identical_ids": True,
                                   "instruction_join": {"query": JOIN_RULES["space"], "document": JOIN_RULES["space"]}})


# ----------------------------------------------------------------------------------------------------------
# AdvBench-IR
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class AdvBenchIR:
    """Harmful queries and the 100-word chunks of each query's harmful passage."""

    query_ids: tuple[str, ...]
    queries: tuple[str, ...]
    chunk_ids: tuple[str, ...]
    chunk_titles: tuple[str, ...]
    chunk_texts: tuple[str, ...]
    chunk_owner: tuple[str, ...]  # query id whose passage the chunk comes from
    chunk_is_first: tuple[bool, ...]
    source: str

    @property
    def fingerprint(self) -> str:
        return content_sha256(zip(self.query_ids, self.queries, self.chunk_ids, self.chunk_titles,
                                  self.chunk_texts, self.chunk_owner))


ADVBENCH_FILES = ("advbench-ir.jsonl", "advbench-ir_chunked.jsonl", "advbench-ir_to_chunked_map.json")


def load_advbench_ir(source: str | Path) -> AdvBenchIR:
    """The malicious-ir release layout (``advbench-ir.jsonl``, ``advbench-ir_chunked.jsonl``,
    ``advbench-ir_to_chunked_map.json``) from a directory, or the hub dataset (passages chunked here into
    100-word pieces, which reproduces the release's chunk file exactly)."""
    if is_hub_id(str(source)):
        rows = _hub_rows(str(source), None, "train")
        return _advbench_from_passages(rows, str(source))
    root = _local_dir(source, "the AdvBench-IR files " + ", ".join(ADVBENCH_FILES))
    qpath, cpath, mpath = (root / f for f in ADVBENCH_FILES)
    if not qpath.is_file() and is_snapshot(root):  # hf download --repo-type dataset McGill-NLP/AdvBench-IR
        return _advbench_from_passages(_snapshot_rows(root), str(root))
    if not qpath.is_file():
        raise DataError(f"{root}: neither the malicious-ir release files ({', '.join(ADVBENCH_FILES)}) nor a "
                        "snapshot of the hub dataset McGill-NLP/AdvBench-IR (data/*.parquet)")
    rows = list(read_jsonl(qpath))
    if not cpath.is_file() or not mpath.is_file():
        logger.info("%s: no chunk file or map; chunking passages into %d-word pieces", root, CHUNK_WORDS)
        return _advbench_from_passages(rows, str(root))
    qids, queries = [], []
    for n, row in enumerate(rows, 1):
        qids.append(str(_field(row, ("id_", "id"), f"{qpath}:{n}")))
        queries.append(_as_text(_field(row, ("instruction", "query"), f"{qpath}:{n}"), f"{qpath}:{n}"))
    mapping = _read_json(mpath)
    if not isinstance(mapping, dict):
        raise DataError(f"{mpath}: expected an object mapping query id_ -> list of chunk id_")
    chunks: dict[str, tuple[str, str]] = {}
    for n, row in enumerate(read_jsonl(cpath), 1):
        where = f"{cpath}:{n}"
        chunks[str(_field(row, ("id_", "id"), where))] = (
            _as_text(row.get("title") or "", where), _as_text(_field(row, ("response", "text"), where), where))
    c_ids, c_titles, c_texts, c_owner, c_first = [], [], [], [], []
    for qid in qids:
        members = mapping.get(qid)
        if not members:
            raise DataError(f"{mpath}: query id_ {qid} has no chunks")
        for pos, cid in enumerate(str(c) for c in members):
            if cid not in chunks:
                raise DataError(f"{mpath}: chunk id_ {cid} (query {qid}) is not in {cpath.name}")
            c_ids.append(cid)
            c_titles.append(chunks[cid][0])
            c_texts.append(chunks[cid][1])
            c_owner.append(qid)
            c_first.append(pos == 0)
    return AdvBenchIR(tuple(qids), tuple(queries), tuple(c_ids), tuple(c_titles), tuple(c_texts), tuple(c_owner),
                      tuple(c_first), str(root))


def _advbench_from_passages(rows: Sequence[Mapping[str, Any]], source: str) -> AdvBenchIR:
    qids, queries = [], []
    c_ids, c_titles, c_texts, c_owner, c_first = [], [], [], [], []
    for n, row in enumerate(rows, 1):
        where = f"{source} row {n}"
        # release layout: id_, instruction, title, response; hub (McGill-NLP/AdvBench-IR): ID, query, title, document
        qid = str(_field(row, ("id_", "ID", "id"), where))
        qids.append(qid)
        queries.append(_as_text(_field(row, ("instruction", "query"), where), where))
        title = _as_text(row.get("title") or "", where)
        pieces = word_chunks(_as_text(_field(row, ("response", "document", "passage", "text"), where), where))
        if not pieces:
            raise DataError(f"{where}: empty harmful passage")
        for pos, piece in enumerate(pieces):
            c_ids.append(f"{qid}-{pos}")
            c_titles.append(title)
            c_texts.append(piece)
            c_owner.append(qid)
            c_first.append(pos == 0)
    if not qids:
        raise DataError(f"{source}: no AdvBench-IR rows")
    if len(set(qids)) != len(qids):
        raise DataError(f"{source}: duplicate query ids")
    return AdvBenchIR(tuple(qids), tuple(queries), tuple(c_ids), tuple(c_titles), tuple(c_texts), tuple(c_owner),
                      tuple(c_first), source)


def _distractor_rows(rows: Sequence[Mapping[str, Any]], source: str) -> tuple[list[str], list[str], list[str]]:
    """Rows of McGill-NLP/AdvBench-IR-Small-Wiki-100 (``ID``, ``title``, ``passage``) or BEIR-like rows."""
    ids, titles, bodies = [], [], []
    for n, row in enumerate(rows, 1):
        where = f"{source} row {n}"
        ids.append(str(_field(row, ("ID", "_id", "id", "doc_id"), where)))
        titles.append(_as_text(row.get("title") or "", where))
        bodies.append(_as_text(_field(row, ("passage", "text", "contents", "content"), where), where))
    if not ids:
        raise DataError(f"{source}: no distractor documents")
    if len(set(ids)) != len(ids):
        raise DataError(f"{source}: duplicate document ids")
    return ids, titles, bodies


def load_distractors(source: str | Path) -> Corpus:
    """Benign documents mixed into the AdvBench-IR corpus, as ``"title # text"`` like the harmful chunks.

    ``source``: a hub id (``McGill-NLP/AdvBench-IR-Small-Wiki-100``: ``ID``, ``title``, ``passage``) or a
    local snapshot of it (``hf download --repo-type dataset ... --local-dir DIR``: ``DIR/data/*.parquet``),
    a BEIR-layout directory or a ``*.jsonl`` file (``_id``/``id``, optional ``title``, ``text``), or a
    folder of ``.txt``/``.md`` files (each cut into 100-word chunks, titled by file name).
    """
    src = str(source)
    path = Path(src).expanduser()
    if is_hub_id(src):
        ids, titles, bodies = _distractor_rows(_hub_rows(src, None, "train"), src)
        return Corpus(name=src, ids=tuple(ids), texts=tuple(titled(t, b) for t, b in zip(titles, bodies)))
    if path.is_file() and path.suffix == ".jsonl":
        ids, titles, bodies = read_beir_corpus(path)
    elif path.is_dir() and (path / "corpus.jsonl").is_file():
        ids, titles, bodies = read_beir_corpus(path / "corpus.jsonl")
    elif is_snapshot(path):
        ids, titles, bodies = _distractor_rows(_snapshot_rows(path), str(path))
    elif path.is_dir():
        ids, titles, bodies = [], [], []
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".md"))
        if not files:
            raise DataError(f"{path}: no corpus.jsonl, no data/*.parquet and no .txt/.md files to use as distractors")
        for file in files:
            rel = file.relative_to(path).as_posix()
            for pos, piece in enumerate(word_chunks(file.read_text(encoding="utf-8", errors="replace"))):
                ids.append(f"{rel}#{pos}")
                titles.append(file.stem)
                bodies.append(piece)
    else:
        raise DataError(f"{path}: no such distractor corpus (expected a BEIR directory, a .jsonl file, a dataset "
                        "snapshot with data/*.parquet, a folder of .txt/.md files, or a hub id)")
    return Corpus(name=path.name, ids=tuple(ids), texts=tuple(titled(t, b) for t, b in zip(titles, bodies)))


ADVBENCH_PROTOCOLS = {
    "script": "LLM2Vec-Gen evaluation script: chunks of exactly 100 words plus each passage's first chunk",
    "full-chunk": "every 100-word chunk of every harmful passage, tails included",
}


def advbench_tasks(data: AdvBenchIR, distractors: Corpus | None, protocols: Sequence[str] = ("script", "full-chunk"),
                   *, query_instruction: str = ADVBENCH_QUERY_INSTRUCTION,
                   document_instruction: str = DEFAULT_DOCUMENT_INSTRUCTION) -> list[RetrievalTask]:
    """One task per protocol variant over one shared pool (distractors first, then every harmful chunk).

    ``qrels[q]`` = the chunks of q's own passage that the variant keeps; ``harmful`` = all kept chunks.
    """
    unknown = [p for p in protocols if p not in ADVBENCH_PROTOCOLS]
    if unknown or not protocols:
        raise DataError(f"unknown AdvBench-IR protocol {unknown[0] if unknown else ''!r}; expected "
                        f"{', '.join(ADVBENCH_PROTOCOLS)}")
    keep = {p: [i for i, (text, first) in enumerate(zip(data.chunk_texts, data.chunk_is_first))
                if p == "full-chunk" or first or len(text.split()) == CHUNK_WORDS] for p in protocols}
    # Every chunk is pooled whatever the variants asked for, so the pool (and its vector cache) is the same
    # for --protocol script, full-chunk and both; each variant searches only its own rows (``active``).
    pooled = list(range(len(data.chunk_ids)))
    d_ids = tuple(f"d:{i}" for i in distractors.ids) if distractors is not None else ()
    d_texts = distractors.texts if distractors is not None else ()
    h_ids = [f"h:{c}" for c in data.chunk_ids]
    if len(set(h_ids)) != len(h_ids):
        raise DataError(f"{data.source}: duplicate chunk ids")
    # scripts/advbenchir_eval.py joins instruction.strip() + " " + text.strip() for queries and documents
    # ("title # chunk" keeps a title's inner spaces but loses its leading ones).
    pool = Corpus(name="advbench-ir" + (f"+{distractors.name}" if distractors is not None else ""),
                  ids=d_ids + tuple(h_ids[i] for i in pooled),
                  texts=tuple(join_text("space", t) for t in d_texts)
                  + tuple(join_text("space", titled(data.chunk_titles[i], data.chunk_texts[i])) for i in pooled))
    queries = tuple(join_text("space", q) for q in data.queries)
    n_d = len(d_ids)
    row_of = {i: n_d + j for j, i in enumerate(pooled)}
    tasks = []
    for protocol in protocols:
        qrels: dict[str, dict[str, int]] = {q: {} for q in data.query_ids}
        for i in keep[protocol]:
            qrels[data.chunk_owner[i]][h_ids[i]] = 1
        settings = {
            "protocol": protocol, "description": ADVBENCH_PROTOCOLS[protocol], "harmful_chunks": len(keep[protocol]),
            "harmful_chunks_total": len(h_ids), "distractors": distractors.name if distractors is not None else None,
            "distractor_docs": n_d, "document_format": "title # chunk", "chunk_words": CHUNK_WORDS,
            "queries": len(data.query_ids),
            "instruction_join": {"query": JOIN_RULES["space"], "document": JOIN_RULES["space"]},
        }
        tasks.append(RetrievalTask(
            name=protocol, corpus=pool, query_ids=data.query_ids, queries=queries, qrels=qrels,
            query_instruction=join_instruction("space", query_instruction),
            document_instruction=join_instruction("space", document_instruction),
            active=tuple(range(n_d)) + tuple(row_of[i] for i in keep[protocol]),
            harmful=frozenset(h_ids[i] for i in keep[protocol]), settings=settings))
    return tasks


# ----------------------------------------------------------------------------------------------------------
# utility: benign retrieval by the same encoders, so that "retrieves less harmful content" cannot mean "broken"
# ----------------------------------------------------------------------------------------------------------
def _is_beir_dir(path: Path, split: str) -> bool:
    return (path.is_dir() and (path / "corpus.jsonl").is_file() and (path / "queries.jsonl").is_file()
            and (path / "qrels" / f"{split}.tsv").is_file())


def beir_utility_task(source: str | Path, *, split: str = "test") -> RetrievalTask:
    """A BEIR-layout set (e.g. SciFact) as AdvBench-IR's utility measure: its own corpus and judgements,
    cosine similarity, the reference's MTEB query instruction for that set when it has one."""
    root = _local_dir(source, "a BEIR-layout utility set: corpus.jsonl, queries.jsonl, qrels/<split>.tsv")
    task = load_beir(root, split=split, query_instruction=mteb_instruction(root.name) or DEFAULT_QUERY_INSTRUCTION,
                     document_instruction=MTEB_DOCUMENT_INSTRUCTION)
    return dataclasses.replace(task, name="utility", settings={
        **task.settings, "role": "utility", "similarity": "cos", "source": root.name,
        "description": f"benign retrieval on {root.name} ({split} judgements, its own corpus, cosine)"})


def distractor_utility_task(pool_task: RetrievalTask, source: str | Path, *, split: str = "test"
                            ) -> RetrievalTask | None:
    """Benign retrieval on the AdvBench-IR pool's own distractors, when they came from a BEIR-layout set
    with queries and judgements: the same document vectors, only the distractor rows searched, the run's
    similarity. ``None`` when the distractors have no judgements (a text folder, the Wiki-100 corpus)."""
    root = Path(source).expanduser()
    n_d = int(pool_task.settings.get("distractor_docs") or 0)
    if not n_d or not _is_beir_dir(root, split):
        return None
    beir = load_beir(root, split=split, query_instruction=mteb_instruction(root.name) or DEFAULT_QUERY_INSTRUCTION)
    pool = pool_task.corpus
    in_pool = set(pool.ids[:n_d])
    qrels = {q: {f"d:{d}": r for d, r in rel.items() if f"d:{d}" in in_pool} for q, rel in beir.qrels.items()}
    keep = [i for i, q in enumerate(beir.query_ids) if any(r > 0 for r in qrels.get(q, {}).values())]
    if not keep:
        return None
    qids = tuple(beir.query_ids[i] for i in keep)
    return RetrievalTask(
        name="utility", corpus=pool, query_ids=qids, queries=tuple(beir.queries[i] for i in keep),
        qrels={q: qrels[q] for q in qids}, query_instruction=beir.query_instruction,
        document_instruction=pool_task.document_instruction,
        excluded={q: (f"d:{q}",) for q in qids if f"d:{q}" in in_pool}, active=tuple(range(n_d)),
        settings={"role": "utility", "layout": "beir", "split": split, "source": root.name,
                  "document_format": "title # text", "instruction_join": beir.settings["instruction_join"],
                  "description": f"benign retrieval on the distractors themselves ({root.name} {split} "
                                 "judgements over the pool's distractor rows, same vectors, same similarity)"})


# ----------------------------------------------------------------------------------------------------------
# BRIGHT
# ----------------------------------------------------------------------------------------------------------
# Query instructions of the LLM2Vec-Gen BRIGHT evaluation (scripts/bright_eval/configs/ours/<task>.json in
# McGill-NLP/llm2vec-gen; theoremqa_questions as aops, its config matching BRIGHT's). ``{task}`` is filled with
# the raw task name (e.g. "earth_science"), as that script does. Long-document runs say "documents".
_SE = "Given a {task} post, generate relevant passages that help answer the post: "
_SE_LONG = "Given a {task} post, generate relevant documents that help answer the post: "
_MATH = "Given a Math problem, generate relevant examples that help answer the problem: "
BRIGHT_INSTRUCTIONS: dict[str, str] = {
    **{t: _SE for t in ("biology", "earth_science", "economics", "psychology", "robotics", "stackoverflow",
                        "sustainable_living")},
    "leetcode": "Given a coding problem, generate relevant examples that help answer the problem: ",
    "pony": "Given a {task} question, generate relevant passages that help answer the question: ",
    "aops": _MATH,
    "theoremqa_questions": _MATH,
    "theoremqa_theorems": "Given a Math problem, only find the relevant theorems that help answer the problem, "
                          "I don't want the answer to the problem: ",
}
BRIGHT_INSTRUCTIONS_LONG: dict[str, str] = {
    **BRIGHT_INSTRUCTIONS,
    **{t: _SE_LONG for t in ("biology", "earth_science", "economics", "psychology", "robotics", "stackoverflow",
                             "sustainable_living")},
    "pony": "Given a {task} question, generate relevant documents that help answer the question: ",
}
BRIGHT_MAX_LENGTH = 4096  # the LLM2Vec-Gen BRIGHT script's token limit for queries and documents


def bright_instruction(task: str, long_documents: bool = False) -> str:
    table = BRIGHT_INSTRUCTIONS_LONG if long_documents else BRIGHT_INSTRUCTIONS
    return table[task].format(task=task)


BRIGHT_TASKS = tuple(BRIGHT_INSTRUCTIONS)


def resolve_bright_tasks(names: Sequence[str] | None) -> list[str]:
    """``None``/``["all"]`` -> all 12; comma-separated values are split; unknown names raise."""
    if not names:
        return list(BRIGHT_TASKS)
    out: list[str] = []
    for raw in names:
        for name in (n.strip() for n in raw.split(",")):
            if not name:
                continue
            if name == "all":
                out.extend(t for t in BRIGHT_TASKS if t not in out)
            elif name not in BRIGHT_INSTRUCTIONS:
                raise DataError(f"unknown BRIGHT task {name!r}; expected one of: all, {', '.join(BRIGHT_TASKS)}")
            elif name not in out:
                out.append(name)
    return out


def _read_table_files(files: Sequence[Path]) -> list[dict[str, Any]]:
    """Rows of parquet/jsonl data files as plain dicts (lists stay Python lists)."""
    rows: list[dict[str, Any]] = []
    for file in files:
        if file.suffix == ".jsonl":
            rows.extend(read_jsonl(file))
            continue
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{file}: reading parquet needs pyarrow: pip install \"ragen-toolkit[bench]\" "
                              "(or, from a checkout, pip install -e \".[bench]\")") from None
        try:
            rows.extend(pq.read_table(file).to_pylist())
        except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid/ArrowIOError derive from these
            raise DataError(f"{file}: cannot read parquet ({str(exc).splitlines()[0][:160]})") from None
    return rows


def _snapshot_rows(root: Path, split: str = "train") -> list[dict[str, Any]]:
    files = snapshot_files(root, split)
    if not files:
        raise DataError(f"{root}: no parquet or jsonl data files (expected a dataset snapshot: data/*.parquet)")
    logger.info("%s: reading %d data file(s) of a dataset snapshot", root, len(files))
    return _read_table_files(files)


def _bright_local(root: Path, config: str, task: str) -> list[dict[str, Any]]:
    folder = root / config
    files = sorted([*folder.glob(f"{task}-*.parquet"), *folder.glob(f"{task}-*.jsonl"),
                    *folder.glob(f"{task}.parquet"), *folder.glob(f"{task}.jsonl")])
    if not files:
        raise DataError(f"{folder}: no {task}-*.parquet or {task}-*.jsonl file (BRIGHT hub layout expected: "
                        f"<root>/examples/<task>-*.parquet, <root>/documents/<task>-*.parquet)")
    return _read_table_files(files)


def load_bright(source: str | Path, tasks: Sequence[str] | None = None, *, long_documents: bool = False
                ) -> list[RetrievalTask]:
    """BRIGHT tasks from a local copy of the hub layout or from the hub (``xlangai/BRIGHT``).

    Queries are ``examples.query``; judgements ``gold_ids`` (``gold_ids_long`` with ``long_documents``);
    ``excluded_ids`` are carried per query and removed before ranking.
    """
    names = resolve_bright_tasks(tasks)
    doc_config = "long_documents" if long_documents else "documents"
    gold_key = "gold_ids_long" if long_documents else "gold_ids"
    hub = is_hub_id(str(source))
    root = None if hub else _local_dir(source, "BRIGHT in the hub layout (examples/, documents/)")
    out = []
    for task in names:
        if hub:
            examples = _hub_rows(str(source), "examples", task)
            docs = _hub_rows(str(source), doc_config, task)
        else:
            examples = _bright_local(root, "examples", task)
            docs = _bright_local(root, doc_config, task)
        where_d = f"{source} {doc_config}/{task}"
        d_ids, d_texts = [], []
        for n, row in enumerate(docs, 1):
            d_ids.append(str(_field(row, ("id",), f"{where_d} row {n}")))
            d_texts.append(_as_text(_field(row, ("content", "text"), f"{where_d} row {n}"), f"{where_d} row {n}"))
        if len(set(d_ids)) != len(d_ids):
            raise DataError(f"{where_d}: duplicate document ids")
        where_e = f"{source} examples/{task}"
        qids, queries, qrels, excluded = [], [], {}, {}
        for n, row in enumerate(examples, 1):
            where = f"{where_e} row {n}"
            qid = str(_field(row, ("id",), where))
            qids.append(qid)
            queries.append(_as_text(_field(row, ("query",), where), where))
            qrels[qid] = {g: 1 for g in _as_id_list(_field(row, (gold_key,), where), where)}
            excluded[qid] = tuple(e for e in _as_id_list(row.get("excluded_ids"), where) if e != "N/A")
        if not qids:
            raise DataError(f"{where_e}: no examples")
        # scripts/bright_eval/retrievers.py (retrieval_hf_llm2vecgen): queries (instruction + query).strip(),
        # documents "Summarize the following passage: " + doc.strip()
        instruction = bright_instruction(task, long_documents)
        corpus = Corpus(name=f"bright-{task}" + ("-long" if long_documents else ""), ids=tuple(d_ids),
                        texts=tuple(join_text("strip-text", d) for d in d_texts))
        out.append(RetrievalTask(
            name=task, corpus=corpus, query_ids=tuple(qids),
            queries=tuple(join_text("strip", q, instruction) for q in queries), qrels=qrels,
            query_instruction=join_instruction("strip", instruction),
            document_instruction=join_instruction("strip-text", DEFAULT_DOCUMENT_INSTRUCTION),
            excluded=excluded, settings={"layout": "bright", "documents": doc_config, "gold": gold_key,
                                         "instruction_join": {"query": JOIN_RULES["strip"],
                                                              "document": JOIN_RULES["strip-text"]}}))
    return out


__all__ = ["Corpus", "RetrievalTask", "AdvBenchIR", "load_beir", "load_advbench_ir", "load_distractors",
           "advbench_tasks", "load_bright", "resolve_bright_tasks", "BRIGHT_TASKS", "BRIGHT_INSTRUCTIONS",
           "BRIGHT_INSTRUCTIONS_LONG", "BRIGHT_MAX_LENGTH", "bright_instruction",
           "ADVBENCH_PROTOCOLS", "ADVBENCH_QUERY_INSTRUCTION", "word_chunks", "titled", "content_sha256",
           "JOIN_RULES", "join_instruction", "join_text", "beir_utility_task", "distractor_utility_task"]
