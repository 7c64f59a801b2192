"""HTML and PDF text extraction (ragen.extract): main content kept, navigation dropped, code verbatim."""

from __future__ import annotations

import pytest

from ragen.extract import ExtractionError, html_to_text, pdf_to_text
from tests.test_corpus import make_pdf

ARTICLE = " ".join(f"Photosynthesis converts light energy into chemical energy stored in sugar molecule {i}."
                   for i in range(12))
PAGE = f"""<!DOCTYPE html><html><head><title>Leaves — Botany docs</title></head><body>
<div class="related" role="navigation"><ul><li><a href="genindex.html">index</a></li>
<li><a href="modules.html">modules</a> |</li><li><a href="next.html">next</a> |</li></ul></div>
<div class="sphinxsidebar" role="navigation"><h3>Quick search</h3><h4>Previous topic</h4>
<p><a href="roots.html">Roots and soil chemistry</a></p><h3>This Page</h3><ul><li>Report a Bug</li>
<li>Show Source</li></ul></div>
<div class="body" role="main"><h1>Leaves</h1><p>{ARTICLE}</p>
<dl><dt>grow(light)</dt><dd><p>Grow a leaf. Example:</p>
<div class="highlight"><pre>def grow(light):
    if light &gt; 0:
        return light * 2
    return 0</pre></div></dd></dl>
<p>{ARTICLE}</p></div>
<div class="footer">&copy; Copyright 2026, Botany Foundation. Theme by Example Themes.</div>
</body></html>"""


def test_main_content_is_kept_and_navigation_dropped():
    text = html_to_text(PAGE)
    assert text.startswith("Leaves — Botany docs")
    assert "sugar molecule 11" in text
    for chrome in ("Quick search", "Previous topic", "Report a Bug", "Show Source", "Theme by Example"):
        assert chrome not in text, chrome


def test_code_blocks_keep_their_lines_and_indentation():
    lines = html_to_text(PAGE).splitlines()
    block = ["def grow(light):", "    if light > 0:", "        return light * 2", "    return 0"]
    start = lines.index(block[0])
    assert lines[start:start + 4] == block


def test_html5_without_head_end_keeps_its_body():
    html = ("<!doctype html><html><head><title>T</title><meta charset=utf-8>"
            f"<body><p>{ARTICLE}</p>")
    text = html_to_text(html)
    assert "sugar molecule 11" in text and text.startswith("T\n")


def test_a_link_list_page_is_not_reduced_to_its_title():
    links = "".join(f'<li><a href="m{i}.html">module number {i} for plant chemistry</a></li>' for i in range(40))
    html = f"<html><head><title>Modules</title></head><body><ul>{links}</ul></body></html>"
    text = html_to_text(html)
    assert "module number 39 for plant chemistry" in text


def test_pathological_pages_keep_their_words():
    for depth in (1000, 100_000):  # inscriptis recursion; libxml2's depth limit
        html = "<div>" * depth + "deep &amp; nested words" + "</div>" * depth
        assert "deep & nested words" in html_to_text(html)
    assert html_to_text('<?xml version="1.0" encoding="utf-8"?><html><body><p>xhtml words</p></body></html>') \
        == "xhtml words"
    assert html_to_text("") == html_to_text("<!-- only a comment -->") == ""
    assert html_to_text("<script>alert(1)</script><style>p{}</style><p>Visible</p>") == "Visible"


def test_page_text_that_looks_like_a_placeholder_is_left_alone():
    html = "<html><body><p>the token ragenpre0x is mine</p><pre>  x = 1</pre></body></html>"
    text = html_to_text(html)
    assert "the token ragenpre0x is mine" in text and "  x = 1" in text.splitlines()


def test_extraction_is_deterministic():
    assert html_to_text(PAGE) == html_to_text(PAGE)


def test_pdf_text_from_bytes_and_path(tmp_path):
    data = make_pdf(["Photosynthesis in leaves", "Second page here"])
    path = tmp_path / "paper.pdf"
    path.write_bytes(data)
    assert pdf_to_text(data) == pdf_to_text(path)
    text = pdf_to_text(data)
    assert "Photosynthesis in leaves" in text and "Second page here" in text
    assert text.index("Photosynthesis") < text.index("Second page")


def test_a_broken_pdf_is_one_clear_error():
    with pytest.raises(ExtractionError, match="not a readable PDF"):
        pdf_to_text(b"%PDF-1.4 this is not really a pdf")
