"""Walk a folder, read the files ragen understands, and cut their text into overlapping chunks.

Supported: plain text and markup (.txt, .md, .rst, ...), HTML (main content by trafilatura, code blocks
verbatim), PDF (pypdfium2), both through :mod:`ragen.extract`; source code and config files, and the string
fields of .json / .jsonl. Everything else is skipped with a counted reason, never silently. Symbolic links
are followed only when they stay inside the root, and files are opened race-free: never through a symlink,
and only when the opened descriptor is the file the scan found (:func:`read_bytes_safely`). Which files are taken: :class:`FileSelection` (globs, ``.gitignore``,
a size cap).

Offsets (``Chunk.start``/``Chunk.end``) index into the *extracted* text of a file: the decoded file for
text formats, the extracted main content for HTML, the page texts joined by blank lines for PDF, the string
fields joined by newlines for JSON. ``text[start:end] == chunk.text`` always holds for that text.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError
from .extract import ExtractionError, html_to_text, pdf_to_text
from .types import Chunk

logger = logging.getLogger(__name__)

# Character chunking (--chunk-unit chars): ~1000 characters is ~200-300 tokens of English prose, but more for
# code, numbers or non-Latin scripts. The default unit is the encoder's tokens (ragen.retriever.resolve_chunking).
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


CHUNK_UNITS = ("tokens", "chars")


def default_token_overlap(chunk_size: int) -> int:
    """The overlap for token chunks when none is given: a fifth of the chunk, like 200 of 1000 characters."""
    return chunk_size // 5


@dataclass(frozen=True)
class ChunkingConfig:
    """Windows of ``chunk_size`` units that overlap by ``chunk_overlap``, cut at natural boundaries.

    ``unit``: ``"chars"`` (characters; :func:`chunk_spans`' own boundary search) or ``"tokens"`` (the
    encoder's tokens, by semantic-text-splitter, which needs the encoder's tokenizer: :func:`token_splitter`).
    """

    chunk_size: int = DEFAULT_CHUNK_SIZE
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP
    unit: str = "chars"

    def __post_init__(self) -> None:
        if self.unit not in CHUNK_UNITS:
            raise DataError(f"chunk unit {self.unit!r}: expected tokens or chars")
        least = 16 if self.unit == "chars" else 8
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < least:
            raise DataError(f"chunk size must be at least {least} {'characters' if self.unit == 'chars' else 'tokens'}, "
                            f"got {self.chunk_size}")
        # a chunk may end as early as half its window, so an overlap of half or more could stall the walk
        if not 0 <= self.chunk_overlap < self.chunk_size // 2:
            raise DataError(f"chunk overlap must be at least 0 and less than half the chunk size "
                            f"({self.chunk_size // 2}), got {self.chunk_overlap}")

    def to_dict(self) -> dict:
        method = "chars/1" if self.unit == "chars" else "tokens/semantic-text-splitter/1"
        return {"method": method, "unit": self.unit, "chunk_size": self.chunk_size, "chunk_overlap": self.chunk_overlap}


def token_splitter(config: ChunkingConfig, tokenizer):
    """A semantic-text-splitter ``TextSplitter`` cutting at most ``config.chunk_size`` tokens of ``tokenizer``
    (a ``tokenizers.Tokenizer``) per chunk, ``config.chunk_overlap`` tokens of overlap; pass it to
    :func:`chunk_spans`/:func:`chunk_document`."""
    try:
        from semantic_text_splitter import TextSplitter
    except ImportError:  # a core dependency; only a broken install gets here
        raise ImportError("token chunking needs semantic-text-splitter: pip install semantic-text-splitter") from None
    return TextSplitter.from_huggingface_tokenizer(tokenizer, config.chunk_size, overlap=config.chunk_overlap, trim=True)


@dataclass(frozen=True)
class SourceFile:
    """A file found under the root: ``relpath`` uses ``/`` separators on every platform.

    ``path`` is the real path to open (for a symlink inside the root: its target). ``root`` is the real
    root the file was found under; :func:`read_document` refuses a file whose opened descriptor is not
    ``path`` any more (a file or folder swapped for a symlink after the scan). A name that is not valid
    UTF-8 gets a ``relpath`` with ``\\xNN`` escapes (``caf\\xe9.txt``); ``path`` keeps the real bytes.
    """

    relpath: str
    path: Path
    size: int
    mtime_ns: int
    root: Path | None = None


@dataclass(frozen=True)
class Document:
    """The extracted text of one file; ``replaced`` says undecodable bytes were replaced with U+FFFD.
    ``sha256``: of the bytes read; ``read_ns``: the wall-clock time just before they were read (together
    they let a later run tell an edit that kept the size and mtime, see :func:`stat_verdict`)."""

    source: SourceFile
    text: str
    replaced: bool = False
    sha256: str | None = None
    read_ns: int | None = None


DEFAULT_MAX_FILE_SIZE = 50 * 1024 * 1024  # 50 MiB: a large PDF or log, not a dataset dump


@dataclass(frozen=True)
class FileSelection:
    """Which files :func:`scan` takes.

    ``include``/``exclude``: gitignore-style globs matched against the path relative to the root
    (``*.md``, ``docs/**``, ``benchmarks/*/report.json``); with ``include``, only matching files are taken;
    an ``exclude`` match (file or folder) is skipped. ``gitignore``: inside a git repository, honour its
    ``.gitignore`` files. ``max_file_size``: bytes; larger files are skipped and counted (0: no limit).
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    gitignore: bool = True
    max_file_size: int = DEFAULT_MAX_FILE_SIZE

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.max_file_size < 0:
            raise DataError(f"max file size must be >= 0 bytes (0: no limit), got {self.max_file_size}")
        for pattern in self.include + self.exclude:
            if not isinstance(pattern, str) or not pattern.strip():
                raise DataError(f"file pattern {pattern!r}: expected a non-empty glob such as '*.md'")
        _glob_spec(self.include)
        _glob_spec(self.exclude)

    def to_dict(self) -> dict:
        return {"include": list(self.include), "exclude": list(self.exclude), "gitignore": self.gitignore,
                "max_file_size": self.max_file_size}

    @classmethod
    def from_dict(cls, data: object) -> FileSelection:
        """The selection recorded in a manifest; the defaults for anything missing or malformed."""
        if not isinstance(data, dict):
            return cls()
        def strings(value) -> tuple[str, ...]:
            return tuple(v for v in value if isinstance(v, str) and v.strip()) if isinstance(value, list) else ()
        size = data.get("max_file_size")
        try:
            return cls(include=strings(data.get("include")), exclude=strings(data.get("exclude")),
                       gitignore=data.get("gitignore") if isinstance(data.get("gitignore"), bool) else True,
                       max_file_size=size if isinstance(size, int) and not isinstance(size, bool) and size >= 0
                       else DEFAULT_MAX_FILE_SIZE)
        except DataError:  # a hand-edited pattern that is not a glob
            return cls()


def parse_size(text: str) -> int:
    """``"50MB"``, ``"2G"``, ``"800k"``, ``"1234"`` (bytes), ``"0"`` (no limit) -> bytes (powers of 1024)."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", str(text), flags=re.IGNORECASE)
    if not m or len(str(text)) > 40:
        raise DataError(f"size {text!r}: expected a number of bytes with an optional unit, e.g. 50MB, 800k, 2G")
    scale = 1024 ** "bkmgt".index((m.group(2) or "b").lower())
    return int(float(m.group(1)) * scale)


def format_size(n: int) -> str:
    for unit, scale in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _glob_spec(patterns: tuple[str, ...]):
    if not patterns:
        return None
    import pathspec

    try:
        return pathspec.GitIgnoreSpec.from_lines(patterns)
    except (ValueError, TypeError) as exc:  # pathspec raises GitWildMatchPatternError (a ValueError)
        raise DataError(f"file pattern: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None


@dataclass
class ScanReport:
    """What the walk found: files to read and, per reason, how many were skipped (with examples).

    ``skipped`` counts files per reason and ``skipped_files`` names every one of them;
    ``folders_skipped`` counts folders that were not entered (hidden, dependency caches, excluded,
    unreadable, symlinked), with their names in ``skipped_folders``.
    """

    files: list[SourceFile] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    folders_skipped: Counter = field(default_factory=Counter)
    skipped_folders: list[tuple[str, str]] = field(default_factory=list)

    def skip(self, reason: str, relpath: str) -> None:
        self.skipped[reason] += 1
        self.skipped_files.append((relpath, reason))
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(relpath)

    def skip_folder(self, reason: str, relpath: str) -> None:
        self.folders_skipped[reason] += 1
        self.skipped_folders.append((relpath, reason))

    @property
    def files_skipped(self) -> int:
        return sum(self.skipped.values())


def is_supported(path: Path) -> bool:
    return path.suffix.lower() in SUPPORTED or path.name in KNOWN_NAMES


def display_name(name: str) -> str:
    """A file name as ragen records it: the name itself when it is valid UTF-8, else with ``\\xNN`` escapes
    for the bytes that are not (``os.fsdecode`` turned them into lone surrogates)."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _git_root(start: Path) -> Path | None:
    for d in (start, *start.parents):
        if (d / ".git").exists():
            return d
    return None


class _GitIgnores:
    """The ``.gitignore`` files of a repository that apply under the scanned root (nearest one wins)."""

    def __init__(self, repo: Path, root: Path) -> None:
        self.specs: dict[Path, object] = {}
        self.repo = repo
        for d in reversed((root, *root.parents)):  # the repository's folders above the root, top first
            if d == repo or d.is_relative_to(repo):
                self.load(d)

    def load(self, directory: Path) -> None:
        import pathspec

        try:
            with open(directory / ".gitignore", "rb") as f:
                lines = f.read(1024 * 1024).decode("utf-8", "replace").splitlines()
        except OSError:
            return
        try:
            self.specs[directory] = pathspec.GitIgnoreSpec.from_lines(lines)
        except (ValueError, TypeError) as exc:
            logger.warning("%s: ignored (%s)", directory / ".gitignore", exc)

    def ignored(self, full: Path, is_dir: bool) -> bool:
        verdict = None
        for d in (full.parent, *full.parent.parents):  # nearest .gitignore first
            spec = self.specs.get(d)
            if spec is not None:
                rel = full.relative_to(d).as_posix() + ("/" if is_dir else "")
                result = spec.check_file(rel)
                if result.include is not None:
                    verdict = result.include
                    break
            if d == self.repo:
                break
        return bool(verdict)


def scan(root: str | Path, *, exclude: tuple[Path, ...] = (), selection: FileSelection | None = None) -> ScanReport:
    """List the supported files under ``root`` (sorted by relative path; deterministic).

    Hidden directories (``.git``, ``.venv``, ...) and :data:`SKIP_DIRS` are not entered (counted in
    ``folders_skipped``); directories in ``exclude`` (e.g. the index being written, when it lies inside the
    root) are not entered either, and a root that *is* one of them is refused. Symlinks to files are
    followed only when their target lies inside the root; symlinked directories are never entered (no
    loops, no escaping the root). Only regular files are taken: FIFOs, sockets and devices are skipped and
    counted. The walk uses an explicit stack (any depth), and a folder that cannot be listed is counted,
    never fatal. ``selection``: include/exclude globs, ``.gitignore``, the size cap.
    """
    selection = selection or FileSelection()
    root_path = Path(root).expanduser()
    try:
        root_st = os.stat(root_path)
    except FileNotFoundError:
        raise DataError(f"{root}: no such file or directory") from None
    except OSError as exc:
        raise DataError(f"{root}: cannot be read ({exc.strerror or exc})") from None
    root_real = root_path.resolve()
    report = ScanReport()
    if not stat.S_ISDIR(root_st.st_mode):
        name = display_name(root_path.name)
        if not stat.S_ISREG(root_st.st_mode):
            report.skip("not a regular file (FIFO, socket or device)", name)
        elif not is_supported(root_path):
            report.skip("unsupported type", name)
        elif selection.max_file_size and root_st.st_size > selection.max_file_size:
            report.skip(f"larger than --max-file-size ({format_size(selection.max_file_size)})", name)
        else:
            report.files.append(SourceFile(name, root_real, root_st.st_size, root_st.st_mtime_ns, root_real.parent))
        return report
    excluded = {Path(p).expanduser().resolve() for p in exclude}
    if root_real in excluded:
        raise DataError(f"{root}: is the index folder itself; index a folder that does not hold the index, "
                        "or pass another --index")
    includes, excludes = _glob_spec(selection.include), _glob_spec(selection.exclude)
    repo = _git_root(root_real) if selection.gitignore else None
    gitignores = _GitIgnores(repo, root_real) if repo is not None else None
    seen: set[str] = set()

    stack: list[tuple[Path, str]] = [(root_real, "")]  # (real folder, its relpath); no recursion, any depth
    while stack:
        here, here_rel = stack.pop()
        try:
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            report.skip_folder(f"unreadable folder ({exc.strerror or exc})", here_rel or ".")
            continue
        if gitignores is not None and here != root_real:
            gitignores.load(here)
        subdirs = []
        for entry in entries:
            name = entry.name
            rel = f"{here_rel}/{display_name(name)}" if here_rel else display_name(name)
            full = here / name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                report.skip(f"unreadable ({exc.strerror or exc})", rel)
                continue
            if stat.S_ISDIR(st.st_mode):
                if name.startswith("."):
                    report.skip_folder("hidden folder", rel)
                elif name in SKIP_DIRS:
                    report.skip_folder("dependency or cache folder", rel)
                elif full in excluded:
                    report.skip_folder("the index folder", rel)
                elif excludes is not None and excludes.match_file(rel + "/"):
                    report.skip_folder("matches --exclude", rel)
                elif gitignores is not None and gitignores.ignored(full, True):
                    report.skip_folder("ignored by .gitignore", rel)
                else:
                    subdirs.append((full, rel))
                continue
            if name.startswith("."):
                report.skip("hidden file", rel)
                continue
            target = full
            if stat.S_ISLNK(st.st_mode):
                if full in excluded:
                    continue
                try:
                    target = Path(os.path.realpath(full))
                    st = os.stat(full)  # ELOOP for a loop, ENOENT for a dangling link
                except OSError:  # dangling, or a loop (ELOOP)
                    report.skip("broken or non-file symlink", rel)
                    continue
                if stat.S_ISDIR(st.st_mode):
                    report.skip("symlinked directory (not followed)", rel)
                    continue
                if not target.is_relative_to(root_real):
                    report.skip("symlink pointing outside the root", rel)
                    continue
                if any(target.is_relative_to(e) for e in excluded):
                    report.skip("symlink into the index folder", rel)
                    continue
                if not stat.S_ISREG(st.st_mode):
                    report.skip("broken or non-file symlink", rel)
                    continue
            if not stat.S_ISREG(st.st_mode):
                report.skip("not a regular file (FIFO, socket or device)", rel)
                continue
            if excludes is not None and excludes.match_file(rel):
                report.skip("matches --exclude", rel)
                continue
            if includes is not None and not includes.match_file(rel):
                report.skip("does not match --include", rel)
                continue
            if gitignores is not None and gitignores.ignored(full, False):
                report.skip("ignored by .gitignore", rel)
                continue
            if not is_supported(full):
                report.skip("unsupported type", rel)
                continue
            if selection.max_file_size and st.st_size > selection.max_file_size:
                report.skip(f"larger than --max-file-size ({format_size(selection.max_file_size)})", rel)
                continue
            if rel in seen:  # an escaped non-UTF-8 name equal to a real one
                report.skip("name clashes with another file's escaped name", rel)
                continue
            seen.add(rel)
            report.files.append(SourceFile(rel, target, st.st_size, st.st_mtime_ns, root_real))
        stack.extend(reversed(subdirs))
    report.files.sort(key=lambda f: f.relpath)
    return report


class SkipFile(Exception):
    """Raised by :func:`read_document` for a file that cannot be indexed; the message is the reason.

    ``sha256``/``read_ns`` are set when the reason comes from the file's bytes (binary, invalid JSON, a
    damaged PDF): such a skip holds until the file changes, so the index remembers it and does not read
    the file again. Other reasons (permissions, a symlink swap, the size cap) are not remembered: fixing
    them (``chmod``, a larger ``--max-file-size``) changes neither the size nor the mtime."""

    def __init__(self, reason: str, *, sha256: str | None = None, read_ns: int | None = None) -> None:
        super().__init__(reason)
        self.sha256 = sha256
        self.read_ns = read_ns

    @property
    def remembered(self) -> bool:
        return self.sha256 is not None


RACY_WINDOW_NS = 2_000_000_000  # coarser than every local filesystem's mtime (FAT: 2 s; ext4/APFS/NTFS: finer)


def stat_verdict(size: int, mtime_ns: int, read_ns: int | None, source: SourceFile) -> str:
    """Whether a file recorded with ``size``/``mtime_ns`` (read at wall-clock ``read_ns``) changed since.

    ``"changed"``: the size or mtime differs. ``"same"``: both equal and the mtime lies well before the
    read (an edit after the read would carry a later mtime). ``"racy"``: both equal but the mtime is
    within :data:`RACY_WINDOW_NS` of the read, so an edit in the same clock tick (or on a filesystem with
    coarse timestamps) could have kept both: only the content hash can tell (git's "racily clean" rule).
    A record without ``read_ns`` (written before ragen tracked it) trusts the stat."""
    if (size, mtime_ns) != (source.size, source.mtime_ns):
        return "changed"
    if read_ns is None or source.mtime_ns < read_ns - RACY_WINDOW_NS:
        return "same"
    return "racy"


def file_sha256(source: SourceFile, max_file_size: int = 0) -> tuple[str, int] | None:
    """``(sha256 of the bytes, wall-clock ns just before reading)``, or None when the file cannot be read."""
    started = time.time_ns()
    try:
        return hashlib.sha256(read_bytes_safely(source, max_file_size)).hexdigest(), started
    except SkipFile:
        return None


def _fd_path(fd: int) -> str | None:
    """The real path of an open descriptor (Linux: /proc; macOS: F_GETPATH), or None where unknown."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        pass
    try:
        import fcntl

        if hasattr(fcntl, "F_GETPATH"):
            raw = fcntl.fcntl(fd, fcntl.F_GETPATH, bytes(1024))
            return os.fsdecode(raw.split(b"\0", 1)[0])
    except OSError:
        pass
    return None


def read_bytes_safely(source: SourceFile, max_bytes: int = 0) -> bytes:
    """The bytes of ``source``, opened race-free: never through a symlink, only a regular file, and only
    the very file the scan found (the opened descriptor's real path must be ``source.path``). A file or
    folder swapped for a symlink after the scan, a FIFO or a device raises :class:`SkipFile`; so does a
    file larger than ``max_bytes`` (0: no limit)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(source.path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SkipFile("became a symlink after the scan (not followed)") from None
        raise SkipFile(f"unreadable ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SkipFile("not a regular file (FIFO, socket or device)")
        if source.root is not None:
            real = _fd_path(fd)
            if real is None:  # no way to name the descriptor: compare it with what the path names now
                now = os.stat(os.path.realpath(source.path))
                same = (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
                real = os.path.realpath(source.path) if same else ""
            if real != os.fspath(source.path) or not Path(real).is_relative_to(source.root):
                raise SkipFile("moved outside the indexed folder after the scan (symlink swap)")
        if max_bytes and st.st_size > max_bytes:
            raise SkipFile(f"larger than --max-file-size ({format_size(max_bytes)})")
        os.set_blocking(fd, True)
        parts, total = [], 0
        while True:
            block = os.read(fd, 1 << 20)
            if not block:
                break
            parts.append(block)
            total += len(block)
            if max_bytes and total > max_bytes:  # the file grew after fstat
                raise SkipFile(f"larger than --max-file-size ({format_size(max_bytes)})")
        return b"".join(parts)
    except OSError as exc:
        raise SkipFile(f"unreadable ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def read_document(source: SourceFile, *, max_file_size: int = DEFAULT_MAX_FILE_SIZE) -> Document:
    """Extract the text of a file. Raises :class:`SkipFile` (with a short reason) when it cannot.

    The file is opened race-free (see :func:`read_bytes_safely`) and read at most ``max_file_size`` bytes.
    """
    suffix = source.path.suffix.lower()
    started = time.time_ns()
    raw = read_bytes_safely(source, max_file_size)
    digest = hashlib.sha256(raw).hexdigest()
    try:
        text, replaced = _extract(raw, suffix, source)
    except SkipFile as why:  # decided by the bytes: holds until the file changes
        raise SkipFile(str(why), sha256=digest, read_ns=started) from None
    return Document(source, text, replaced, sha256=digest, read_ns=started)


def _extract(raw: bytes, suffix: str, source: SourceFile) -> tuple[str, bool]:
    if suffix in PDF_EXTENSIONS:
        try:
            return pdf_to_text(raw), False
        except ExtractionError as exc:  # corrupt, truncated, encrypted: skipped, counted and named
            why = str(exc).splitlines()[0][:120] if str(exc) else "no reason given"
            if "password" in why.lower():
                raise SkipFile("encrypted PDF (needs a password)") from None
            raise SkipFile(f"unreadable PDF ({why})") from None
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
    return text, replaced


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


def chunk_spans(text: str, config: ChunkingConfig = ChunkingConfig(), *, splitter=None) -> list[tuple[int, int]]:
    """``(start, end)`` spans of the chunks of ``text``; whitespace at either edge is trimmed off.

    Characters: a chunk ends at the last natural boundary in the second half of its window (a hard cut
    when there is none); the next one starts ``chunk_overlap`` characters before that end, moved forward to
    a word start, and always strictly after the previous start, so the walk terminates. Tokens: the spans
    semantic-text-splitter's ``splitter`` (:func:`token_splitter`) cuts, with their exact character offsets.
    """
    if config.unit == "tokens":
        if splitter is None:
            raise DataError("token chunking needs the encoder's tokenizer: pass splitter=token_splitter(config, tokenizer)")
        return _token_spans(text, splitter)
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


def _token_spans(text: str, splitter) -> list[tuple[int, int]]:
    spans, floor = [], 0
    for start, piece in splitter.chunk_indices(text):
        if not piece.strip():
            continue
        if text[start:start + len(piece)] != piece:  # offsets are characters; never trust them blindly
            start = text.find(piece, floor)
            if start < 0:
                raise DataError("token splitter returned a chunk that is not in the text")
        spans.append((start, start + len(piece)))
        floor = start
    return spans


def chunk_document(doc: Document, config: ChunkingConfig = ChunkingConfig(), *, splitter=None) -> list[Chunk]:
    """Chunks of one document with ids ``"<relpath>#<position>"`` and sha256 content hashes (``splitter``:
    :func:`token_splitter`, for token chunking)."""
    out = []
    for pos, (s, e) in enumerate(chunk_spans(doc.text, config, splitter=splitter)):
        piece = doc.text[s:e]
        out.append(Chunk(chunk_id=f"{doc.source.relpath}#{pos}", path=doc.source.relpath, position=pos,
                         text=piece, start=s, end=e, content_hash=content_hash(piece)))
    return out


__all__ = ["ChunkingConfig", "CHUNK_UNITS", "token_splitter", "default_token_overlap", "FileSelection", "DEFAULT_MAX_FILE_SIZE", "parse_size", "format_size", "display_name",
           "read_bytes_safely", "SourceFile", "Document", "ScanReport", "SkipFile", "scan", "read_document",
           "decode_bytes", "html_to_text", "json_strings", "chunk_spans", "chunk_document", "content_hash",
           "is_supported", "DEFAULT_CHUNK_SIZE", "DEFAULT_CHUNK_OVERLAP", "SUPPORTED"]
