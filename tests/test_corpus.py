"""Folder walking, text extraction and chunking (ragen.corpus)."""

from __future__ import annotations

import json
import os
import random

import pytest

from ragen.corpus import (ChunkingConfig, SkipFile, chunk_document, chunk_spans, content_hash, decode_bytes,
                          html_to_text, read_document, scan)
from ragen.errors import DataError


def make_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF with one Helvetica text line per page (correct xref offsets)."""
    objs = ["<< /Type /Catalog /Pages 2 0 R >>", None, "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET"
        objs.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        content_no = len(objs)
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {content_no} 0 R "
                    "/Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(f"{len(objs)} 0 R")
    objs[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(pages)} >>"
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    for off in offsets:
        out += f"{off:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def _prose(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["light", "plants", "sugar", "water", "the", "of", "energy", "cells", "leaf", "grow"]
    parts = []
    for i in range(n_words):
        w = rng.choice(words)
        parts.append(w + ("." if i % 11 == 10 else "") + ("\n\n" if i % 60 == 59 else " "))
    return "".join(parts)


# ---------------------------------------------------------------------------------------------- chunking
@pytest.mark.parametrize("size,overlap", [(1000, 200), (100, 20), (64, 0), (300, 149)])
def test_chunks_cover_text_with_overlap_and_exact_offsets(size, overlap):
    text = _prose(3000, seed=size)
    cfg = ChunkingConfig(size, overlap)
    spans = chunk_spans(text, cfg)
    assert len(spans) > 3
    for s, e in spans:
        assert 0 < e - s <= size
        assert not text[s].isspace() and not text[e - 1].isspace()
    for (s1, e1), (s2, e2) in zip(spans, spans[1:]):
        assert s1 < s2 <= e1 + (len(text[e1:s2]) - len(text[e1:s2].lstrip()))  # no gap except whitespace
        if overlap:
            assert e1 - s2 > 0  # consecutive chunks share text
            assert e1 - s2 <= overlap
    # every non-space character is covered by some chunk
    covered = set()
    for s, e in spans:
        covered.update(range(s, e))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())


def test_chunks_prefer_paragraph_and_sentence_boundaries():
    para = "This is one sentence about plants. " * 10  # 350 chars
    text = (para.strip() + "\n\n") * 6
    spans = chunk_spans(text, ChunkingConfig(1000, 200))
    for s, e in spans[:-1]:
        assert text[e - 1] == "."  # every cut lands at the end of a sentence, never mid-word
    for s, _ in spans[1:]:
        assert text[s - 1].isspace()  # and every overlap begins at a word start


def test_chunk_without_boundaries_is_hard_cut():
    text = "x" * 2500
    spans = chunk_spans(text, ChunkingConfig(1000, 200))
    assert spans[0] == (0, 1000)
    assert spans[1][0] == 800
    assert spans[-1][1] == 2500


def test_chunk_ids_hashes_and_stability(tmp_path):
    f = tmp_path / "doc.md"
    f.write_text(_prose(800))
    report = scan(tmp_path)
    doc = read_document(report.files[0])
    chunks = chunk_document(doc, ChunkingConfig(400, 80))
    assert [c.chunk_id for c in chunks] == [f"doc.md#{i}" for i in range(len(chunks))]
    for c in chunks:
        assert doc.text[c.start:c.end] == c.text
        assert c.content_hash == content_hash(c.text) and len(c.content_hash) == 64
    again = chunk_document(read_document(scan(tmp_path).files[0]), ChunkingConfig(400, 80))
    assert again == chunks


def test_default_chunks_fit_llm2vec_gen_token_limit():
    # 1000 characters of English stay well under 512 tokens of a byte-level BPE (~4 chars per token)
    assert ChunkingConfig().chunk_size <= 1200 and ChunkingConfig().chunk_overlap < ChunkingConfig().chunk_size // 2


@pytest.mark.parametrize("size,overlap", [(10, 0), (100, 50), (100, -1), (100, 100)])
def test_bad_chunking_settings_are_rejected(size, overlap):
    with pytest.raises(DataError, match="chunk"):
        ChunkingConfig(size, overlap)


def test_whitespace_only_text_has_no_chunks():
    assert chunk_spans(" \n\n\t  ", ChunkingConfig()) == []


# ---------------------------------------------------------------------------------------------- scanning
def test_scan_finds_supported_files_and_counts_the_rest(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    (tmp_path / "sub" / "deep" / "b.py").write_text("print('b')")
    (tmp_path / "sub" / "c.json").write_text('{"x": "y"}')
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "archive.zip").write_bytes(b"PK")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config.txt").write_text("hidden")
    (tmp_path / "node_modules").mkdir()
    (tmp_path / "node_modules" / "x.js").write_text("x")
    (tmp_path / "README").write_text("readme")
    report = scan(tmp_path)
    assert [f.relpath for f in report.files] == ["README", "a.txt", "sub/c.json", "sub/deep/b.py"]
    assert report.skipped["unsupported type"] == 2
    assert report.files_skipped == 2


def test_scan_never_follows_symlinks_out_of_the_root(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    root = tmp_path / "root"
    root.mkdir()
    (root / "inside.txt").write_text("inside")
    os.symlink(outside / "secret.txt", root / "link_out.txt")
    os.symlink(root / "inside.txt", root / "link_in.txt")
    os.symlink(outside, root / "linked_dir")
    os.symlink(root / "missing.txt", root / "broken.txt")
    report = scan(root)
    assert [f.relpath for f in report.files] == ["inside.txt", "link_in.txt"]
    assert report.skipped["symlink pointing outside the root"] == 1
    assert report.skipped["broken or non-file symlink"] == 1
    assert report.skipped["symlinked directory (not followed)"] == 1
    assert report.files_skipped == 3


def test_scan_excludes_the_index_directory(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "indexes" / "default").mkdir(parents=True)
    (tmp_path / "indexes" / "default" / "manifest.json").write_text("{}")
    report = scan(tmp_path, exclude=(tmp_path / "indexes" / "default",))
    assert [f.relpath for f in report.files] == ["a.txt"]


def test_scan_missing_path_raises(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        scan(tmp_path / "nope")


def test_scan_single_file(tmp_path):
    (tmp_path / "one.md").write_text("# one")
    report = scan(tmp_path / "one.md")
    assert [f.relpath for f in report.files] == ["one.md"]


# ---------------------------------------------------------------------------------------------- reading
def _read(tmp_path, name: str, data: bytes):
    (tmp_path / name).write_bytes(data)
    return read_document(next(f for f in scan(tmp_path).files if f.relpath == name))


def test_bad_utf8_is_replaced_and_reported(tmp_path):
    doc = _read(tmp_path, "latin.txt", "café au lait".encode("latin-1"))
    assert doc.replaced and "\ufffd" in doc.text and doc.text.startswith("caf")
    ok = _read(tmp_path, "ok.txt", "café".encode())
    assert not ok.replaced and ok.text == "café"


def test_bom_and_utf16_are_decoded():
    assert decode_bytes(b"\xef\xbb\xbfhello") == ("hello", False)
    assert decode_bytes("héllo".encode("utf-16")) == ("héllo", False)


def test_binary_files_are_skipped(tmp_path):
    with pytest.raises(SkipFile, match="binary"):
        _read(tmp_path, "blob.txt", b"abc\x00\x01\x02" * 10)


def test_html_keeps_visible_text_only(tmp_path):
    html = ("<html><head><title>Sky colour</title><style>p{color:red}</style></head><body>"
            "<script>var secret = 1;</script><h1>Why blue?</h1><p>Rayleigh &amp; Mie scattering.</p>"
            "<ul><li>one</li><li>two</li></ul></body></html>")
    doc = _read(tmp_path, "page.html", html.encode())
    assert doc.text.startswith("Sky colour")
    assert "Rayleigh & Mie scattering." in doc.text and "Why blue?" in doc.text
    assert "secret" not in doc.text and "color:red" not in doc.text and "<p>" not in doc.text
    assert html_to_text("<p>a</p><p>b</p>").split() == ["a", "b"]


def test_html_is_read_by_the_library_extractor(tmp_path):
    """Navigation chrome is dropped and code keeps its indentation (the old hand-written parser kept the
    chrome and flattened <pre>)."""
    from tests.test_extract import PAGE

    doc = _read(tmp_path, "leaves.html", PAGE.encode())
    assert "sugar molecule 11" in doc.text and "Quick search" not in doc.text and "Report a Bug" not in doc.text
    assert "        return light * 2" in doc.text.splitlines()


def test_json_and_jsonl_text_fields(tmp_path):
    data = {"title": "Plants", "meta": {"year": 2020, "tags": ["bio", "light"]}, "body": "They grow."}
    doc = _read(tmp_path, "d.json", json.dumps(data).encode())
    assert doc.text.split("\n") == ["Plants", "bio", "light", "They grow."]
    lines = "\n".join([json.dumps({"text": "first record"}), "{not json", json.dumps({"text": "second"})])
    doc = _read(tmp_path, "d.jsonl", lines.encode())
    assert doc.text == "first record\n\nsecond"
    with pytest.raises(SkipFile, match="invalid JSON"):
        _read(tmp_path, "bad.json", b"{oops")


def test_pdf_text_is_extracted(tmp_path):
    doc = _read(tmp_path, "paper.pdf", make_pdf(["Photosynthesis in leaves", "Second page here"]))
    assert "Photosynthesis in leaves" in doc.text and "Second page here" in doc.text
    assert doc.text.index("Photosynthesis") < doc.text.index("Second")
    with pytest.raises(SkipFile, match="PDF"):
        _read(tmp_path, "broken.pdf", b"%PDF-1.4 this is not really a pdf")


def test_pathological_json_is_skipped_not_fatal(tmp_path):
    with pytest.raises(SkipFile, match="JSON"):
        _read(tmp_path, "huge.json", b'{"n": ' + b"9" * 5000 + b"}")  # int too large to convert
    with pytest.raises(SkipFile, match="JSON"):
        _read(tmp_path, "deep.json", b"[" * 100_000 + b"]" * 100_000)  # recursion limit
    doc = _read(tmp_path, "mixed.jsonl", b'{"t": "kept line"}\n[' + b"[" * 100_000 + b"\n" + b"9" * 5000 + b"\n")
    assert doc.text == "kept line"


def test_lone_surrogates_from_json_escapes_are_replaced(tmp_path):
    doc = _read(tmp_path, "emoji.json", json.dumps({"t": "broken \ud83d emoji"}).encode())
    assert doc.replaced and "broken" in doc.text
    doc.text.encode("utf-8")  # strict UTF-8 now: tokenizers and SQLite accept it


def test_any_pdf_parser_failure_skips_the_file(tmp_path, monkeypatch):
    import pypdfium2

    def explode(*args, **kwargs):
        raise pypdfium2.PdfiumError("decompression limit")

    monkeypatch.setattr(pypdfium2, "PdfDocument", explode)
    with pytest.raises(SkipFile, match="unreadable PDF.*decompression limit"):
        _read(tmp_path, "bomb.pdf", make_pdf(["x"]))


def encrypt_pdf(data: bytes) -> bytes:
    """``data`` with a standard-security /Encrypt entry whose user password is not empty (RC4, R2): no reader
    can open it without the password."""
    head, _, tail = data.rpartition(b"trailer\n")
    objs = head.count(b" 0 obj\n")
    enc_no = objs + 1
    offset = len(head)
    body = (f"{enc_no} 0 obj\n<< /Filter /Standard /V 1 /R 2 /O <{'ab' * 32}> /U <{'cd' * 32}> /P -4 >>\nendobj\n"
            ).encode()
    xref_at = head.index(b"xref\n")
    objects, xref = head[:xref_at], head[xref_at:]
    offset = len(objects)
    lines = xref.decode().split("\n")
    lines[1] = f"0 {enc_no + 1}"
    lines.insert(len(lines) - 1, f"{offset:010d} 00000 n ")
    new_xref_at = len(objects) + len(body)
    trailer = (f"trailer\n<< /Size {enc_no + 1} /Root 1 0 R /Encrypt {enc_no} 0 R /ID [<{'01' * 16}> <{'01' * 16}>] >>\n"
               f"startxref\n{new_xref_at}\n%%EOF\n").encode()
    return objects + body + "\n".join(lines).encode() + trailer


def test_encrypted_pdf_is_skipped_and_counted(tmp_path):
    import numpy as np

    from ragen.retriever import build_index

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "locked.pdf").write_bytes(encrypt_pdf(make_pdf(["Secret plans"])))
    (tmp_path / "src" / "note.txt").write_text("Open notes about leaves.")
    with pytest.raises(SkipFile, match="encrypted PDF"):
        _read(tmp_path, "locked2.pdf", encrypt_pdf(make_pdf(["Secret plans"])))

    class Tiny:
        dim, spec, fingerprint = 4, "tiny", "tiny-1"

        def encode_documents(self, texts, *, batch_size=32, normalize=False):
            return np.ones((len(texts), 4), dtype=np.float32) / 2

    stats = build_index(tmp_path / "src", tmp_path / "idx", encoder=Tiny())
    assert stats.files_indexed == 1 and dict(stats.skipped).get("encrypted PDF (needs a password)") == 1
    assert ("locked.pdf", "encrypted PDF (needs a password)") in stats.skipped_files


def test_one_bad_file_does_not_stop_an_index_run(tmp_path):
    """A folder with a pathological file still indexes the rest; the bad file is counted as skipped."""
    import numpy as np

    from ragen.retriever import build_index

    class Tiny:  # a deterministic encoder: the test is about ingestion, not embeddings
        dim, spec, fingerprint = 8, "tiny", "tiny-1"

        def encode_documents(self, texts, *, batch_size=32, normalize=False):
            rng = [np.random.default_rng(abs(hash(t)) % 2**32).normal(size=8) for t in texts]
            v = np.array(rng, dtype=np.float32).reshape(len(texts), 8)
            return v / np.linalg.norm(v, axis=1, keepdims=True)

        encode_queries = encode_documents

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.txt").write_text("a perfectly ordinary document")
    (docs / "deep.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    (docs / "emoji.json").write_text(json.dumps({"t": "lone \ud83d half"}))
    stats = build_index(docs, tmp_path / "idx", encoder=Tiny())
    assert stats.files_indexed == 2 and stats.files_skipped == 1
    assert "emoji.json" in stats.files_with_replacements


def test_no_chunk_lies_inside_the_previous_one():
    """Fuzzed texts with whitespace runs: every chunk must add text (a chunk contained in the previous one
    wastes an embedding and duplicates a hit)."""
    rng = random.Random(7)
    alphabet = "ad. \n"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        size = rng.randint(16, 32)
        spans = chunk_spans(text, ChunkingConfig(size, rng.randint(0, size // 2 - 1)))
        for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
            assert s1 > s0 and e1 > e0, (text, spans)
        assert chunk_spans("adddddd\n\n. a \n\n  ", ChunkingConfig(16, 7)) == [(0, 12)]
