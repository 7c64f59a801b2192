"""build_index and Retriever: incremental indexing, resume after a crash, encoder checks, real retrieval."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pytest

from ragen.errors import DataError, StoreError
from ragen.retriever import IndexStats, ProgressEvent, Retriever, build_index
from ragen.store import Store


class BowEncoder:
    """A deterministic bag-of-words encoder: fast, and similarity follows shared words."""

    def __init__(self, *, fingerprint: str = "bow-1", dim: int = 64, fail_after_calls: int | None = None) -> None:
        self.dim = dim
        self.fingerprint = fingerprint
        self.spec = "bow"
        self.fail_after_calls = fail_after_calls
        self.calls = 0
        self.encoded = 0

    def _encode(self, texts, normalize):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise RuntimeError("simulated crash in the middle of embedding")
        self.calls += 1
        self.encoded += len(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().replace(".", " ").replace("?", " ").split():
                out[i, zlib.crc32(w.encode()) % self.dim] += 1.0
        out[:, 0] += 0.01  # no all-zero rows
        return out / np.linalg.norm(out, axis=1, keepdims=True) if normalize else out

    def encode_queries(self, texts, *, batch_size: int = 32, normalize: bool = False):
        return self._encode(list(texts), normalize)

    def encode_documents(self, texts, *, batch_size: int = 32, normalize: bool = False):
        return self._encode(list(texts), normalize)


TOPICS = {
    "plants.txt": "photosynthesis chlorophyll leaves sunlight sugar",
    "space.md": "rocket orbit satellite gravity launch",
    "cooking.rst": "recipe oven flour butter bake",
    "music.txt": "guitar chord melody rhythm song",
}


def _write_corpus(root: Path, paragraphs: int = 6) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, words in TOPICS.items():
        paras = [f"Paragraph {i} about {words}. " * 4 for i in range(paragraphs)]
        (root / name).write_text("\n\n".join(paras))
    (root / "logo.png").write_bytes(b"\x89PNG\r\n")


def test_build_and_search(tmp_path):
    _write_corpus(tmp_path / "docs")
    events: list[ProgressEvent] = []
    stats = build_index(tmp_path / "docs", tmp_path / "idx", encoder=BowEncoder(), chunk_size=300,
                        chunk_overlap=50, batch_size=4, progress=events.append)
    assert isinstance(stats, IndexStats)
    assert (stats.files_seen, stats.files_indexed, stats.files_skipped) == (5, 4, 1)
    assert stats.chunks_total > 8 and stats.chunks_embedded <= stats.chunks_total and stats.chunks_removed == 0
    assert stats.skipped == (("unsupported type", 1),)
    assert [e.stage for e in events][-1] == "done" and {"scan", "read", "embed", "write"} <= {e.stage for e in events}
    embed = [e for e in events if e.stage == "embed"]
    assert embed[-1].done == embed[-1].total == stats.chunks_embedded
    with Retriever.open(tmp_path / "idx", encoder=BowEncoder()) as r:
        for name, words in TOPICS.items():
            hits = r.search(words.split()[1] + " " + words.split()[3], k=3)
            assert hits[0].path == name and hits[0].rank == 1
            assert hits[0].score >= hits[1].score >= hits[2].score
            assert hits[0].chunk_id.startswith(name + "#")


def test_incremental_runs_embed_only_what_changed(tmp_path):
    docs = tmp_path / "docs"
    _write_corpus(docs)
    enc = BowEncoder()
    first = build_index(docs, tmp_path / "idx", encoder=enc, chunk_size=300, chunk_overlap=50)
    again = build_index(docs, tmp_path / "idx", encoder=enc, chunk_size=300, chunk_overlap=50)
    assert again.chunks_embedded == 0 and again.files_changed == 0 and again.generation == first.generation

    # append to one file, delete another, add a new one
    with open(docs / "music.txt", "a") as f:
        f.write("\n\nA brand new paragraph on violin vibrato technique.")
    os.utime(docs / "music.txt", ns=(10**18, 10**18))
    (docs / "cooking.rst").unlink()
    (docs / "sea.txt").write_text("whales dolphins coral reef tides")
    third = build_index(docs, tmp_path / "idx", encoder=enc, chunk_size=300, chunk_overlap=50)
    assert third.files_changed == 2 and third.files_removed == 1
    assert 1 <= third.chunks_embedded <= 3  # the new file and the music file's new tail, not the rest
    assert third.chunks_removed >= 1 and third.generation == first.generation + 1
    with Retriever.open(tmp_path / "idx", encoder=enc) as r:
        assert all(h.path != "cooking.rst" for h in r.search("recipe oven flour", k=50))
        assert r.search("whales coral reef", k=1)[0].path == "sea.txt"
        assert r.search("violin vibrato", k=1)[0].path == "music.txt"

    rebuilt = build_index(docs, tmp_path / "idx", encoder=enc, chunk_size=300, chunk_overlap=50, rebuild=True)
    assert rebuilt.chunks_embedded == len({h for h in _hashes(tmp_path / "idx")})
    assert rebuilt.chunks_total == third.chunks_total


def _hashes(index_dir: Path) -> list[str]:
    import sqlite3

    con = sqlite3.connect(index_dir / "chunks.sqlite")
    try:
        return [h for (h,) in con.execute("SELECT content_hash FROM chunks")]
    finally:
        con.close()


def test_crash_mid_embedding_keeps_old_index_and_resumes(tmp_path):
    docs = tmp_path / "docs"
    _write_corpus(docs, paragraphs=2)
    build_index(docs, tmp_path / "idx", encoder=BowEncoder(), chunk_size=300, chunk_overlap=50)
    before = set(_hashes(tmp_path / "idx"))
    for i in range(12):
        (docs / f"extra{i}.txt").write_text(f"extra document number {i} about topic{i} " * 8)
    crashing = BowEncoder(fail_after_calls=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_index(docs, tmp_path / "idx", encoder=crashing, chunk_size=300, chunk_overlap=50, batch_size=2)
    assert crashing.encoded == 6
    with Store.open(tmp_path / "idx", device="cpu") as store:  # the previous generation is untouched
        assert {p for p, *_ in store.files()} == set(TOPICS)
    healthy = BowEncoder()
    resumed = build_index(docs, tmp_path / "idx", encoder=healthy, chunk_size=300, chunk_overlap=50, batch_size=2)
    new_unique = set(_hashes(tmp_path / "idx")) - before
    assert resumed.chunks_embedded == healthy.encoded == len(new_unique) - 6  # the 3 committed batches are kept
    assert resumed.files_indexed == len(TOPICS) + 12 and resumed.files_changed == 12
    with Retriever.open(tmp_path / "idx", encoder=healthy) as r:
        assert r.search("extra document number 7 about topic7", k=1)[0].path == "extra7.txt"


def test_crash_during_first_run_resumes_too(tmp_path):
    _write_corpus(tmp_path / "docs")
    with pytest.raises(RuntimeError):
        build_index(tmp_path / "docs", tmp_path / "idx", encoder=BowEncoder(fail_after_calls=2), chunk_size=300,
                    chunk_overlap=50, batch_size=3)
    with pytest.raises(StoreError, match="incomplete"):
        Store.open(tmp_path / "idx")
    full = BowEncoder()
    stats = build_index(tmp_path / "docs", tmp_path / "idx", encoder=full, chunk_size=300, chunk_overlap=50,
                        batch_size=3)
    unique = len(set(_hashes(tmp_path / "idx")))
    assert stats.chunks_embedded == unique - 6 == full.encoded


def test_encoder_mismatch_is_refused(tmp_path):
    _write_corpus(tmp_path / "docs")
    build_index(tmp_path / "docs", tmp_path / "idx", encoder=BowEncoder())
    with pytest.raises(StoreError, match="built with encoder bow .*fingerprint bow-1.*fingerprint bow-2"):
        Retriever.open(tmp_path / "idx", encoder=BowEncoder(fingerprint="bow-2"))
    with pytest.raises(StoreError, match="dim 64"):
        Retriever.open(tmp_path / "idx", encoder=BowEncoder(dim=32))
    with pytest.raises(StoreError, match="--rebuild"):
        build_index(tmp_path / "docs", tmp_path / "idx", encoder=BowEncoder(fingerprint="bow-2"))


def test_search_vector_checks_shape(tmp_path):
    _write_corpus(tmp_path / "docs")
    build_index(tmp_path / "docs", tmp_path / "idx", encoder=BowEncoder())
    with Retriever.open(tmp_path / "idx", encoder=BowEncoder()) as r:
        vec = r.encoder.encode_queries(["rocket orbit"], normalize=True)[0]
        assert r.search_vector(vec, k=2) == r.search("rocket orbit", k=2)
        with pytest.raises(StoreError, match=r"expects \(64,\)"):
            r.search_vector(np.zeros((2, 64), np.float32))


def test_changing_chunking_rechunks_everything(tmp_path):
    _write_corpus(tmp_path / "docs")
    a = build_index(tmp_path / "docs", tmp_path / "idx", encoder=BowEncoder(), chunk_size=300, chunk_overlap=50)
    b = build_index(tmp_path / "docs", tmp_path / "idx", encoder=BowEncoder(), chunk_size=600, chunk_overlap=100)
    assert b.files_changed == 4 and b.chunks_total < a.chunks_total
    with Store.open(tmp_path / "idx", device="cpu") as store:
        assert store.manifest["chunking"]["chunk_size"] == 600


def test_bad_sources_are_clear_errors_and_leave_nothing_behind(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files found"):
        build_index(tmp_path / "empty", tmp_path / "idx", encoder=BowEncoder())
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(b"png")
    with pytest.raises(DataError, match="none of the 1 files is a supported type"):
        build_index(tmp_path / "pics", tmp_path / "idx", encoder=BowEncoder())
    (tmp_path / "bins").mkdir()
    (tmp_path / "bins" / "a.txt").write_bytes(b"\x00\x00\x00")
    with pytest.raises(DataError, match="no readable files.*binary content"):
        build_index(tmp_path / "bins", tmp_path / "idx", encoder=BowEncoder())
    with pytest.raises(DataError, match="no such file"):
        build_index(tmp_path / "missing", tmp_path / "idx", encoder=BowEncoder())
    assert not (tmp_path / "idx").exists()


def test_duplicate_text_is_embedded_once(tmp_path):
    (tmp_path / "docs").mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / "docs" / name).write_text("the same sentence in three files")
    enc = BowEncoder()
    stats = build_index(tmp_path / "docs", tmp_path / "idx", encoder=enc)
    assert stats.chunks_total == 3 and stats.chunks_embedded == 1 == enc.encoded


def test_lazy_exports():
    import ragen

    assert ragen.build_index is build_index and ragen.Retriever is Retriever


def test_open_loads_the_recorded_llm2vec_gen_model(tmp_path, tiny_model):
    _write_corpus(tmp_path / "docs", paragraphs=1)
    stats = build_index(tmp_path / "docs", tmp_path / "idx", encoder=tiny_model, chunk_size=300, chunk_overlap=50)
    with Store.open(tmp_path / "idx", device="cpu") as store:
        enc = store.manifest["encoder"]
        assert enc["fingerprint"] == tiny_model.fingerprint and enc["dim"] == tiny_model.dim
        assert enc["query_instruction"] == tiny_model.query_instruction
        assert enc["document_instruction"] == tiny_model.document_instruction
        assert Path(enc["spec"]).is_absolute()
    with Retriever.open(tmp_path / "idx", device="cpu") as r:  # no encoder given: the manifest's spec
        assert r.encoder is not tiny_model and r.encoder.fingerprint == tiny_model.fingerprint
        got = r.search("rocket orbit", k=3)
    with Retriever.open(tmp_path / "idx", encoder=tiny_model) as r:
        want = r.search("rocket orbit", k=3)
    assert [h.chunk_id for h in got] == [h.chunk_id for h in want] and len(got) == 3
    np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)
    assert stats.chunks_total == 4


REAL_DOCS = {
    "photosynthesis.txt": "Photosynthesis is the process by which green plants use sunlight, water and carbon "
                          "dioxide to produce glucose and oxygen. Chlorophyll in the leaves absorbs light energy.",
    "volcanoes.md": "# Volcanoes\n\nA volcano is an opening in the Earth's crust through which molten rock, ash "
                    "and gases escape. Eruptions happen when magma pressure builds up beneath the surface.",
    "python_lists.rst": "Python lists\n============\n\nA list is a mutable sequence. You can append items, sort "
                        "them in place with list.sort(), and slice them with the bracket syntax.",
    "french_revolution.html": "<html><head><title>The French Revolution</title></head><body><p>The French "
                              "Revolution began in 1789 with the storming of the Bastille and ended the absolute "
                              "monarchy of Louis XVI.</p></body></html>",
    "coffee.txt": "Coffee beans are roasted seeds of the Coffea plant. Brewing extracts caffeine and aromatic oils; "
                  "espresso forces hot water through finely ground coffee under pressure.",
    "black_holes.txt": "A black hole is a region of spacetime where gravity is so strong that nothing, not even "
                       "light, can escape once it crosses the event horizon.",
}


def test_minilm_ranks_the_right_document_first(tmp_path, minilm):
    (tmp_path / "docs").mkdir()
    for name, text in REAL_DOCS.items():
        (tmp_path / "docs" / name).write_text(text)
    build_index(tmp_path / "docs", tmp_path / "idx", encoder=minilm)
    queries = {
        "How do plants turn light into food?": "photosynthesis.txt",
        "What causes an eruption of molten rock?": "volcanoes.md",
        "how to sort a list in python": "python_lists.rst",
        "When was the Bastille stormed?": "french_revolution.html",
        "how is espresso made": "coffee.txt",
        "What is an event horizon?": "black_holes.txt",
    }
    with Retriever.open(tmp_path / "idx", encoder=minilm, device="cpu") as r:
        for q, expected in queries.items():
            hits = r.search(q, k=3)
            assert hits[0].path == expected, (q, [h.path for h in hits])
            assert 0 < hits[0].score <= 1.0001
