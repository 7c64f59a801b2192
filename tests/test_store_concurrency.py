"""Readers never fail because a writer committed (issue 15): a writer process commits in a loop while
fresh readers open the index and a long-lived reader searches; every search must succeed and every hit
must be the text whose vector it scored (no mixed generations)."""

from __future__ import annotations

import functools
import hashlib
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

from ragen.store import EncoderInfo, FileRecord, Store, StoreWriter
from ragen.types import Chunk

ROOT = Path(__file__).resolve().parents[1]
DIM = 1024
ENC = EncoderInfo(spec="synthetic", fingerprint="fp-concurrency", dim=DIM)
CHUNKING = {"method": "chars/1", "chunk_size": 1000, "chunk_overlap": 200}
N_FILES, PER_FILE = 10, 10
SECONDS = 4.0


@functools.lru_cache(maxsize=4096)
def vec(content_hash: str) -> np.ndarray:
    """The same vector for the same hash in every process (``hash()`` is salted per process)."""
    seed = int.from_bytes(hashlib.sha256(content_hash.encode()).digest()[:4], "little")
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def version(f: int, generation: int) -> int:
    """Generation G >= 2 rewrites file ``G % N_FILES``: the version of file f at G is the last such G."""
    g = generation - ((generation - f) % N_FILES)
    return g if g >= 2 else 1


def record(f: int, v: int) -> FileRecord:
    path = f"file{f}.txt"
    return FileRecord(path, 100, v, tuple(Chunk(chunk_id=f"{path}#{p}", path=path, position=p, text=f"text g{v}_{f}-{p}",
                                                start=p, end=p + 1, content_hash=f"hg{v}_{f}-{p}") for p in range(PER_FILE)))


def commit(index_dir, generation: int) -> None:
    """Generation 1 writes every file; each later one rewrites one file (deltas, tombstones, merges and
    compactions all happen within a few dozen commits)."""
    with StoreWriter(index_dir, encoder=ENC, chunking=CHUNKING) as w:
        files = range(N_FILES) if generation == 1 else [generation % N_FILES]
        recs = [record(f, version(f, generation)) for f in files]
        hashes = sorted(w.missing_vectors(c.content_hash for r in recs for c in r.chunks))
        if hashes:
            w.add_vectors(hashes, np.stack([vec(h) for h in hashes]))
        w.commit(recs, [f"file{f}.txt" for f in range(N_FILES)])


WRITER = """
import sys, time
sys.path.insert(0, {root!r})
from tests.test_store_concurrency import commit
deadline = time.monotonic() + {seconds}
g = 1
while time.monotonic() < deadline:
    g += 1
    commit({index!r}, g)
print(g - 1)
"""


def _check_hits(hits, q: np.ndarray, problems: list[str]) -> None:
    if len(hits) != 3:
        problems.append(f"{len(hits)} hits instead of 3")
    for h in hits:
        tag = h.text.removeprefix("text ")
        f, _, p = tag.partition("_")[2].partition("-")
        expected = float(vec("h" + tag) @ q)
        if h.chunk_id != f"file{f}.txt#{p}" or abs(h.score - expected) > 1e-4:
            problems.append(f"wrong hit: {h.chunk_id} {h.text!r} scored {h.score:.5f}, its vector gives {expected:.5f}")


def test_readers_never_fail_while_a_writer_commits(tmp_path):
    idx = tmp_path / "idx"
    commit(idx, 1)
    queries = [vec(f"query{i}") for i in range(64)]
    errors: list[str] = []
    wrong: list[str] = []
    counts = {"fresh": 0, "long": 0}
    writer = subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT), seconds=SECONDS, index=str(idx))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop = threading.Event()
    lock = threading.Lock()

    def fresh_readers() -> None:
        while not stop.is_set():
            q = queries[np.random.randint(len(queries))]
            try:
                with Store.open(idx, device="cpu") as store:
                    _check_hits(store.hits(q, 3), q, wrong)
                with lock:
                    counts["fresh"] += 1
            except Exception as exc:  # the assertion below reports every failure  # noqa: BLE001
                errors.append(f"fresh open: {type(exc).__name__}: {exc}")

    def long_lived_reader() -> None:
        with Store.open(idx, device="cpu") as store:
            while not stop.is_set():
                q = queries[counts["long"] % len(queries)]
                try:
                    _check_hits(store.hits(q, 3), q, wrong)
                    counts["long"] += 1
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"long-lived search: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=fresh_readers), threading.Thread(target=fresh_readers),
               threading.Thread(target=long_lived_reader)]
    for t in threads:
        t.start()
    try:
        out, err = writer.communicate(timeout=SECONDS + 60)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert writer.returncode == 0, err[-2000:]
    commits = int(out.split()[-1])
    assert commits >= 10, f"only {commits} commits: the test did not exercise concurrent commits"
    assert counts["fresh"] >= 20 and counts["long"] >= 20, counts
    assert errors == [], f"{len(errors)} reader errors in {counts}, e.g. {errors[:3]}"
    assert wrong == [], f"{len(wrong)} wrong hits, e.g. {wrong[:3]}"
    with Store.open(idx, device="cpu") as store:  # retired generations were cleaned up
        assert store.generation == commits + 1
        leftovers = sorted(p.name for p in idx.glob("vectors-*") if not p.name.startswith(f"vectors-{commits + 1}."))
    assert len(leftovers) <= 4, leftovers  # at most the last deferred generations, which the next commit removes
