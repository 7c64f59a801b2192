"""`ragen index FOLDER` and a framework vector store sharing one index: the folder run reconciles only the
files of its scan and leaves the documents the framework added alone (eco helper's report, issue 13)."""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_core")

from typer.testing import CliRunner  # noqa: E402

from ragen.cli import app  # noqa: E402
from ragen.errors import DataError  # noqa: E402
from ragen.integrations import langchain as lc  # noqa: E402
from ragen.retriever import Retriever, build_index, framework_documents  # noqa: E402
from ragen.store import Store  # noqa: E402

from ._hash_encoder import HashEncoder  # noqa: E402


@pytest.fixture()
def shared(tmp_path, minilm):
    src = tmp_path / "docs"
    src.mkdir()
    (src / "sky.txt").write_text("Rayleigh scattering makes the daytime sky look blue.")
    (src / "paris.md").write_text("Paris is the capital of France, on the Seine.")
    idx = tmp_path / "index"
    build_index(src, idx, encoder=minilm)
    store = lc.RagenVectorStore(idx, lc.LLM2VecGenEmbeddings("minilm", device="cpu"))
    store.add_texts(["Bananas are yellow fruit.", "Kiwis are green."],
                    metadatas=[{"path": "web/banana.html", "topic": "food"}, {"source": "web/kiwi.html"}],
                    ids=["banana", "kiwi"])
    return src, idx, store


def _paths(idx) -> set[str]:
    with Store.open(idx, device="cpu") as store:
        return {p for p, *_ in store.files()}


def _vectors(idx, minilm, query="a yellow fruit"):
    with Retriever.open(idx, encoder=minilm, device="cpu") as r:
        return {h.chunk_id: round(h.score, 5) for h in r.search(query, k=10)}


def test_a_folder_run_keeps_the_framework_documents(shared, minilm):
    src, idx, store = shared
    assert framework_documents(idx) == {"web/banana.html", "web/kiwi.html"}
    before = _vectors(idx, minilm)
    (src / "sky.txt").write_text("The sky is blue because of Rayleigh scattering of sunlight.")  # a changed file
    (src / "paris.md").unlink()  # a deleted file: still removed
    stats = build_index(src, idx, encoder=minilm)
    assert _paths(idx) == {"sky.txt", "web/banana.html", "web/kiwi.html"}
    assert stats.files_removed == 1 and stats.files_changed == 1
    assert [d.id for d in store.similarity_search("yellow fruit", k=1, filter={"topic": "food"})] == ["banana"]
    after = _vectors(idx, minilm)
    assert after["banana"] == before["banana"] and after["kiwi"] == before["kiwi"]


@pytest.mark.parametrize("change", [{"chunk_unit": "chars", "chunk_size": 300, "chunk_overlap": 0},
                                    {"rebuild": True}])
def test_a_pass_that_recommits_every_file_carries_them_over(shared, minilm, change):
    src, idx, store = shared
    before = _vectors(idx, minilm)
    build_index(src, idx, encoder=minilm, **change)
    assert _paths(idx) == {"sky.txt", "paris.md", "web/banana.html", "web/kiwi.html"}
    after = _vectors(idx, minilm)
    assert after["banana"] == before["banana"] and after["kiwi"] == before["kiwi"]
    got = store.similarity_search("fruit", k=5, filter={"topic": "food"})
    assert [d.id for d in got] == ["banana"] and got[0].metadata["path"] == "web/banana.html"


def test_a_colliding_file_is_skipped_and_another_model_is_refused(shared, minilm, tmp_path):
    src, idx, _ = shared
    (src / "web").mkdir()
    (src / "web" / "banana.html").write_text("<p>a folder file with the framework document's path</p>")
    stats = build_index(src, idx, encoder=minilm)
    assert ("web/banana.html", "path held by a document a framework vector store added") in stats.skipped_files
    with Store.open(idx, device="cpu") as store:
        texts = {c.text for c in store.chunks(range(1, 100)).values()}
    assert "Bananas are yellow fruit." in texts
    with pytest.raises(DataError, match="framework vector store added"):
        build_index(src, idx, encoder=HashEncoder(), rebuild=True)
    assert "web/kiwi.html" in _paths(idx)  # the refused run changed nothing


def test_cli_rerun_with_framework_documents_is_up_to_date(shared, monkeypatch):
    src, idx, _ = shared
    monkeypatch.delenv("RAGEN_MODEL", raising=False)
    import ragen.cli.index as cli_index

    def no_model(*args, **kwargs):
        raise AssertionError("an unchanged folder must not load the model")

    monkeypatch.setattr(cli_index, "_load", no_model)
    res = CliRunner().invoke(app, ["index", str(src), "--index", str(idx)])
    assert res.exit_code == 0 and "up to date" in res.stdout, res.output
