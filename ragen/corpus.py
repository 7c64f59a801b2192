"""Walk a folder, read the files ragen understands, and cut their text into overlapping chunks.

Supported: plain text and markup (.txt, .md, .rst, ...), HTML (visible text only), PDF (pypdf), source
code and config files, and the string fields of .json / .jsonl. Everything else is skipped with a
counted reason, never silently. Symbolic links are followed only when they stay inside the root.

Offsets (``Chunk.start``/``Chunk.end``) index into the *extracted* text of a file: the decoded file for
text formats, the visible text for HTML, the page texts joined by blank lines for PDF, the string
fields joined by newlines for JSON. ``text[start:end] == chunk.text`` always holds for that text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from .errors import DataError
from .types import Chunk

logger = logging.getLogger(__name__)

# ~1000 characters is ~200-300 tokens of English prose: comfortably under LLM2Vec-Gen's 512-token input
# limit (with the instruction and the K special tokens), small enough that one chunk is about one thing.
DEFAULT_CHUNK_SIZE = 1000
DEFAULT_CHUNK_OVERLAP = 200

TEXT_EXTENSIONS = frozenset({
    ".txt", ".md", ".markdown", ".rst", ".adoc", ".org", ".tex", ".log", ".csv", ".tsv",
})
SOURCE_EXTENSIONS = frozenset({
    ".py", ".pyi", ".ipynb", ".js", ".mjs", ".cjs", ".ts", ".tsx", ".jsx", ".java", ".kt", ".kts", ".scala",
    ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".cu", ".go", ".rs", ".rb", ".php", ".cs", ".swift",
    ".m", ".mm", ".r", ".jl", ".lua", ".pl", ".pm", ".sh", ".bash", ".zsh", ".fish", ".ps1", ".sql",
    ".hs", ".ml", ".ex", ".exs", ".erl", ".clj", ".dart", ".vue", ".svelte", ".css", ".scss", ".less",
    ".xml", ".yaml", ".yml", ".toml", ".ini", ".cfg", ".conf", ".proto", ".graphql", ".cmake", ".gradle",
})
HTML_EXTENSIONS = frozenset({".html", ".htm", ".xhtml"})
JSON_EXTENSIONS = frozenset({".json", ".jsonl", ".ndjson"})
PDF_EXTENSIONS = frozenset({".pdf"})
KNOWN_NAMES = frozenset({"README", "LICENSE", "COPYING", "NOTICE", "AUTHORS", "CHANGELOG", "Makefile",
                         "Dockerfile", "CMakeLists.txt", "Justfile", "Procfile"})
# Directories nobody wants indexed: version control, caches, virtual environments, dependencies.
SKIP_DIRS = frozenset({"node_modules", "__pycache__", "venv", "site-packages"})

SUPPORTED = TEXT_EXTENSIONS | SOURCE_EXTENSIONS | HTML_EXTENSIONS | JSON_EXTENSIONS | PDF_EXTENSIONS
_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class ChunkingConfig:
    """Character windows of ``chunk_size`` that overlap by ``chunk_overlap``, cut at natural boundaries."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP

    def __post_init__(self) -> None:
        if self.chunk_size < 16:
            raise DataError(f"chunk size must be at least 16 characters, got {self.chunk_size}")
        # a chunk may end as early as half its window, so an overlap of half or more could stall the walk
        if not 0 <= self.chunk_overlap < self.chunk_size // 2:
            raise DataError(f"chunk overlap must be at least 0 and less than half the chunk size "
                            f"({self.chunk_size // 2}), got {self.chunk_overlap}")

    def to_dict(self) -> dict:
        return {"method": "chars/1", "chunk_size": self.chunk_size, "chunk_overlap": self.chunk_overlap}


@dataclass(frozen=True)
class SourceFile:
    """A file found under the root: ``relpath`` uses ``/`` separators on every platform."""

    relpath: str
    path: Path
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Document:
    """The extracted text of one file; ``replaced`` says undecodable bytes were replaced with U+FFFD."""

    source: SourceFile
    text: str
    replaced: bool = False


@dataclass
class ScanReport:
    """What the walk found: files to read and, per reason, how many were skipped (with examples)."""

    files: list[SourceFile] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, relpath: str) -> None:
        self.skipped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(relpath)

    @property
    def files_skipped(self) -> int:
        return sum(self.skipped.values())


def is_supported(path: Path) -> bool:
    return path.suffix.lower() in SUPPORTED or path.name in KNOWN_NAMES


def scan(root: str | Path, *, exclude: tuple[Path, ...] = ()) -> ScanReport:
    """List the supported files under ``root`` (sorted by relative path; deterministic).

    Hidden directories (``.git``, ``.venv``, ...) and :data:`SKIP_DIRS` are not entered; directories in
    ``exclude`` (e.g. the index being written, when it lies inside the root) are not entered either.
    Symlinks to files are followed only when their target lies inside the root; symlinked directories
    are never entered (no loops, no escaping the root).
    """
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise DataError(f"{root}: no such file or directory")
    root_real = root_path.resolve()
    report = ScanReport()
    if root_path.is_file():
        st = root_path.stat()
        if not is_supported(root_path):
            report.skip("unsupported type", root_path.name)
        else:
            report.files.append(SourceFile(root_path.name, root_real, st.st_size, st.st_mtime_ns))
        return report
    excluded = {p.resolve() for p in exclude}
    for dirpath, dirnames, filenames in os.walk(root_real, followlinks=False):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            full = here / d
            if d.startswith(".") or d in SKIP_DIRS or full in excluded:
                continue
            if full.is_symlink():
                report.skip("symlinked directory (not followed)", _rel(full, root_real))
                continue
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            full = here / name
            rel = _rel(full, root_real)
            if name.startswith("."):
                continue
            if full.is_symlink():
                target = full.resolve()
                if not target.is_relative_to(root_real):
                    report.skip("symlink pointing outside the root", rel)
                    continue
                if not target.is_file():
                    report.skip("broken or non-file symlink", rel)
                    continue
            if not is_supported(full):
                report.skip("unsupported type", rel)
                continue
            try:
                st = full.stat()
            except OSError:
                report.skip("unreadable", rel)
                continue
            report.files.append(SourceFile(rel, full, st.st_size, st.st_mtime_ns))
    report.files.sort(key=lambda f: f.relpath)
    return report


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


class SkipFile(Exception):
    """Raised by :func:`read_document` for a file that cannot be indexed; the message is the reason."""


def read_document(source: SourceFile) -> Document:
    """Extract the text of a file. Raises :class:`SkipFile` (with a short reason) when it cannot."""
    suffix = source.path.suffix.lower()
    try:
        if suffix in PDF_EXTENSIONS:
            return Document(source, _read_pdf(source.path))
        raw = source.path.read_bytes()
    except OSError as exc:
        raise SkipFile(f"unreadable ({exc.strerror or exc})") from None
    text, replaced = decode_bytes(raw)
    if suffix in HTML_EXTENSIONS:
        text = html_to_text(text)
    elif suffix == ".json":
        try:
            text = "\n".join(json_strings(json.loads(text)))
        except json.JSONDecodeError as exc:
            raise SkipFile(f"invalid JSON (line {exc.lineno}: {exc.msg})") from None
        except (ValueError, RecursionError) as exc:  # huge integers, absurd nesting
            raise SkipFile(f"unreadable JSON ({type(exc).__name__})") from None
    elif suffix in (".jsonl", ".ndjson"):
        text = _jsonl_text(text, source.relpath)
    # JSON escapes can produce lone surrogates ("\ud83d"), which no tokenizer or SQLite accepts: replace them
    # like undecodable bytes, so one odd file can never block the whole index.
    clean = text.encode("utf-8", "replace").decode("utf-8")
    if clean != text:
        text, replaced = clean, True
    return Document(source, text, replaced)


def decode_bytes(raw: bytes) -> tuple[str, bool]:
    """Decode file bytes: BOM-marked UTF-16/UTF-8, else UTF-8; bad bytes become U+FFFD.

    Raises :class:`SkipFile` for binary data (a NUL byte in the first 8 KiB of a non-UTF-16 file).
    """
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = raw.decode("utf-16", errors="replace")
        return text, "\ufffd" in text
    if b"\x00" in raw[:_SNIFF_BYTES]:
        raise SkipFile("binary content")
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


class _HTMLText(HTMLParser):
    _HIDDEN = frozenset({"script", "style", "noscript", "template", "svg", "head"})
    _BLOCK = frozenset({"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header",
                        "footer", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "hr", "dt", "dd",
                        "title", "main", "nav", "aside", "figure", "figcaption"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden = 0
        self.title: list[str] = []
        self.in_title = False

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "title":
            self.in_title = True
        elif tag in self._HIDDEN:
            self.hidden += 1
        if tag in self._BLOCK:
            self.parts.append("\n\n" if tag not in ("br", "li", "tr", "dt", "dd") else "\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self.in_title = False
        elif tag in self._HIDDEN and self.hidden:
            self.hidden -= 1
        if tag in self._BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title.append(data)
        elif not self.hidden:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Visible text of an HTML page: title first, scripts/styles dropped, blocks separated by blank lines."""
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    lines = [" ".join(line.split()) for line in "".join(parser.parts).splitlines()]
    body, blank = [], True
    for line in lines:  # collapse runs of blank lines into one paragraph break
        if line:
            body.append(line)
            blank = False
        elif not blank:
            body.append("")
            blank = True
    title = " ".join("".join(parser.title).split())
    text = "\n".join(body).strip()
    return f"{title}\n\n{text}" if title and not text.startswith(title) else text


def json_strings(value: object) -> Iterator[str]:
    """Every non-empty string value in a JSON document, depth first, in document order (keys excluded)."""
    if isinstance(value, str):
        if value.strip():
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from json_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from json_strings(v)


def _jsonl_text(text: str, relpath: str) -> str:
    records, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            records.append("\n".join(json_strings(json.loads(line))))
        except (ValueError, RecursionError):  # JSONDecodeError, huge integers, absurd nesting
            bad += 1
    if bad and not records:
        raise SkipFile("invalid JSON Lines (no line parses)")
    if bad:
        logger.warning("%s: skipped %d line(s) that are not valid JSON", relpath, bad)
    return "\n\n".join(r for r in records if r)


def _read_pdf(path: Path) -> str:
    try:
        from pypdf import PdfReader
    except ImportError:  # pragma: no cover - pypdf is a core dependency
        raise SkipFile("PDF support needs pypdf: pip install pypdf") from None
    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted and not reader.decrypt(""):
            raise SkipFile("encrypted PDF")
        pages = [(page.extract_text() or "").strip() for page in reader.pages]
    except SkipFile:
        raise
    except Exception as exc:  # noqa: BLE001 - a third-party parser on untrusted bytes fails in many ways
        # (PdfReadError, LimitReachedError, DependencyError for AES, RecursionError, IndexError ...); the file
        # is skipped, counted and named with the reason, never silently and never aborting the run.
        raise SkipFile(f"unreadable PDF ({type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''})") from None
    return "\n\n".join(p for p in pages if p)


# ----------------------------------------------------------------------------------------------------------
# chunking
# ----------------------------------------------------------------------------------------------------------
def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def _cut_point(text: str, start: int, limit: int, min_end: int) -> int:
    """The best end in ``(min_end, limit]``: paragraph break, then line break, sentence end, whitespace."""
    window = text[min_end:limit]
    for sep in ("\n\n", "\n", ". ", "? ", "! ", "; ", ", ", " ", "\t"):
        i = window.rfind(sep)
        if i >= 0:
            return min_end + i + len(sep)
    return limit


def chunk_spans(text: str, config: ChunkingConfig = ChunkingConfig()) -> list[tuple[int, int]]:
    """``(start, end)`` spans of the chunks of ``text``; whitespace at either edge is trimmed off.

    A chunk ends at the last natural boundary in the second half of its window (a hard cut when there
    is none); the next one starts ``chunk_overlap`` characters before that end, moved forward to a word
    start, and always strictly after the previous start, so the walk terminates.
    """
    spans: list[tuple[int, int]] = []
    n = len(text.rstrip())  # trailing whitespace is never chunk content: a window reaching it is the last one
    start = 0
    while start < n:
        while start < n and text[start].isspace():
            start += 1
        if start >= n:
            break
        limit = min(n, start + config.chunk_size)
        end = limit if limit == n else _cut_point(text, start, limit, start + config.chunk_size // 2)
        stop = end
        while stop > start and text[stop - 1].isspace():
            stop -= 1
        if stop > start:
            spans.append((start, stop))
        if end >= n:
            break
        nxt = max(end - config.chunk_overlap, start + 1)
        if config.chunk_overlap:
            # begin the overlap at a word boundary so no chunk starts in the middle of a word
            j = nxt
            while j < end and not text[j - 1].isspace():
                j += 1
            nxt = j if j < end else nxt
        start = nxt
    return spans


def chunk_document(doc: Document, config: ChunkingConfig = ChunkingConfig()) -> list[Chunk]:
    """Chunks of one document with ids ``"<relpath>#<position>"`` and sha256 content hashes."""
    out = []
    for pos, (s, e) in enumerate(chunk_spans(doc.text, config)):
        piece = doc.text[s:e]
        out.append(Chunk(chunk_id=f"{doc.source.relpath}#{pos}", path=doc.source.relpath, position=pos,
                         text=piece, start=s, end=e, content_hash=content_hash(piece)))
    return out


__all__ = ["ChunkingConfig", "SourceFile", "Document", "ScanReport", "SkipFile", "scan", "read_document",
           "decode_bytes", "html_to_text", "json_strings", "chunk_spans", "chunk_document", "content_hash",
           "is_supported", "DEFAULT_CHUNK_SIZE", "DEFAULT_CHUNK_OVERLAP", "SUPPORTED"]
