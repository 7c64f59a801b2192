"""The index locks on both implementations (issue 13, cross-platform locking): fcntl.flock on POSIX and
the portable filelock descriptor locks used where fcntl is missing (exercised here on Linux too). A
second writer is refused with the holder's pid; readers share ``readers.lock`` (POSIX) or take it in
turn (portable), and the writer never deletes retired files while a reader holds it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ragen.errors import StoreError
from ragen.store import EncoderInfo, FileRecord, StoreWriter, check_unlocked, index_is_locked, locks
from ragen.store.segments import _readers_lock
from ragen.types import Chunk

ROOT = Path(__file__).resolve().parents[1]
ENC = EncoderInfo(spec="synthetic", fingerprint="fp-locks", dim=4)


@pytest.fixture(params=["posix", "portable"])
def impl(request, monkeypatch):
    monkeypatch.setattr(locks, "HAVE_FLOCK", request.param == "posix")
    return request.param


def _build(idx: Path, version: int = 0) -> None:
    chunks = tuple(Chunk(f"a.txt#{i}", "a.txt", i, f"t{version} {i}", i, i + 1, f"h{version}-{i}") for i in range(3))
    with StoreWriter(idx, encoder=ENC, chunking={"method": "chars/1"}) as w:
        w.add_vectors([c.content_hash for c in chunks], np.random.default_rng(version).standard_normal((3, 4)))
        w.commit([FileRecord("a.txt", 1, version, chunks)], ["a.txt"])


def test_second_writer_is_refused_with_the_holders_pid(tmp_path, impl):
    idx = tmp_path / "idx"
    _build(idx)
    with StoreWriter(idx, encoder=ENC, chunking={"method": "chars/1"}):
        assert index_is_locked(idx)
        with pytest.raises(StoreError, match=rf"being written by another process \(pid {os.getpid()}\)"):
            StoreWriter(idx, encoder=ENC, chunking={"method": "chars/1"})
        with pytest.raises(StoreError, match=rf"\(pid {os.getpid()}\)"):
            check_unlocked(idx)
    assert not index_is_locked(idx)
    check_unlocked(idx)
    _build(idx, 1)  # the lock is free again


def test_a_writer_in_another_process_is_named_by_its_pid(tmp_path, impl):
    idx = tmp_path / "idx"
    _build(idx)
    script = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
              "from ragen.store import StoreWriter, EncoderInfo, locks\n"
              f"locks.HAVE_FLOCK = {impl == 'posix'}\n"
              f"w = StoreWriter({str(idx)!r}, encoder=EncoderInfo('synthetic', 'fp-locks', 4), chunking={{}})\n"
              "print('ready', flush=True); time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(StoreError, match=rf"\(pid {proc.pid}\)"):
            StoreWriter(idx, encoder=ENC, chunking={"method": "chars/1"})
    finally:
        proc.kill()
        proc.wait(timeout=10)
    _build(idx, 1)  # a killed holder leaves no stale lock


def test_readers_lock_keeps_retired_files_until_readers_are_done(tmp_path, impl):
    idx = tmp_path / "idx"
    _build(idx)
    first = sorted(p.name for p in idx.glob("seg-*.faiss"))
    with _readers_lock(idx):
        if impl == "posix":  # shared: a second reader gets in at once
            done = threading.Event()

            def second():
                with _readers_lock(idx):
                    done.set()

            t = threading.Thread(target=second)
            t.start()
            assert done.wait(5)
            t.join()
        _build(idx, 1)  # a new base; the old one is retired but a reader holds the lock
        assert set(first) <= {p.name for p in idx.glob("seg-*.faiss")}
    _build(idx, 2)  # no reader now: the retired segments are deleted
    assert not set(first) & {p.name for p in idx.glob("seg-*.faiss")}


def test_portable_readers_take_the_lock_in_turn(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "HAVE_FLOCK", False)
    idx = tmp_path / "idx"
    _build(idx)
    entered = []

    def reader():
        with _readers_lock(idx):
            entered.append(time.monotonic())

    with _readers_lock(idx):
        t = threading.Thread(target=reader)
        t.start()
        time.sleep(0.2)
        assert entered == []  # exclusive-only locks: the second reader waits for the first
        released = time.monotonic()
    t.join(5)
    assert entered and entered[0] >= released
    fd = os.open(idx / "write.lock", os.O_RDWR)
    try:
        locks.write_pid(fd)
        assert (idx / "write.lock").read_bytes() == f" {os.getpid()}\n".encode()  # byte 0 is the locked one
        assert locks.read_pid(fd) == str(os.getpid())
    finally:
        os.close(fd)
