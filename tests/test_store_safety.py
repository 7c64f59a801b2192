"""Store safety (issue 15): user files are never deleted, swapped or damaged files are named, hostile
metadata gives one line, faults are reported for what they are, and a committed switch is a success."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import ragen.store as store_mod
import ragen.store.writer as writer_mod
from ragen.cli import app
from ragen.errors import StoreError
from ragen.store import Store, StoreWriter, check_unlocked

from .test_store import CHUNKING, ENC, _records, _vector_for, _write

ROOT = Path(__file__).resolve().parents[1]


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text
    return text


# --------------------------------------------------------------------------------- user files are not ours
@pytest.mark.parametrize("names", [["vectors-notes.md", "a.txt"], ["vectors-2024-q1.csv", ".draft.tmp"]])
def test_a_folder_that_is_not_an_index_is_refused_and_left_alone(tmp_path, names):
    d = tmp_path / "d"
    d.mkdir()
    for n in names:
        (d / n).write_text("user data")
    with pytest.raises(StoreError, match=r"not empty and not a ragen index .*pass a new or empty folder"):
        StoreWriter(d, encoder=ENC, chunking=CHUNKING)
    with pytest.raises(StoreError, match="not empty and not a ragen index"):
        check_unlocked(d)  # what the CLI calls before it loads a model
    assert sorted(p.name for p in d.iterdir()) == sorted(names)
    assert all((d / n).read_text() == "user data" for n in names)


def test_cli_refuses_a_non_index_folder_before_loading_a_model(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("some text")
    d = tmp_path / "d"
    d.mkdir()
    (d / "vectors-notes.md").write_text("x")
    result = CliRunner().invoke(app, ["index", str(docs), "--index", str(d), "--model", "no-such-model"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not a ragen index" in lines[0]
    assert (d / "vectors-notes.md").read_text() == "x"


def test_an_sqlite_file_that_is_not_an_index_is_refused(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    con = sqlite3.connect(d / "chunks.sqlite")
    con.execute("CREATE TABLE mine (x)")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="an SQLite database that is not a ragen index"):
        StoreWriter(d, encoder=ENC, chunking=CHUNKING)
    assert {r[0] for r in sqlite3.connect(d / "chunks.sqlite").execute("SELECT name FROM sqlite_master")} == {"mine"}


def test_an_index_of_the_previous_format_opens_and_is_upgraded_by_its_next_write(tmp_path, caplog):
    """tests/fixtures/index-format1 was written by the previous release: one FAISS + id file per
    generation, no owned_files, no readers.lock. It opens as it is; the next write upgrades it (a warning
    says so) and deletes its retired files, which the store claims by that format's naming convention."""
    import shutil

    idx = tmp_path / "idx"
    shutil.copytree(Path(__file__).parent / "fixtures" / "index-format1", idx)
    (idx / "notes.txt").write_text("the user's")
    q = _fixture_vector("h1-1")
    with Store.open(idx, device="cpu") as store:
        assert store.count == 4 and store.generation == 2 and store.manifest["format_version"] == 1
        assert store.hits(q, 1)[0].chunk_id == "file1.txt#1"
    records = [_fixture_records()[0], _fixture_records(tag="new")[1]]
    with StoreWriter(idx, encoder=ENC, chunking=CHUNKING) as w:
        missing = sorted(w.missing_vectors(c.content_hash for r in records for c in r.chunks))
        assert missing == ["hnew1-0", "hnew1-1"]  # the stored vectors are reused
        w.add_vectors(missing, np.stack([_fixture_vector(h) for h in missing]))
        result = w.commit(records[1:], ["file0.txt", "file1.txt"])
    assert "upgrading the index to format 2" in caplog.text
    assert result.manifest["format_version"] == 2 and result.chunks == 4
    assert sorted(p.name for p in idx.iterdir() if p.suffix in (".faiss", ".npy")) == ["seg-3-base.faiss"]
    assert (idx / "notes.txt").read_text() == "the user's"
    with Store.open(idx, device="cpu") as store:
        assert store.hits(_fixture_vector("hnew1-1"), 1)[0].chunk_id == "file1.txt#1"
        assert store.hits(_fixture_vector("h0-0"), 1)[0].chunk_id == "file0.txt#0"
        assert store.verify()["files"].keys() == {"seg-3-base.faiss"}


def _fixture_vector(h: str) -> np.ndarray:
    import hashlib

    seed = int.from_bytes(hashlib.sha256(h.encode()).digest()[:4], "little")
    return np.random.default_rng(seed).standard_normal(16).astype(np.float32)


def _fixture_records(tag: str = ""):
    from ragen.store import FileRecord
    from ragen.types import Chunk

    return [FileRecord(f"file{f}.txt", 100 + f, 1000 + f + (7 if tag else 0), tuple(
        Chunk(f"file{f}.txt#{p}", f"file{f}.txt", p, f"text {tag}{f}-{p}", p, p + 1, f"h{tag}{f}-{p}") for p in range(2)))
        for f in range(2)]


# --------------------------------------------------------------------------------- swapped or damaged files
def _two_indexes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, _records(10, 4))
    _write(b, _records(10, 4, tag="other"))  # same shape, other vectors
    return a, b


def test_a_file_swapped_for_another_index_file_of_the_same_shape_is_refused(tmp_path):
    a, b = _two_indexes(tmp_path)
    name = "seg-1-base.faiss"
    assert (a / name).stat().st_size == (b / name).stat().st_size
    (a / name).write_bytes((b / name).read_bytes())
    with pytest.raises(StoreError) as info:
        Store.open(a, device="cpu")
    assert f"{name}: does not match the digest recorded" in _one_line(info.value) and "--rebuild" in str(info.value)


def test_verify_finds_a_flipped_byte_the_sampled_check_does_not_read(tmp_path):
    idx = tmp_path / "idx"
    _write(idx, _records(200, 10))  # 2000 x 16 floats: a file of ~128 kB, sampled in 16 blocks of 4 kB
    path = idx / "seg-1-base.faiss"
    data = bytearray(path.read_bytes())
    last = len(data) - 4096
    sampled = [(i * last) // 15 for i in range(16)]
    spot = next(o for o in range(4096, len(data) - 4096) if all(not (s <= o < s + 4096) for s in sampled))
    data[spot] ^= 0xFF
    path.write_bytes(bytes(data))
    with Store.open(idx, device="cpu") as store:  # cheap check on open: size and samples agree
        with pytest.raises(StoreError, match="seg-1-base.faiss: does not match the SHA-256 recorded"):
            store.verify()
    result = CliRunner().invoke(app, ["info", "--index", str(idx), "--verify"])
    assert result.exit_code == 1 and "does not match the SHA-256" in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1


def test_info_verify_reports_a_healthy_index(tmp_path):
    idx = tmp_path / "idx"
    _write(idx, _records(3, 2))
    result = CliRunner().invoke(app, ["info", "--index", str(idx), "--verify"])
    assert result.exit_code == 0, result.output
    assert "verified" in result.stdout and "seg-1-base.faiss" in result.stdout
    result = CliRunner().invoke(app, ["info", "--index", str(idx), "--verify", "--json"])
    assert json.loads(result.stdout)["verified"]["database"] == "ok"


# --------------------------------------------------------------------------------- hostile metadata
def _set_db_manifest(idx: Path, value) -> None:
    con = sqlite3.connect(idx / "chunks.sqlite")
    con.execute("UPDATE meta SET value=? WHERE key='manifest'", (json.dumps(value),))
    con.commit()
    con.close()


def _manifest_edits():
    good = {"format_version": 1}
    return [
        ("file", {**good, "format_version": "1"}, "manifest.json: manifest format_version is '1', expected an integer"),
        ("file", {**good, "format_version": None}, "manifest.json: manifest format_version is None"),
        ("db", [1, 2], "chunks.sqlite: the committed manifest is a JSON list, expected an object"),
        ("db", "format", "chunks.sqlite: the committed manifest is a JSON str"),
        ("db", {"format_version": "x"}, "chunks.sqlite: manifest format_version is 'x'"),
        ("db", {"format_version": None}, "chunks.sqlite: manifest format_version is None"),
        ("db", {"format_version": 1, "encoder": [1]}, "chunks.sqlite: the committed manifest has no encoder"),
        ("db", {"format_version": 1, "encoder": {"spec": "s", "fingerprint": "f", "dim": "16"}},
         "encoder.dim is '16'"),
    ]


@pytest.mark.parametrize("where,value,message", _manifest_edits())
def test_hostile_manifests_give_one_line_naming_the_file(tmp_path, where, value, message):
    idx = tmp_path / "idx"
    _write(idx, _records(2, 2))
    if where == "file":
        (idx / "manifest.json").write_text(json.dumps(value))
    else:
        _set_db_manifest(idx, value)
        (idx / "manifest.json").unlink()
    for call in (lambda: Store.open(idx, device="cpu"), lambda: store_mod.read_manifest(idx)):
        with pytest.raises(StoreError) as info:
            call()
        assert message in _one_line(info.value) and "--rebuild" in str(info.value)
    runner = CliRunner()
    for args in (["info", "--index", str(idx)], ["query", "x", "--index", str(idx)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert message in " ".join(result.stderr.split())
    if where == "db":  # a write says --rebuild; --rebuild replaces the damaged state
        with pytest.raises(StoreError, match="--rebuild"):
            StoreWriter(idx, encoder=ENC, chunking=CHUNKING)
        result = _write(idx, _records(2, 3), rebuild=True)
        assert result.chunks == 6 and result.generation >= 2
        with Store.open(idx, device="cpu") as store:
            assert store.hits(_vector_for("h1-2"), 1)[0].chunk_id == "file1.txt#2"


def _flip_bytes_in_chunk_pages(db: Path) -> None:
    """Damage the B-tree pages that hold the chunk rows (SQLite page 1 and the meta table stay)."""
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    root = con.execute("SELECT rootpage FROM sqlite_master WHERE name='files'").fetchone()[0]
    page = con.execute("PRAGMA page_size").fetchone()[0]
    con.close()
    data = bytearray(db.read_bytes())
    start = (root - 1) * page
    for i in range(start, start + page, 7):
        data[i] ^= 0x5A
    db.write_bytes(bytes(data))


def test_bit_flipped_database_is_one_line_in_info_and_rebuild_is_the_way_out(tmp_path):
    idx = tmp_path / "idx"
    _write(idx, _records(20, 5))
    _flip_bytes_in_chunk_pages(idx / "chunks.sqlite")
    result = CliRunner().invoke(app, ["info", "--index", str(idx)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "chunks.sqlite: not a readable ragen index database" in lines[0]
    assert "--rebuild" in " ".join(result.stderr.split())
    result = _write(idx, _records(20, 5), rebuild=True)
    assert result.chunks == 100
    assert (idx / "chunks.sqlite.corrupt").exists()
    with Store.open(idx, device="cpu") as store:
        assert store.verify()["database"] == "ok"
        assert store.hits(_vector_for("h7-3"), 1)[0].chunk_id == "file7.txt#3"


def test_a_dropped_files_table_is_one_line_and_rebuild_restores_it(tmp_path):
    idx = tmp_path / "idx"
    _write(idx, _records(3, 2))
    con = sqlite3.connect(idx / "chunks.sqlite")
    con.execute("DROP TABLE files")
    con.commit()
    con.close()
    result = CliRunner().invoke(app, ["info", "--index", str(idx)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "chunks.sqlite: not a readable ragen index database (no such table: files)" in " ".join(result.stderr.split())
    with pytest.raises(StoreError, match="table 'files' is missing; rebuild the index"):
        StoreWriter(idx, encoder=ENC, chunking=CHUNKING)
    assert _write(idx, _records(3, 2), rebuild=True).files == 3
    with Store.open(idx, device="cpu") as store:
        assert len(store.files()) == 3


# --------------------------------------------------------------------------------- faults reported as what they are
def test_an_io_error_at_commit_is_not_masked(tmp_path):
    """SQLite rolls a transaction back itself when its COMMIT hits an I/O error; the rollback that follows
    must not replace that error with "no transaction is active"."""
    idx = tmp_path / "idx"
    _write(idx, _records(2, 2))

    class FailingCommit:
        def __init__(self, conn):
            self._c = conn

        def execute(self, sql, *args):
            if sql == "COMMIT" and self._c.execute("SELECT 1 FROM meta WHERE key='generation' AND value='2'").fetchone():
                self._c.execute("ROLLBACK")
                raise sqlite3.OperationalError("disk I/O error")
            return self._c.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self._c, name)

    with StoreWriter(idx, encoder=ENC, chunking=CHUNKING) as w:
        new = _records(1, 3, tag="v2")
        w.add_vectors([c.content_hash for c in new[0].chunks], np.stack([_vector_for(c.content_hash) for c in new[0].chunks]))
        w._conn = FailingCommit(w._conn)
        with pytest.raises(StoreError) as info:
            w.commit(new, ["file0.txt", "file1.txt"])
        w._conn = w._conn._c
    assert "I/O error (disk I/O error)" in _one_line(info.value) and "--rebuild" not in str(info.value)
    with Store.open(idx, device="cpu") as store:
        assert store.generation == 1 and store.count == 4


def test_a_commit_that_succeeded_is_a_success_even_if_housekeeping_fails(tmp_path, monkeypatch, caplog):
    idx = tmp_path / "idx"
    _write(idx, _records(2, 2))
    real = writer_mod._write_owned

    def no_space_for_the_manifest_copy(path, write):
        if path.name == "manifest.json":
            raise OSError(28, "No space left on device", str(path))
        return real(path, write)

    monkeypatch.setattr(writer_mod, "_write_owned", no_space_for_the_manifest_copy)
    result = _write(idx, _records(2, 2, tag="new"))
    assert result.generation == 2
    assert "cannot update this copy of the committed manifest" in caplog.text
    with Store.open(idx, device="cpu") as store:
        assert store.generation == 2 and "new" in store.hits(_vector_for("hnew1-1"), 1)[0].text


def test_a_full_disk_is_reported_as_a_full_disk_not_a_damaged_index(tmp_path, monkeypatch):
    """SQLite's page cap raises the same SQLITE_FULL as ENOSPC: the writer must say the disk is full, not
    that the index is damaged and needs a rebuild."""
    idx = tmp_path / "idx"
    _write(idx, _records(2, 2))
    con = sqlite3.connect(idx / "chunks.sqlite")
    con.execute("DROP INDEX chunks_hash")  # the writer must create it again: it needs a new page
    con.commit()
    con.execute("VACUUM")  # and no free page is left to reuse
    con.close()
    real = writer_mod._connect

    def capped(db):
        conn = real(db)
        conn.execute("PRAGMA max_page_count=1")  # capped at the current size: no page can be added
        return conn

    monkeypatch.setattr(writer_mod, "_connect", capped)
    for rebuild in (False, True):
        with pytest.raises(StoreError) as info:
            StoreWriter(idx, encoder=ENC, chunking=CHUNKING, rebuild=rebuild)
        assert "chunks.sqlite: the disk is full" in _one_line(info.value) and "--rebuild" not in str(info.value)
    assert not (idx / "chunks.sqlite.corrupt").exists()
    with pytest.raises(StoreError, match="the disk is full"):
        with StoreWriter(idx, encoder=ENC, chunking=CHUNKING):
            pass
    monkeypatch.setattr(writer_mod, "_connect", real)
    with Store.open(idx, device="cpu") as store:
        assert store.count == 4


def test_a_reader_who_cannot_write_the_folder_can_query(tmp_path):
    base = Path(os.environ.get("TMPDIR", "/tmp"))
    import tempfile

    top = Path(tempfile.mkdtemp(dir=base))
    try:
        top.chmod(0o755)
        idx = top / "idx"
        _write(idx, _records(3, 2))
        for p in idx.iterdir():
            p.chmod(0o444)
        idx.chmod(0o555)
        script = f"""
import fcntl, os, sys, faiss, numpy as np
sys.path.insert(0, {str(ROOT)!r})
from ragen.store import Store, read_manifest
q = np.array({_vector_for("h2-1").tolist()!r}, dtype=np.float32)
if os.geteuid() == 0:
    os.setgid(65534); os.setuid(65534)  # root ignores permissions: query as nobody
assert not os.access({str(idx)!r}, os.W_OK)
with Store.open({str(idx)!r}, device="cpu") as s:
    print(s.hits(q, 1)[0].chunk_id, len(s.files()), read_manifest({str(idx)!r})["counts"]["chunks"])
"""
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == ["file2.txt#1", "3", "6"]
        assert sorted(p.name for p in idx.iterdir()) == sorted(
            ["chunks.sqlite", "manifest.json", "readers.lock", "seg-1-base.faiss", "write.lock"])
    finally:
        for p in [top, *top.rglob("*")]:
            p.chmod(0o755)
        import shutil

        shutil.rmtree(top, ignore_errors=True)


# --------------------------------------------------------------------------------- fuzz: hostile metadata values
def _random_json_values(rng: np.random.Generator, n: int) -> list:
    pool = [None, True, 0, -1, 2**70, 1.5, "", "x" * 300, "\udcff".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
            [], {}, [1, "a"], {"a": 1}, {"format_version": 1}, {"name": "../../etc/passwd", "kind": "base", "n": 1, "lo": 0, "hi": 0}]
    out = [pool[int(i)] for i in rng.integers(0, len(pool), n)]
    out += [bytes(rng.integers(0, 256, int(rng.integers(1, 40)), dtype=np.uint8)).decode("latin-1") for _ in range(n)]
    return out


@pytest.mark.parametrize("key", ["manifest", "generation", "segments", "epoch", "work_epoch", "next_row_id"])
def test_fuzzed_database_state_gives_one_store_error_line(tmp_path, key):
    """Random values (random JSON and random bytes) in every committed meta key: readers and writers
    raise a one-line StoreError or work; nothing else escapes, and no file outside the index is touched."""
    idx = tmp_path / "idx"
    _write(idx, _records(3, 2))
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("keep")
    con = sqlite3.connect(idx / "chunks.sqlite")
    good = con.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()[0]
    rng = np.random.default_rng(abs(hash(key)) % 2**32)
    for value in _random_json_values(rng, 12):
        text = value if isinstance(value, str) and rng.random() < 0.5 else json.dumps(value)
        con.execute("UPDATE meta SET value=? WHERE key=?", (text, key))
        con.commit()
        for call in (lambda: Store.open(idx, device="cpu").close(), lambda: store_mod.read_manifest(idx),
                     lambda: StoreWriter(idx, encoder=ENC, chunking=CHUNKING).close()):
            try:
                call()
            except StoreError as exc:
                _one_line(exc)
        assert (tmp_path / "etc" / "passwd").read_text() == "keep"
    con.execute("UPDATE meta SET value=? WHERE key=?", (good, key))
    con.commit()
    con.close()
    with Store.open(idx, device="cpu") as store:  # the index itself survived every probe
        assert store.count == 6


def test_fuzzed_manifest_file_gives_one_store_error_line(tmp_path):
    idx = tmp_path / "idx"
    _write(idx, _records(2, 2))
    rng = np.random.default_rng(7)
    for value in _random_json_values(rng, 15) + ["[" * 100_000, '{"format_version": ' + "9" * 5000 + "}"]:
        (idx / "manifest.json").write_bytes(value.encode("utf-8", "surrogateescape") if isinstance(value, str)
                                            else json.dumps(value).encode())
        for call in (lambda: Store.open(idx, device="cpu").close(), lambda: store_mod.read_manifest(idx)):
            try:
                call()
            except StoreError as exc:
                _one_line(exc)


def test_a_hostile_owned_files_table_never_deletes_outside_the_store_names(tmp_path):
    idx = tmp_path / "idx"
    _write(idx, _records(2, 2))
    (tmp_path / "victim.txt").write_text("keep")
    (idx / "notes.md").write_text("keep")
    con = sqlite3.connect(idx / "chunks.sqlite")
    con.executemany("INSERT INTO owned_files(name, generation) VALUES (?, 0)",
                    [("../victim.txt",), ("notes.md",), (str(tmp_path / "victim.txt"),)])
    con.commit()
    con.close()
    _write(idx, _records(2, 2, tag="new"))
    assert (tmp_path / "victim.txt").read_text() == "keep" and (idx / "notes.md").read_text() == "keep"
