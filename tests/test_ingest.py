"""Streaming ingestion (issue 12): files are read, embedded and staged window by window, so a killed run
keeps what it extracted; unindexable files are remembered until they change; an edit that keeps the size
and mtime is still found (content hash when the mtime is too close to the last read)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import ragen.corpus as corpus
import ragen.ingest as ingest_mod
from ragen.retriever import build_index
from ragen.store import Store
from ragen.testing import count_rows
from tests._hash_encoder import HashEncoder

ROOT = Path(__file__).resolve().parents[1]
HOUR_NS = 3600 * 10**9


def _write(folder: Path, n: int, *, old: bool = True) -> None:
    folder.mkdir(exist_ok=True)
    for i in range(n):
        p = folder / f"doc{i:03d}.txt"
        p.write_text(f"document {i} talks about subject {i} and colour {i % 7}. " * 3)
        if old:  # written long before the index reads it: its mtime can be trusted
            st = p.stat()
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns - HOUR_NS))


class _Counting:
    """Counts what ingestion reads and hashes."""

    def __init__(self, monkeypatch) -> None:
        self.read: list[str] = []
        self.hashed: list[str] = []
        real_read, real_hash = ingest_mod.read_document, ingest_mod.file_sha256

        def read(sf, **kw):
            self.read.append(sf.relpath)
            return real_read(sf, **kw)

        def hashed(sf, *a):
            self.hashed.append(sf.relpath)
            return real_hash(sf, *a)

        monkeypatch.setattr(ingest_mod, "read_document", read)
        monkeypatch.setattr(ingest_mod, "file_sha256", hashed)


def _contents(idx: Path) -> tuple[list[tuple], dict[str, bytes]]:
    con = sqlite3.connect(idx / "chunks.sqlite")
    try:
        chunks = con.execute("SELECT chunk_id, path, position, start, end, content_hash, text FROM chunks "
                             "ORDER BY chunk_id").fetchall()
        vectors = dict(con.execute("SELECT content_hash, vector FROM vectors"))
        return chunks, vectors
    finally:
        con.close()


def _staged(idx: Path) -> int:
    return count_rows(idx / "chunks.sqlite", "staged_files")


_SLOW_BUILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import ragen.ingest
    from ragen.retriever import build_index
    from tests._hash_encoder import HashEncoder

    ragen.ingest.FLUSH_SECONDS = 0  # stage after every file
    class Slow(HashEncoder):
        def encode_documents(self, texts, batch_size=32, normalize=True):
            time.sleep(0.05)
            return super().encode_documents(texts, batch_size, normalize)
    build_index({docs!r}, {idx!r}, encoder=Slow(), batch_size=1)
""")


def test_kill_9_keeps_the_extracted_files_and_the_resume_reads_only_the_rest(tmp_path, monkeypatch):
    docs, idx = tmp_path / "docs", tmp_path / "idx"
    _write(docs, 80)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_BUILD.format(root=str(ROOT), docs=str(docs), idx=str(idx))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and _staged(idx) < 15:
        time.sleep(0.02)
    assert proc.poll() is None, "the build finished before it could be killed: " + proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    staged = _staged(idx)
    assert 15 <= staged < 80

    counting = _Counting(monkeypatch)
    encoder = HashEncoder()
    stats = build_index(docs, idx, encoder=encoder)
    assert len(counting.read) == 80 - staged  # the staged files are not extracted again
    assert not set(counting.read) & {f"doc{i:03d}.txt" for i in range(staged)}  # staged in scan order
    assert stats.files_resumed == staged and stats.files_changed == 80 and stats.files_indexed == 80
    assert _staged(idx) == 0  # the commit consumed the staging

    clean = tmp_path / "clean"
    build_index(docs, clean, encoder=HashEncoder())
    got, want = _contents(idx), _contents(clean)
    assert got[0] == want[0]  # the same chunks, ids and text
    assert got[1].keys() == want[1].keys()
    for h in want[1]:
        np.testing.assert_allclose(np.frombuffer(got[1][h], np.float32), np.frombuffer(want[1][h], np.float32),
                                   atol=1e-6)


def test_staged_files_that_changed_or_vanished_before_the_resume_are_not_taken(tmp_path, monkeypatch):
    docs, idx = tmp_path / "docs", tmp_path / "idx"
    _write(docs, 6)
    monkeypatch.setattr(ingest_mod, "FLUSH_SECONDS", 0)

    class Dies(HashEncoder):  # a run that dies after staging the first files (an exception, like a crash)
        def encode_documents(self, texts, batch_size=32, normalize=True):
            if any("document 4 " in t for t in texts):
                raise KeyboardInterrupt
            return super().encode_documents(texts, batch_size, normalize)

    with pytest.raises(KeyboardInterrupt):
        build_index(docs, idx, encoder=Dies(), batch_size=1)
    assert _staged(idx) == 4
    (docs / "doc001.txt").write_text("rewritten after the crash, about volcanoes")
    (docs / "doc002.txt").unlink()
    counting = _Counting(monkeypatch)
    stats = build_index(docs, idx, encoder=HashEncoder())
    assert sorted(counting.read) == ["doc001.txt", "doc004.txt", "doc005.txt"]
    assert stats.files_resumed == 2 and stats.files_indexed == 5
    with Store.open(idx) as store:
        paths = {p for p, *_ in store.files()}
        assert paths == {"doc000.txt", "doc001.txt", "doc003.txt", "doc004.txt", "doc005.txt"}
    chunks, _ = _contents(idx)
    assert [t for _, p, *_, t in chunks if p == "doc001.txt"] == ["rewritten after the crash, about volcanoes"]


def test_other_settings_start_the_staging_over(tmp_path, monkeypatch):
    docs, idx = tmp_path / "docs", tmp_path / "idx"
    _write(docs, 4)
    monkeypatch.setattr(ingest_mod, "FLUSH_SECONDS", 0)

    class Dies(HashEncoder):
        def encode_documents(self, texts, batch_size=32, normalize=True):
            if any("document 2 " in t for t in texts):
                raise KeyboardInterrupt
            return super().encode_documents(texts, batch_size, normalize)

    with pytest.raises(KeyboardInterrupt):
        build_index(docs, idx, encoder=Dies(), batch_size=1, chunk_unit="chars", chunk_size=1000, chunk_overlap=0)
    assert _staged(idx) == 2
    counting = _Counting(monkeypatch)
    build_index(docs, idx, encoder=HashEncoder(), chunk_unit="chars", chunk_size=60, chunk_overlap=0)
    assert len(counting.read) == 4  # chunks cut at another size mean nothing: every file is read again
    chunks, _ = _contents(idx)
    assert max(len(t) for *_, t in chunks) <= 60


def test_an_edit_that_keeps_size_and_mtime_is_found_by_its_hash(tmp_path, monkeypatch):
    docs, idx = tmp_path / "docs", tmp_path / "idx"
    docs.mkdir()
    a = docs / "a.txt"
    a.write_text("the cat sat on the mat")
    b = docs / "b.txt"
    b.write_text("an unrelated line about trains")
    os.utime(b, ns=(b.stat().st_atime_ns, b.stat().st_mtime_ns - HOUR_NS))  # old: trusted by its stat
    build_index(docs, idx, encoder=HashEncoder())
    st = a.stat()
    a.write_text("the dog sat on the rug")  # same size, then the same mtime: the stat cannot tell
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (a.stat().st_size, a.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)

    from ragen.cli.index import _up_to_date
    from ragen.corpus import FileSelection
    from ragen.retriever import scan_source

    assert _up_to_date(idx, scan_source(docs, idx), FileSelection()) is None  # the no-model check sees it too
    counting = _Counting(monkeypatch)
    stats = build_index(docs, idx, encoder=HashEncoder())
    assert counting.hashed == ["a.txt"] and counting.read == ["a.txt"]  # recent mtime: hashed, differs, re-read
    assert stats.files_changed == 1
    chunks, _ = _contents(idx)
    assert [t for _, p, *_, t in chunks if p == "a.txt"] == ["the dog sat on the rug"]


def test_a_recent_unchanged_file_is_hashed_until_its_mtime_is_old_enough_then_trusted(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "RACY_WINDOW_NS", 300_000_000)  # 0.3 s instead of 2 s, to keep the test short
    docs, idx = tmp_path / "docs", tmp_path / "idx"
    docs.mkdir()
    (docs / "a.txt").write_text("fresh text about rivers")
    first = build_index(docs, idx, encoder=HashEncoder())
    counting = _Counting(monkeypatch)
    time.sleep(0.4)
    second = build_index(docs, idx, encoder=HashEncoder())
    assert counting.hashed == ["a.txt"] and counting.read == []  # racy: hashed, equal, not re-read
    assert second.generation == first.generation and second.files_hashed == 1
    third = build_index(docs, idx, encoder=HashEncoder())  # the new read time is 0.4 s past the mtime
    assert counting.hashed == ["a.txt"] and third.files_hashed == 0


def test_old_unchanged_files_are_neither_read_nor_hashed(tmp_path, monkeypatch):
    docs, idx = tmp_path / "docs", tmp_path / "idx"
    _write(docs, 5)
    build_index(docs, idx, encoder=HashEncoder())
    counting = _Counting(monkeypatch)
    stats = build_index(docs, idx, encoder=HashEncoder())
    assert counting.read == [] and counting.hashed == [] and stats.chunks_embedded == 0


def test_unindexable_files_are_remembered_until_they_change(tmp_path, monkeypatch):
    docs, idx = tmp_path / "docs", tmp_path / "idx"
    _write(docs, 2)
    (docs / "bad.json").write_text("{not json")
    (docs / "blob.txt").write_bytes(b"\x00\x01\x02" * 200)
    for name in ("bad.json", "blob.txt"):
        st = (docs / name).stat()
        os.utime(docs / name, ns=(st.st_atime_ns, st.st_mtime_ns - HOUR_NS))
    first = build_index(docs, idx, encoder=HashEncoder())
    assert dict(first.skipped_files) == {"bad.json": "invalid JSON (line 1: Expecting property name enclosed in "
                                                     "double quotes)", "blob.txt": "binary content"}
    counting = _Counting(monkeypatch)
    second = build_index(docs, idx, encoder=HashEncoder())
    assert counting.read == []  # neither is read again...
    assert dict(second.skipped_files) == dict(first.skipped_files)  # ...and both are still reported

    from ragen.cli.index import _up_to_date
    from ragen.corpus import FileSelection
    from ragen.retriever import scan_source

    assert sorted(_up_to_date(idx, scan_source(docs, idx), FileSelection())) == sorted(first.skipped_files)
    assert counting.read == []

    (docs / "bad.json").write_text('{"title": "fixed now, about glaciers"}')
    third = build_index(docs, idx, encoder=HashEncoder())
    assert counting.read == ["bad.json"] and dict(third.skipped_files) == {"blob.txt": "binary content"}
    with Store.open(idx) as store:
        assert "bad.json" in {p for p, *_ in store.files()}
    con = sqlite3.connect(idx / "chunks.sqlite")
    assert [p for (p,) in con.execute("SELECT path FROM skipped_files")] == ["blob.txt"]  # forgotten once indexed
    con.close()


def test_size_cap_skips_are_not_remembered(tmp_path):
    """Raising --max-file-size changes neither the size nor the mtime: such a skip must be re-checked."""
    from ragen.corpus import FileSelection

    docs, idx = tmp_path / "docs", tmp_path / "idx"
    _write(docs, 1)
    (docs / "big.txt").write_text("words about oceans " * 200)
    small = build_index(docs, idx, encoder=HashEncoder(), selection=FileSelection(max_file_size=1000))
    assert "big.txt" in dict(small.skipped_files)
    large = build_index(docs, idx, encoder=HashEncoder(), selection=FileSelection(max_file_size=0))
    assert "big.txt" not in dict(large.skipped_files) and large.files_indexed == 2


def test_memory_is_bounded_by_the_window_not_the_corpus(tmp_path, monkeypatch):
    """Files are staged window by window: no call ever holds more than one window of texts."""
    docs, idx = tmp_path / "docs", tmp_path / "idx"
    _write(docs, 60)
    staged_sizes, embedded_sizes = [], []
    from ragen.store import StoreWriter

    real_stage = StoreWriter.stage

    def stage(self, files=(), *a, **kw):
        staged_sizes.append(sum(len(f.chunks) for f in files))
        return real_stage(self, files, *a, **kw)

    monkeypatch.setattr(StoreWriter, "stage", stage)
    real_run = ingest_mod._Embedder.run
    monkeypatch.setattr(ingest_mod._Embedder, "run", lambda self, todo, result: (embedded_sizes.append(len(todo)),
                                                                                 real_run(self, todo, result))[1])
    monkeypatch.setattr(ingest_mod, "WINDOW_BATCHES", 1)
    real_ingest = ingest_mod.ingest
    monkeypatch.setattr(ingest_mod, "ingest", lambda *a, **kw: real_ingest(*a, **{**kw, "window": 8}))
    stats = build_index(docs, idx, encoder=HashEncoder(), batch_size=4)
    assert stats.files_indexed == 60 and stats.chunks_embedded == 60
    assert max(embedded_sizes) <= 8 and len(embedded_sizes) >= 60 // 8
    assert sum(staged_sizes) == 60 and max(staged_sizes) <= 8


def test_an_index_from_before_content_hashes_opens_and_trusts_its_stats(tmp_path, monkeypatch):
    docs, idx = tmp_path / "docs", tmp_path / "idx"
    docs.mkdir()
    (docs / "a.txt").write_text("the cat sat on the mat")  # recent: would be hashed if a read time were known
    build_index(docs, idx, encoder=HashEncoder())
    con = sqlite3.connect(idx / "chunks.sqlite")  # the tables as ragen wrote them before this change
    con.executescript("ALTER TABLE files DROP COLUMN sha256; ALTER TABLE files DROP COLUMN read_ns; "
                      "DROP TABLE staged_files; DROP TABLE staged_chunks; DROP TABLE skipped_files;")
    con.close()
    with Store.open(idx) as store:
        assert store.file_states()["a.txt"].sha256 is None and store.staged_count() == 0
        assert store.remembered_skips() == {}
    counting = _Counting(monkeypatch)
    stats = build_index(docs, idx, encoder=HashEncoder())
    assert counting.read == [] and counting.hashed == [] and stats.chunks_embedded == 0
    (docs / "b.txt").write_text("a new file about trains")
    build_index(docs, idx, encoder=HashEncoder())  # the migrated table takes the new columns
    with Store.open(idx) as store:
        states = store.file_states()
        assert states["a.txt"].sha256 is None and states["b.txt"].sha256 is not None


def test_a_recent_unindexable_file_is_hashed_once_then_trusted(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "RACY_WINDOW_NS", 300_000_000)
    docs, idx = tmp_path / "docs", tmp_path / "idx"
    _write(docs, 1)
    (docs / "bad.json").write_text("{not json")  # recent: its skip is racy at first
    build_index(docs, idx, encoder=HashEncoder())
    counting = _Counting(monkeypatch)
    time.sleep(0.4)
    build_index(docs, idx, encoder=HashEncoder())
    assert counting.hashed == ["bad.json"] and counting.read == []
    build_index(docs, idx, encoder=HashEncoder())  # its recorded read time moved past the window
    assert counting.hashed == ["bad.json"] and counting.read == []
