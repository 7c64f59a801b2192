"""Hostile and accidental corpora (issue 15): symlink swaps after the scan, non-UTF-8 names, special files,
deep trees, unreadable folders, size caps, HTML5 without </head>; and file selection (issue 14)."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

from ragen.corpus import (FileSelection, SkipFile, SourceFile, html_to_text, parse_size, read_bytes_safely,
                          read_document, scan)
from ragen.errors import DataError

from ._hash_encoder import HashEncoder


def _relpaths(report):
    return [f.relpath for f in report.files]


# ---------------------------------------------------------------------------------------------- races
def test_file_swapped_for_a_symlink_after_the_scan_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("the launch codes")
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.txt").write_text("harmless")
    (root / "b.txt").write_text("also harmless")
    files = {f.relpath: f for f in scan(root).files}
    (root / "a.txt").unlink()
    os.symlink(outside / "secret.txt", root / "a.txt")  # the swap, after the scan
    os.unlink(root / "b.txt")
    os.symlink(root / "a.txt", root / "b.txt")  # even a symlink to a file inside the root
    for name in ("a.txt", "b.txt"):
        with pytest.raises(SkipFile, match="symlink"):
            read_document(files[name])


def test_folder_swapped_for_a_symlink_after_the_scan_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "notes.txt").write_text("the launch codes")
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "notes.txt").write_text("harmless")
    (sf,) = scan(root).files
    shutil.rmtree(root / "sub")
    os.symlink(outside, root / "sub")  # sub/notes.txt now names the outside file
    with pytest.raises(SkipFile, match="outside the indexed folder"):
        read_document(sf)


def test_a_swap_during_build_index_is_skipped_and_counted(tmp_path):
    from ragen.retriever import Retriever, build_index, scan_source

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("launch codes are here")
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.txt").write_text("photosynthesis makes sugar")
    (root / "b.txt").write_text("orbits are falling around the earth")
    scanned = scan_source(root, tmp_path / "idx")
    (root / "b.txt").unlink()
    os.symlink(outside / "secret.txt", root / "b.txt")
    enc = HashEncoder()
    stats = build_index(root, tmp_path / "idx", encoder=enc, scanned=scanned)
    assert stats.files_indexed == 1 and stats.files_skipped == 1
    assert stats.skipped_files == (("b.txt", "became a symlink after the scan (not followed)"),)
    with Retriever.open(tmp_path / "idx", encoder=enc) as r:
        assert all("launch" not in h.text for h in r.search("launch codes", k=5))


# ---------------------------------------------------------------------------------------------- names
def test_non_utf8_file_name_is_indexed_under_an_escaped_name_and_reruns(tmp_path):
    from ragen.retriever import build_index

    root = tmp_path / "root"
    root.mkdir()
    raw = os.path.join(os.fsencode(root), b"caf\xe9.txt")
    with open(raw, "wb") as f:
        f.write(b"coffee with milk")
    (root / "ok.txt").write_text("plain name")
    report = scan(root)
    assert _relpaths(report) == ["caf\\xe9.txt", "ok.txt"]
    assert read_document(report.files[0]).text == "coffee with milk"
    enc = HashEncoder()
    first = build_index(root, tmp_path / "idx", encoder=enc)
    assert first.files_indexed == 2
    again = build_index(root, tmp_path / "idx", encoder=enc)  # the re-run works too, and finds it unchanged
    assert again.files_indexed == 2 and again.files_changed == 0 and again.chunks_embedded == 0


# ---------------------------------------------------------------------------------------------- special files
def test_fifo_is_skipped_without_hanging(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    os.mkfifo(tmp_path / "pipe.txt")
    report = scan(tmp_path)
    assert _relpaths(report) == ["a.txt"]
    assert report.skipped["not a regular file (FIFO, socket or device)"] == 1
    # a FIFO that appears where the scan saw a file: opened non-blocking and refused, no hang
    fake = SourceFile("pipe.txt", tmp_path / "pipe.txt", 0, 0, tmp_path)
    with pytest.raises(SkipFile, match="not a regular file"):
        read_document(fake)


def test_character_device_is_refused_not_read(tmp_path):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    with pytest.raises(SkipFile, match="not a regular file"):
        read_bytes_safely(SourceFile("zero.txt", __import__("pathlib").Path("/dev/zero"), 0, 0, None))
    report = scan("/dev/zero")  # given as the path itself
    assert report.files == [] and report.files_skipped == 1


def test_symlink_loop_is_counted_not_fatal(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    os.symlink(tmp_path / "loop1.txt", tmp_path / "loop2.txt")
    os.symlink(tmp_path / "loop2.txt", tmp_path / "loop1.txt")
    os.symlink(tmp_path / "self", tmp_path / "self")
    report = scan(tmp_path)
    assert _relpaths(report) == ["a.txt"]
    assert report.skipped["broken or non-file symlink"] == 3


def test_1100_nested_folders_are_walked_without_recursion(tmp_path):
    chain = []
    d = tmp_path
    for _ in range(1100):
        d = d / "d"
        os.mkdir(d)
        chain.append(d)
    (d / "deep.txt").write_text("bottom")
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(200)  # a recursive walk could not get 1,100 levels down under this limit
    try:
        report = scan(tmp_path)
    finally:
        sys.setrecursionlimit(limit)
        # remove the tree bottom-up here: pytest's own clean-up of old temp folders (shutil.rmtree)
        # recurses and would fail on it in a later session
        (d / "deep.txt").unlink()
        for folder in reversed(chain):
            folder.rmdir()
    assert len(report.files) == 1 and report.files[0].relpath.endswith("d/deep.txt")
    assert report.files[0].relpath.count("/") == 1100


def test_unlistable_folder_is_counted_and_the_rest_indexed(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "b.txt").write_text("beta")
    (tmp_path / "open").mkdir()
    (tmp_path / "open" / "c.txt").write_text("gamma")
    real_scandir = os.scandir

    def scandir(path):  # what a folder without the x permission does for a non-root user
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    report = scan(tmp_path)
    assert _relpaths(report) == ["a.txt", "open/c.txt"]
    assert report.folders_skipped == {"unreadable folder (Permission denied)": 1}
    assert report.skipped_folders == [("locked", "unreadable folder (Permission denied)")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_folder_without_x_permission_does_not_abort_the_scan(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "b.txt").write_text("beta")
    os.chmod(tmp_path / "locked", 0o600)
    try:
        report = scan(tmp_path)
    finally:
        os.chmod(tmp_path / "locked", 0o700)
    assert _relpaths(report) == ["a.txt"] and sum(report.folders_skipped.values()) == 1


def test_hidden_and_dependency_folders_and_hidden_files_are_counted(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".venv").mkdir()
    (tmp_path / "node_modules").mkdir()
    (tmp_path / ".env.txt").write_text("SECRET=1")
    report = scan(tmp_path)
    assert _relpaths(report) == ["a.txt"]
    assert report.folders_skipped == {"hidden folder": 2, "dependency or cache folder": 1}
    assert report.skipped["hidden file"] == 1


def test_size_cap_skips_and_counts_large_files(tmp_path):
    (tmp_path / "small.txt").write_text("x" * 100)
    (tmp_path / "big.txt").write_text("y" * 5000)
    report = scan(tmp_path, selection=FileSelection(max_file_size=1000))
    assert _relpaths(report) == ["small.txt"]
    assert report.skipped_files == [("big.txt", "larger than --max-file-size (1000 B)")]
    assert _relpaths(scan(tmp_path, selection=FileSelection(max_file_size=0))) == ["big.txt", "small.txt"]
    # a file that grew after the scan is cut off at read time, not read whole
    (sf,) = [f for f in scan(tmp_path).files if f.relpath == "small.txt"]
    (tmp_path / "small.txt").write_text("z" * 5000)
    with pytest.raises(SkipFile, match="larger than"):
        read_document(sf, max_file_size=1000)


@pytest.mark.parametrize("text,expected", [("50MB", 50 * 1024 ** 2), ("800k", 800 * 1024), ("2G", 2 * 1024 ** 3),
                                           ("1234", 1234), ("0", 0), ("1.5 MiB", int(1.5 * 1024 ** 2))])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "lots", "-5", "5 XB", "9" * 60])
def test_parse_size_rejects_nonsense_in_one_line(bad):
    with pytest.raises(DataError, match="expected a number of bytes"):
        parse_size(bad)


def test_index_folder_equal_to_the_root_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    with pytest.raises(DataError, match="is the index folder itself"):
        scan(tmp_path, exclude=(tmp_path,))


def test_html5_without_head_end_tag_keeps_its_body():
    html = "<!doctype html><html><head><title>Bread</title><meta charset=utf-8><p>Knead the dough.<p>Bake it."
    text = html_to_text(html)
    assert "Knead the dough." in text and "Bake it." in text and text.startswith("Bread")
    assert "alert" not in html_to_text("<head><script>alert(1)</script><body>visible")
    assert html_to_text("<head><script>alert(1)</script><body>visible").strip() == "visible"


# ---------------------------------------------------------------------------------------------- selection
def _repo(tmp_path):
    root = tmp_path / "repo"
    (root / ".git").mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "build").mkdir()
    (root / "bench" / "run1").mkdir(parents=True)
    (root / "README.md").write_text("readme")
    (root / "docs" / "guide.md").write_text("guide")
    (root / "docs" / "notes.txt").write_text("notes")
    (root / "docs" / "debug.log").write_text("log")
    (root / "docs" / "keep.log").write_text("kept log")
    (root / "build" / "out.txt").write_text("built")
    (root / "bench" / "run1" / "report.json").write_text('{"a": "b"}')
    (root / ".gitignore").write_text("build/\n*.log\n")
    (root / "docs" / ".gitignore").write_text("!keep.log\n")
    return root


def test_gitignore_is_honoured_inside_a_repository_and_can_be_turned_off(tmp_path):
    root = _repo(tmp_path)
    report = scan(root)
    assert _relpaths(report) == ["README.md", "bench/run1/report.json", "docs/guide.md", "docs/keep.log",
                                 "docs/notes.txt"]
    assert ("docs/debug.log", "ignored by .gitignore") in report.skipped_files
    assert ("build", "ignored by .gitignore") in report.skipped_folders
    everything = scan(root, selection=FileSelection(gitignore=False))
    assert "build/out.txt" in _relpaths(everything) and "docs/debug.log" in _relpaths(everything)
    # scanning a subfolder of the repository still applies the repository's top-level .gitignore
    assert _relpaths(scan(root / "docs")) == ["guide.md", "keep.log", "notes.txt"]


def test_include_and_exclude_globs(tmp_path):
    root = _repo(tmp_path)
    only_md = scan(root, selection=FileSelection(include=("*.md",)))
    assert _relpaths(only_md) == ["README.md", "docs/guide.md"]
    assert ("docs/notes.txt", "does not match --include") in only_md.skipped_files
    no_reports = scan(root, selection=FileSelection(exclude=("**/report.json", "docs/")))
    assert _relpaths(no_reports) == ["README.md"]
    assert ("docs", "matches --exclude") in no_reports.skipped_folders
    assert ("bench/run1/report.json", "matches --exclude") in no_reports.skipped_files


def test_file_selection_round_trips_and_tolerates_junk():
    sel = FileSelection(include=("*.md",), exclude=("x/",), gitignore=False, max_file_size=10)
    assert FileSelection.from_dict(sel.to_dict()) == sel
    assert FileSelection.from_dict(["not", "a", "dict"]) == FileSelection()
    assert FileSelection.from_dict({"include": "*.md", "max_file_size": "big", "gitignore": None}) == FileSelection()
    with pytest.raises(DataError, match="file pattern"):
        FileSelection(include=("  ",))


def test_symlink_into_the_index_folder_is_skipped(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "notes.txt").write_text("index internals")
    os.symlink(tmp_path / "idx" / "notes.txt", tmp_path / "peek.txt")
    report = scan(tmp_path, exclude=(tmp_path / "idx",))
    assert _relpaths(report) == ["a.txt"]
    assert report.skipped_files == [("peek.txt", "symlink into the index folder")]
    assert report.skipped_folders == [("idx", "the index folder")]
