"""``torchrun -m ragen index``: 2 gloo processes on CPU build the index one process builds; rank 0 alone writes."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ragen.errors import RagenError
from ragen.parallel import Launch, detect_launch, rank_device
from ragen.store import Store

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "llm2vec-gen-tiny"
MODEL = ["--model", str(TINY / "checkpoint"), "--base-model", str(TINY / "base")]
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]


def _corpus(folder: Path) -> Path:
    rng = random.Random(7)
    folder.mkdir()
    for i in range(5):
        paras = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 70))) for _ in range(4)]
        (folder / f"d{i}.txt").write_text("\n\n".join(paras))
    return folder


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _index(src: Path, out: Path, ranks: int, *extra: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] \
        if ranks > 1 else [sys.executable]
    cmd = [*launcher, "-m", "ragen", "index", str(src), "--index", str(out), *MODEL, "--device", "cpu",
           "--batch-size", "4", "--chunk-size", "24", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
                          check=False)


def _vectors(index: Path) -> dict[str, np.ndarray]:
    with Store.open(index, device="cpu") as store:
        chunks = store.chunks(range(4 * store.count + 10))
        vecs = store._vectors_of_rows(np.array(sorted(chunks)))
        assert len(chunks) == store.count == len(vecs)
        return {chunks[r].chunk_id: vecs[r] for r in chunks}


def test_detect_launch_reads_the_launcher_environment(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert detect_launch() == Launch()  # a plain run: one process, nothing initialised
    assert rank_device(None, Launch()) is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(RagenError, match="MASTER_ADDR"):
        detect_launch()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    launch = detect_launch()
    assert (launch.rank, launch.world_size, launch.local_rank, launch.is_main) == (3, 4, 1, False)
    assert rank_device("cpu", launch) == "cpu"
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(RagenError, match="RANK"):
        detect_launch()


def test_training_reads_the_launch_with_the_same_parser(monkeypatch):
    from ragen.training.distributed import DistContext, init_distributed

    assert DistContext is Launch  # one definition, the training name is an alias
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert init_distributed("cpu") == Launch()  # a plain run joins no group
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(RagenError, match="RANK"):  # a one-line error, not int()'s ValueError
        init_distributed("cpu")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RagenError, match="MASTER_ADDR"):  # before joining, not torch's env:// failure
        init_distributed("cpu")


@pytest.mark.slow
def test_two_gloo_ranks_build_what_one_process_builds(tmp_path):
    src = _corpus(tmp_path / "docs")
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = _index(src, one, 1)
    assert r1.returncode == 0, r1.stderr
    r2 = _index(src, two, 2)
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.count("5 indexed (5 new or changed") == 1, r2.stdout  # one summary: rank 0's
    a, b = _vectors(one), _vectors(two)
    assert len(a) > 8  # several groups of 2 batches of 4 chunks, the last one partial
    assert sorted(a) == sorted(b)
    for chunk_id, vec in a.items():
        np.testing.assert_allclose(b[chunk_id], vec, atol=1e-5)
    with Store.open(two, device="cpu") as store:
        assert store.verify()  # rank 0 committed one consistent generation
        scores, _ = store.search(np.stack([a[c] for c in sorted(a)[:3]]), k=1)
        assert np.all(scores[:, 0] > 0.999)

    # a run that fails on rank 0 before any encoder is loaded ends every rank (no hang), rank 0 reporting
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n")
    failed = _index(empty, tmp_path / "bad", 2)
    assert failed.returncode != 0
    assert "error:" in failed.stderr and "Traceback" not in failed.stderr.split("error:")[0]
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").glob("*.faiss"))


class _Encoder:
    dim = 3

    def __init__(self, fail: bool = False):
        self.fail = fail

    def encode_documents(self, texts, batch_size, normalize):
        if self.fail:
            raise RuntimeError("CUDA out of memory (simulated)\nmore lines")
        return np.array([[len(t), 1.0, 0.0] for t in texts], dtype=np.float32)


def _rank(rank: int, port: int, fail_on: int, result_file: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from ragen.parallel import Group

    group = Group(detect_launch())
    try:
        if rank != 0:
            done = group.serve(lambda device, **kw: _Encoder(fail=fail_on == rank), "cpu")
            Path(result_file + ".1").write_text(str(done))
            return
        ok, outcome = False, ""
        try:
            group.start({"spec": "x"}, _Encoder(fail=fail_on == 0))
            vecs = group.encode([["a", "bb"], ["ccc"]], 2)
            outcome = repr([v[:, 0].tolist() for v in vecs])
            ok = True
        except RagenError as exc:
            outcome = f"error: {exc}"
        finally:
            group.stop(ok)
        Path(result_file).write_text(outcome)
    finally:
        group.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fail_on", [-1, 1])
def test_group_gathers_in_batch_order_and_a_failing_rank_ends_all(tmp_path, fail_on):
    import torch.multiprocessing as mp

    out = str(tmp_path / "result")
    mp.start_processes(_rank, args=(_free_port(), fail_on, out), nprocs=2, join=True, start_method="spawn")
    result = Path(out).read_text()
    if fail_on < 0:
        assert result == "[[1.0, 2.0], [3.0]]"  # rank 0 encoded batch 0, rank 1 batch 1, in order
        assert Path(out + ".1").read_text() == "True"
    else:
        assert result == "error: rank 1 of 2: encoding failed: RuntimeError: CUDA out of memory (simulated)"
        assert Path(out + ".1").read_text() == "False"  # rank 1 was told to stop, not left waiting
