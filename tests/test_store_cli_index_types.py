"""`ragen index` defaults to `--index-type auto` (existing indexes keep their recorded type), and
`ragen info` reports the memory per vector of the index type (issue 12)."""

from __future__ import annotations

import json

from ragen.cli import app
from ragen.store import IndexConfig, StoreWriter

from .test_cli_hostile import _index, docs, loads, runner  # noqa: F401  (fixtures)


def test_default_index_type_is_auto_and_info_reports_bytes_per_vector(runner, docs, tmp_path, loads):  # noqa: F811
    idx = tmp_path / "idx"
    res = _index(runner, docs, idx)
    assert res.exit_code == 0, res.output
    assert "needs more vectors" not in res.stderr  # auto on a small folder is flat, silently
    manifest = json.loads((idx / "manifest.json").read_text())
    assert manifest["index"]["config"]["kind"] == "auto" and manifest["index"]["kind"] == "flat"
    dim = manifest["encoder"]["dim"]
    assert manifest["index"]["bytes_per_vector"] == 4 * dim + 8
    info = runner.invoke(app, ["info", "--index", str(idx)], env={"COLUMNS": "300"})
    assert info.exit_code == 0, info.output
    flat_info = " ".join(info.stdout.split())
    assert f"{4 * dim + 8} bytes per vector in memory" in flat_info and "chosen by size" in flat_info


def test_an_index_built_flat_keeps_its_type_and_old_manifests_get_the_figure(runner, docs, tmp_path, loads):  # noqa: F811
    idx = tmp_path / "idx"
    assert _index(runner, docs, idx, "--index-type", "flat").exit_code == 0
    before = json.loads((idx / "manifest.json").read_text())
    (docs / "more.txt").write_text("A new file about tides and the moon.")
    res = _index(runner, docs, idx)  # no --index-type: the recorded flat, no rebuild announced
    assert res.exit_code == 0 and "rebuilding" not in res.stderr, res.output
    after = json.loads((idx / "manifest.json").read_text())
    assert after["index"]["config"]["kind"] == "flat" and after["created_at"] == before["created_at"]
    # a manifest written before the figure existed: info computes it from the kind and dim
    import sqlite3

    con = sqlite3.connect(idx / "chunks.sqlite")
    stored = json.loads(con.execute("SELECT value FROM meta WHERE key='manifest'").fetchone()[0])
    stored["index"].pop("bytes_per_vector")
    for key in ("pq_m", "opq"):
        stored["index"]["config"].pop(key)  # settings added later take their defaults
    con.execute("UPDATE meta SET value=? WHERE key='manifest'", (json.dumps(stored),))
    con.commit()
    con.close()
    info = runner.invoke(app, ["info", "--index", str(idx)], env={"COLUMNS": "300"})
    assert info.exit_code == 0, info.output
    assert f"{4 * after['encoder']['dim'] + 8} bytes per vector" in " ".join(info.stdout.split())
    with StoreWriter(idx, encoder=_encoder_info(after), chunking=after["chunking"],
                     index_config=IndexConfig("flat")) as w:
        assert w.commit([], [p for p, *_ in w._conn.execute("SELECT path FROM files")]).generation == \
            after["generation"]  # same settings: nothing rebuilt


def _encoder_info(manifest):
    from ragen.store import EncoderInfo

    known = set(EncoderInfo.__dataclass_fields__)
    return EncoderInfo(**{k: v for k, v in manifest["encoder"].items() if k in known})
