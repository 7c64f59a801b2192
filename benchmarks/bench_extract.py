"""Text extraction, measured: which HTML and PDF extractor should ragen use?

HTML quality is scored on Sphinx documentation pages, whose `<div role="main">` marks the article, so every
page carries its own ground truth:
- main recall: share of the article's distinct words found in the extracted text;
- chrome: share of the page's navigation lines (text outside the article: sidebars, "Previous topic",
  "Show Source", breadcrumbs) that leak into the extracted text as lines of their own;
- code kept: share of `<pre>` blocks whose every line, leading indentation included, appears as a line.
PDF extractors are compared by speed and by the overlap of their word sets.

    python benchmarks/bench_extract.py --html-dir PYDOC_HTML --pages 60 --pdf some.pdf

``PYDOC_HTML``: a folder of real Sphinx pages (the ``html`` folder of Debian's python3.11-doc package;
any Sphinx-built HTML tree works).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

WORD = re.compile(r"\w+")


def _words(text: str) -> set[str]:
    return {w.lower() for w in WORD.findall(text)}


def ground_truth(html: str) -> tuple[set[str], list[str], list[list[str]]] | None:
    import lxml.html

    tree = lxml.html.fromstring(html)
    main = tree.xpath('//div[@role="main"]')
    if not main:
        return None
    main = main[0]
    main_text = main.text_content()
    pres = [[ln.rstrip() for ln in pre.text_content().splitlines() if ln.strip()] for pre in main.iter("pre")]
    parent = main.getparent()  # chrome = the page without the article (and without <title>, kept on purpose)
    parent.remove(main)
    for bad in tree.xpath("//script|//style|//title"):
        bad.getparent().remove(bad)
    chrome_lines = {ln.strip() for ln in tree.text_content().splitlines() if len(ln.strip()) >= 4}
    main_words = _words(main_text)
    # a chrome line counts only if it is not also article text (titles repeat in both)
    chrome = [ln for ln in chrome_lines if ln not in main_text]
    return main_words, chrome, [p for p in pres if p]


def score(text: str, truth) -> dict:
    main_words, chrome, pres = truth
    lines = {ln.rstrip() for ln in text.splitlines()}
    stripped = {ln.strip() for ln in lines}
    got = _words(text)
    recall = len(main_words & got) / max(1, len(main_words))
    leak = sum(1 for c in chrome if c in stripped) / max(1, len(chrome))
    code = (sum(1 for p in pres if all(ln in lines for ln in p)) / len(pres)) if pres else None
    return {"recall": recall, "chrome": leak, "code": code}


def html_extractors() -> dict:
    out = {}  # the former hand-written parser (ragen.corpus before ragen.extract) is gone; its row is in the docstring
    try:
        import trafilatura

        def traf(html: str) -> str:
            return trafilatura.extract(html, include_comments=False, include_tables=True, favor_recall=True,
                                       deduplicate=False) or ""
        out["trafilatura"] = traf
    except ImportError:
        pass
    try:
        import inscriptis

        out["inscriptis"] = inscriptis.get_text
    except ImportError:
        pass
    try:
        from ragen import extract

        out["ragen.extract"] = extract.html_to_text
    except (ImportError, AttributeError):
        pass
    return out


def bench_html(folder: Path, pages: int) -> dict:
    files = sorted(p for p in folder.rglob("*.html") if "genindex" not in p.name and "_static" not in p.parts)
    step = max(1, len(files) // pages)
    files = files[::step][:pages]
    docs = []
    for f in files:
        html = f.read_text(encoding="utf-8", errors="replace")
        truth = ground_truth(html)
        if truth is not None:
            docs.append((f, html, truth))
    results = {}
    for name, fn in html_extractors().items():
        scores, t0 = [], time.perf_counter()
        for _, html, truth in docs:
            scores.append(score(fn(html), truth))
        elapsed = time.perf_counter() - t0
        codes = [s["code"] for s in scores if s["code"] is not None]
        results[name] = {
            "pages": len(docs),
            "main_recall": statistics.mean(s["recall"] for s in scores),
            "chrome_leak": statistics.mean(s["chrome"] for s in scores),
            "code_kept": statistics.mean(codes) if codes else None,
            "ms_per_page": 1000 * elapsed / max(1, len(docs)),
        }
    return results


def pdf_extractors() -> dict:
    out = {}
    try:
        from pypdf import PdfReader

        def pypdf_text(path: Path) -> str:
            return "\n".join(page.extract_text() or "" for page in PdfReader(str(path)).pages)
        out["pypdf"] = pypdf_text
    except ImportError:
        pass
    try:
        import pypdfium2 as pdfium

        def pdfium_text(path: Path) -> str:
            doc = pdfium.PdfDocument(str(path))
            try:
                return "\n".join(doc[i].get_textpage().get_text_range() for i in range(len(doc)))
            finally:
                doc.close()
        out["pypdfium2"] = pdfium_text
    except ImportError:
        pass
    return out


def bench_pdf(paths: list[Path]) -> dict:
    results = {}
    texts: dict[str, dict[str, set[str]]] = {}
    for name, fn in pdf_extractors().items():
        t0 = time.perf_counter()
        texts[name] = {str(p): _words(fn(p)) for p in paths}
        results[name] = {"files": len(paths), "s_total": time.perf_counter() - t0}
    names = list(texts)
    if len(names) >= 2:
        a, b = names[0], names[1]
        overlaps = [len(texts[a][k] & texts[b][k]) / max(1, len(texts[a][k] | texts[b][k])) for k in texts[a]]
        results["word_jaccard_" + a + "_vs_" + b] = statistics.mean(overlaps) if overlaps else None
        results["speedup_" + b + "_over_" + a] = results[a]["s_total"] / max(1e-9, results[b]["s_total"])
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--html-dir", type=Path)
    ap.add_argument("--pages", type=int, default=60)
    ap.add_argument("--pdf", type=Path, action="append", default=[])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    report = {}
    if args.html_dir:
        report["html"] = bench_html(args.html_dir, args.pages)
    if args.pdf:
        report["pdf"] = bench_pdf(args.pdf)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for name, r in report.get("html", {}).items():
        code = "n/a" if r["code_kept"] is None else f"{100 * r['code_kept']:.1f}%"
        print(f"html {name:14s} pages={r['pages']} main recall {100 * r['main_recall']:.1f}%  chrome leaked "
              f"{100 * r['chrome_leak']:.1f}%  code kept {code}  {r['ms_per_page']:.1f} ms/page")
    for name, r in report.get("pdf", {}).items():
        print(f"pdf {name}: {r}")


if __name__ == "__main__":
    main()
