"""``ragen serve`` over real HTTP on loopback: OpenAI client and httpx against a server on a free port."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from typer.testing import CliRunner  # noqa: E402

from ragen.cli import app as cli_app  # noqa: E402
from ragen.serve import ServeConfig, check_bind  # noqa: E402
from ragen.serve.app import create_app  # noqa: E402
from ragen.serve.runner import BackgroundServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "llm2vec-gen-tiny"
DOCS = {
    "plants.txt": "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
    "ocean.md": "# Tides\n\nThe moon's gravity pulls the oceans, which makes the tides rise and fall twice a day.",
    "code.py": "def add(a, b):\n    \"\"\"Add two numbers and return the sum.\"\"\"\n    return a + b\n",
    "bread.txt": "Yeast ferments the sugars in dough, and the carbon dioxide it releases makes bread rise.",
}
runner = CliRunner()


def _write_docs(folder: Path, docs: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def _build(encoder, src: Path, index_dir: Path) -> None:
    from ragen.retriever import build_index

    build_index(src, index_dir, encoder=encoder, chunk_size=200, chunk_overlap=20)


@pytest.fixture(scope="module")
def minilm_index(tmp_path_factory, minilm):
    root = tmp_path_factory.mktemp("serve-minilm")
    src = _write_docs(root / "docs", DOCS)
    _build(minilm, src, root / "index")
    return root / "index"


@pytest.fixture(scope="module")
def minilm_server(minilm, minilm_index):
    application = create_app(minilm, indexes={"docs": minilm_index}, config=ServeConfig())
    with BackgroundServer(application) as server:
        server.state = application.state.ragen
        yield server


@pytest.fixture(scope="module")
def gen_server(fixture_model):
    application = create_app(fixture_model, config=ServeConfig(model_name="tiny-gen"))
    with BackgroundServer(application) as server:
        server.state = application.state.ragen
        yield server


def _openai(url: str, key: str = "unused"):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def _post(url: str, path: str, payload=None, **kw):
    return httpx.post(url + path, json=payload, timeout=60, **kw) if payload is not None or "content" not in kw \
        else httpx.post(url + path, timeout=60, **kw)


# --- embeddings ---------------------------------------------------------------------------------------------

def test_openai_client_gets_the_in_process_vectors(minilm_server, minilm):
    client = _openai(minilm_server.url)
    texts = ["How do plants make sugar?", "tides and the moon"]
    # The openai client asks for base64 by default and decodes it; ask for floats explicitly too.
    for fmt in (None, "float"):
        kwargs = {"encoding_format": fmt} if fmt else {}
        got = client.embeddings.create(model="minilm", input=texts, **kwargs)
        vecs = np.array([d.embedding for d in sorted(got.data, key=lambda d: d.index)], dtype=np.float32)
        np.testing.assert_allclose(vecs, minilm.encode_documents(texts, normalize=True), atol=1e-5)
        assert got.model == "minilm" and got.usage.prompt_tokens > 0
        assert got.usage.total_tokens == got.usage.prompt_tokens
    one = client.embeddings.create(model="minilm", input=texts[0])
    assert len(one.data) == 1 and len(one.data[0].embedding) == minilm.dim


def test_openai_client_input_type_selects_the_query_instruction(gen_server, fixture_model):
    client = _openai(gen_server.url)
    text = "how far away is the moon?"
    q = client.embeddings.create(model="tiny-gen", input=text, extra_body={"input_type": "query"}).data[0].embedding
    d = client.embeddings.create(model="tiny-gen", input=text).data[0].embedding
    np.testing.assert_allclose(q, fixture_model.encode_queries([text], normalize=True)[0], atol=1e-5)
    np.testing.assert_allclose(d, fixture_model.encode_documents([text], normalize=True)[0], atol=1e-5)


def test_llm2vec_gen_vectors_equal_ragen_encode_and_honour_input_type(gen_server, fixture_model):
    text = "What is the boiling point of water?"
    for kind in ("query", "document"):
        res = runner.invoke(cli_app, ["encode", text, "--model", str(FIXTURE / "checkpoint"), "--base-model",
                                      str(FIXTURE / "base"), "--kind", kind, "--device", "cpu"])
        assert res.exit_code == 0, res.output
        cli_vec = np.array(json.loads(res.stdout.strip().splitlines()[0])["embedding"], dtype=np.float32)
        r = _post(gen_server.url, "/v1/embeddings", {"input": [text], "model": "tiny-gen", "input_type": kind,
                                                    "normalize": False, "encoding_format": "base64"})
        assert r.status_code == 200, r.text
        served = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
        np.testing.assert_allclose(served, cli_vec, atol=1e-6)  # the CLI rounds to 7 decimals
    # document is the default; query and document instructions give different vectors
    default = np.array(_post(gen_server.url, "/v1/embeddings", {"input": text, "normalize": False}).json()
                       ["data"][0]["embedding"], np.float32)
    np.testing.assert_allclose(default, fixture_model.encode_documents([text])[0], atol=1e-6)
    assert not np.allclose(default, fixture_model.encode_queries([text])[0], atol=1e-4)
    custom = _post(gen_server.url, "/v1/embeddings", {"input": text, "normalize": False, "instruction": ""}).json()
    np.testing.assert_allclose(custom["data"][0]["embedding"], fixture_model.encode([text])[0], atol=1e-6)


def test_minilm_vectors_equal_ragen_encode(minilm_server):
    res = runner.invoke(cli_app, ["encode", "tides and the moon", "--model", "minilm", "--kind", "document",
                                  "--normalize", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    cli_vec = np.array(json.loads(res.stdout.strip().splitlines()[0])["embedding"], dtype=np.float32)
    served = _post(minilm_server.url, "/v1/embeddings", {"input": "tides and the moon"}).json()["data"][0]["embedding"]
    np.testing.assert_allclose(served, cli_vec, atol=1e-6)


def test_dimensions_the_model_cannot_honour_is_400(minilm_server, minilm):
    openai = pytest.importorskip("openai")
    client = _openai(minilm_server.url)
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="minilm", input="x", dimensions=64)
    assert "384" in str(info.value)
    ok = client.embeddings.create(model="minilm", input="x", dimensions=minilm.dim)
    assert len(ok.data[0].embedding) == minilm.dim


def test_concurrent_requests_are_merged_into_batches(minilm_server, minilm):
    state = minilm_server.state
    gate = threading.Event()
    blocker = state.worker.submit_call(lambda enc: gate.wait(30), label="test-gate")  # hold the worker
    before = state.metrics.value("ragen_batch_size")
    texts = [f"sentence number {i} about {'plants ' * (i % 4)}" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_post, minilm_server.url, "/v1/embeddings", {"input": t, "normalize": False})
                   for t in texts]
        deadline = time.monotonic() + 20
        while state.worker.queue_depth < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert state.worker.queue_depth == 8  # all eight wait behind the gate, none answered yet
        gate.set()
        answers = [f.result() for f in futures]
    blocker.result(timeout=10)
    assert all(a.status_code == 200 for a in answers)
    vecs = np.array([a.json()["data"][0]["embedding"] for a in answers], np.float32)
    np.testing.assert_allclose(vecs, minilm.encode_documents(texts), atol=1e-5)
    assert state.metrics.value("ragen_batch_size") - before == 1  # one forward batch for eight requests


def test_token_budget_splits_batches(fixture_model):
    """Texts of one request longer than the budget allows together go through in several batches."""
    from ragen.serve.worker import InferenceWorker

    calls: list[int] = []

    class Recording:  # the real model, counting the texts of each forward batch
        def __getattr__(self, name):
            return getattr(fixture_model, name)

        def encode_documents(self, texts, **kw):
            calls.append(len(texts))
            return fixture_model.encode_documents(texts, **kw)

    worker = InferenceWorker(Recording(), max_batch_tokens=100, max_wait_ms=0)
    worker.start()
    try:
        texts = ["one two three four five"] * 7
        vecs = worker.submit_embed(texts, kind="document", lengths=[30] * 7).result(timeout=60)
    finally:
        worker.stop()
    assert calls == [3, 3, 1]  # 3 x 30 tokens fit a 100-token budget, 4 do not
    np.testing.assert_allclose(vecs, fixture_model.encode_documents(texts), atol=1e-5)


# --- search -------------------------------------------------------------------------------------------------

def test_search_equals_ragen_query_json(minilm_server, minilm_index):
    query = "why does bread rise?"
    local = runner.invoke(cli_app, ["query", query, "--index", str(minilm_index), "--json", "-k", "3"])
    assert local.exit_code == 0, local.output
    expected = json.loads(local.stdout)
    r = _post(minilm_server.url, "/v1/search", {"index": "docs", "query": query, "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["index"] == "docs" and isinstance(body["generation"], int)
    for got, want in zip(body["data"], expected, strict=True):
        assert {k: v for k, v in got.items() if k != "score"} == {k: v for k, v in want.items() if k != "score"}
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
    assert expected[0]["path"] == "bread.txt"
    # the CLI client prints the same JSON (and the same table) from the server
    remote = runner.invoke(cli_app, ["query", query, "--server", minilm_server.url, "--json", "-k", "3"])
    assert remote.exit_code == 0, remote.output
    assert json.loads(remote.stdout) == body["data"]
    table = runner.invoke(cli_app, ["query", query, "--index", "docs", "-k", "2"], env={"RAGEN_SERVER": minilm_server.url})
    assert table.exit_code == 0 and "bread.txt" in table.stdout


def test_search_errors(minilm_server):
    r = _post(minilm_server.url, "/v1/search", {"index": "nope", "query": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "index_not_found" and "docs" in r.json()["error"]["message"]
    assert _post(minilm_server.url, "/v1/search", {"query": ""}).status_code == 400
    assert _post(minilm_server.url, "/v1/search", {"query": "x", "k": 0}).status_code == 400
    assert _post(minilm_server.url, "/v1/search", {"query": "x", "k": "3"}).status_code == 400
    remote = runner.invoke(cli_app, ["query", "x", "--server", minilm_server.url, "--index", "nope"])
    assert remote.exit_code == 1 and "not served" in remote.output and "Traceback" not in remote.output


def test_a_new_generation_is_searched_without_restart(minilm, tmp_path):
    from ragen import load_encoder

    src = _write_docs(tmp_path / "docs", DOCS)
    index_dir = tmp_path / "index"
    _build(minilm, src, index_dir)
    writer_encoder = load_encoder("minilm", device="cpu")  # the server's model belongs to its worker thread
    application = create_app(minilm, indexes={"live": index_dir})
    query = "volcanoes erupt molten lava"
    with BackgroundServer(application) as server:
        first = _post(server.url, "/v1/search", {"query": query, "k": 10}).json()
        assert "volcano.txt" not in [h["path"] for h in first["data"]]
        seen: list[tuple[int, set[str]]] = []
        stop = threading.Event()

        def search_loop():
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():
                    r = client.post(server.url + "/v1/search", json={"query": query, "k": 10})
                    assert r.status_code == 200, r.text
                    seen.append((r.json()["generation"], {h["path"] for h in r.json()["data"]}))

        thread = threading.Thread(target=search_loop)
        thread.start()
        try:
            (src / "volcano.txt").write_text("Volcanoes erupt when molten lava rises through the crust.")
            _build(writer_encoder, src, index_dir)
            time.sleep(0.3)
        finally:
            stop.set()
            thread.join(60)
        after = _post(server.url, "/v1/search", {"query": query, "k": 10}).json()
    assert after["generation"] == first["generation"] + 1
    assert after["data"][0]["path"] == "volcano.txt"
    old_files, new_files = set(DOCS), set(DOCS) | {"volcano.txt"}
    for generation, paths in seen:  # every answer comes from exactly one generation
        assert paths == (old_files if generation == first["generation"] else new_files)


# --- decoding -----------------------------------------------------------------------------------------------

def test_decode_and_top_tokens_equal_the_model(gen_server, fixture_model):
    texts = ["hello there", "a longer sentence about the sea"]
    r = _post(gen_server.url, "/v1/decode", {"input": texts, "max_new_tokens": 8})
    assert r.status_code == 200, r.text
    assert [d["text"] for d in r.json()["data"]] == fixture_model.decode(texts, max_new_tokens=8)
    q = _post(gen_server.url, "/v1/decode", {"input": texts[0], "max_new_tokens": 8, "input_type": "query"}).json()
    assert q["data"][0]["text"] == fixture_model.decode(texts[:1], instruction=fixture_model.query_instruction,
                                                        max_new_tokens=8)[0]
    t = _post(gen_server.url, "/v1/top_tokens", {"input": texts, "k": 3})
    assert t.status_code == 200, t.text
    want = fixture_model.top_tokens(texts, 3)
    got = t.json()["data"]
    assert [[[p["token"] for p in pos] for pos in d["positions"]] for d in got] == \
        [[[tok for tok, _ in pos] for pos in per] for per in want]
    assert got[0]["positions"][0][0]["prob"] == pytest.approx(want[0][0][0][1], rel=1e-5)
    assert _post(gen_server.url, "/v1/decode", {"input": "x", "max_new_tokens": 100000}).status_code == 400


def test_query_server_explain_shows_the_decoded_query(fixture_model, minilm_server, tmp_path):
    src = _write_docs(tmp_path / "docs", DOCS)
    _build(fixture_model, src, tmp_path / "index")
    with BackgroundServer(create_app(fixture_model, indexes={"gen": tmp_path / "index"})) as server:
        res = runner.invoke(cli_app, ["query", "why do tides happen?", "--server", server.url, "--explain", "--json",
                                      "-k", "2"])
    assert res.exit_code == 0, res.output
    decoded = fixture_model.decode(["why do tides happen?"], instruction=fixture_model.query_instruction)[0]
    assert "decodes to" in res.stderr and (decoded.split() or [""])[0][:20] in res.stderr
    assert len(json.loads(res.stdout)) == 2
    plain = runner.invoke(cli_app, ["query", "tides", "--server", minilm_server.url, "--explain", "-k", "1"])
    assert plain.exit_code == 0 and "needs an LLM2Vec-Gen model" in plain.stderr


def test_decode_needs_an_llm2vec_gen_model(minilm_server):
    r = _post(minilm_server.url, "/v1/decode", {"input": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_cannot_decode"


# --- errors, limits, auth -----------------------------------------------------------------------------------

def test_bad_requests_get_json_errors_never_a_traceback(minilm_server):
    openai = pytest.importorskip("openai")
    url = minilm_server.url
    cases = [
        (httpx.post(url + "/v1/embeddings", content=b"{not json", timeout=30), 400),
        (httpx.post(url + "/v1/embeddings", content=b"[1, 2]", timeout=30), 400),
        (_post(url, "/v1/embeddings", {"model": "minilm"}), 400),
        (_post(url, "/v1/embeddings", {"input": []}), 400),
        (_post(url, "/v1/embeddings", {"input": [[1, 2, 3]]}), 400),  # token ids
        (_post(url, "/v1/embeddings", {"input": "x", "encoding_format": "int8"}), 400),
        (_post(url, "/v1/embeddings", {"input": "x", "input_type": "passage"}), 400),
        (_post(url, "/v1/embeddings", {"input": "x", "model": "text-embedding-3-small"}), 404),
        (httpx.get(url + "/v1/nothing", timeout=30), 404),
        (httpx.get(url + "/v1/embeddings", timeout=30), 405),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        err = response.json()["error"]
        assert err["message"] and err["type"] and "Traceback" not in err["message"]
    with pytest.raises(openai.NotFoundError):
        _openai(url).embeddings.create(model="text-embedding-3-small", input="x")
    models = _openai(url).models.list()
    assert [m.id for m in models.data] == ["minilm"]


@pytest.fixture(scope="module")
def limited_server(minilm):
    config = ServeConfig(max_body_bytes=4000, max_inputs=4, max_input_tokens=16, max_k=5)
    with BackgroundServer(create_app(minilm, config=config)) as server:
        yield server


def test_limits_give_clear_4xx(limited_server):
    url = limited_server.url
    big = _post(url, "/v1/embeddings", {"input": "word " * 2000})
    assert big.status_code == 413 and "4000" in big.json()["error"]["message"]
    many = _post(url, "/v1/embeddings", {"input": ["a"] * 5})
    assert many.status_code == 413 and "limit is 4" in many.json()["error"]["message"]
    long = _post(url, "/v1/embeddings", {"input": ["short", "one two three " * 10]})
    assert long.status_code == 400 and "input[1]" in long.json()["error"]["message"]
    assert long.json()["error"]["code"] == "input_too_long"
    assert _post(url, "/v1/embeddings", {"input": ["a"] * 4}).status_code == 200


def test_api_key_on_every_route_but_health(fixture_model):
    openai = pytest.importorskip("openai")
    with BackgroundServer(create_app(fixture_model, config=ServeConfig(api_key="s3cret"))) as server:
        url = server.url
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        for method, path in (("GET", "/v1/models"), ("GET", "/ready"), ("GET", "/metrics"),
                             ("POST", "/v1/embeddings"), ("POST", "/v1/decode"), ("POST", "/v1/top_tokens")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
                r = httpx.request(method, url + path, json={"input": "x"}, headers=headers, timeout=30)
                assert r.status_code == 401, (path, headers)
                assert r.json()["error"]["type"] == "authentication_error"
                assert r.headers["www-authenticate"] == "Bearer"
        with pytest.raises(openai.AuthenticationError):
            _openai(url, "wrong").embeddings.create(model=str(fixture_model.spec), input="x")
        good = _openai(url, "s3cret").embeddings.create(model=str(fixture_model.spec), input="x")
        assert len(good.data[0].embedding) == fixture_model.dim
        assert httpx.get(url + "/ready", headers={"Authorization": "Bearer s3cret"}, timeout=30).status_code == 200


def test_refuses_a_public_bind_without_a_key():
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("0.0.0.0", "key")
    from ragen.errors import RagenError

    with pytest.raises(RagenError, match="without an API key"):
        check_bind("0.0.0.0", None)
    res = runner.invoke(cli_app, ["serve", "--host", "0.0.0.0", "--model", "minilm"], env={"RAGEN_API_KEY": ""})
    assert res.exit_code == 1 and "without an API key" in res.output and "Traceback" not in res.output


def test_a_taken_port_is_one_line(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        res = runner.invoke(cli_app, ["serve", "--model", "minilm", "--port", str(port)])
    assert res.exit_code == 1 and "cannot listen" in res.output


def test_a_missing_index_fails_before_the_model_loads(tmp_path):
    res = runner.invoke(cli_app, ["serve", "--model", "no/such-model", "--index", f"x={tmp_path / 'none'}"])
    assert res.exit_code == 1 and "no ragen index here" in res.output


# --- overload -----------------------------------------------------------------------------------------------

def test_overload_answers_429_with_retry_after_and_every_request_is_answered(minilm):
    application = create_app(minilm, config=ServeConfig(max_queue=3))
    state = application.state.ragen
    with BackgroundServer(application) as server:
        gate = threading.Event()
        blocker = state.worker.submit_call(lambda enc: gate.wait(30), label="test-gate")
        while state.worker.queue_depth:  # the worker has taken the gate and is stuck in it
            time.sleep(0.01)
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(_post, server.url, "/v1/embeddings", {"input": f"text {i}"}) for i in range(12)]
            deadline = time.monotonic() + 20
            while state.metrics.value("ragen_rejected_total", reason="queue_full") < 9 and time.monotonic() < deadline:
                time.sleep(0.01)
            gate.set()
            answers = [f.result(timeout=60) for f in futures]
        blocker.result(timeout=10)
        metrics = httpx.get(server.url + "/metrics", timeout=30).text
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * 3 + [429] * 9  # the worker is stuck in the gate; 3 requests fit the queue
    for a in answers:
        if a.status_code == 429:
            assert a.headers["retry-after"] == "1" and a.json()["error"]["code"] == "queue_full"
    assert 'ragen_rejected_total{reason="queue_full"} 9' in metrics


def test_a_request_that_times_out_gets_503_and_the_worker_carries_on(minilm):
    application = create_app(minilm, config=ServeConfig(request_timeout_s=2.0))
    state = application.state.ragen
    with BackgroundServer(application) as server:
        gate = threading.Event()
        blocker = state.worker.submit_call(lambda enc: gate.wait(30), label="test-gate")
        late = _post(server.url, "/v1/embeddings", {"input": "waits too long"})
        assert late.status_code == 503 and late.headers["retry-after"] == "1"
        assert late.json()["error"]["code"] == "timeout"
        batches = state.metrics.value("ragen_batch_size")
        gate.set()
        blocker.result(timeout=10)
        after = _post(server.url, "/v1/embeddings", {"input": "served"})
        assert after.status_code == 200 and state.worker.running
        assert state.metrics.value("ragen_batch_size") == batches + 1  # the abandoned job was skipped, not computed


# --- health, readiness, metrics -----------------------------------------------------------------------------

def test_health_ready_and_prometheus_metrics(minilm_server):
    url = minilm_server.url
    assert httpx.get(url + "/health", timeout=30).json() == {"status": "ok"}
    ready = httpx.get(url + "/ready", timeout=30).json()
    assert ready["status"] == "ready" and "docs" in ready["indexes"]
    _post(url, "/v1/embeddings", {"input": "count me"})
    _post(url, "/v1/search", {"query": "count me", "k": 1})
    r = httpx.get(url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"(,[a-zA-Z_][a-zA-Z0-9_]*="[^"]*")*\})? '
                        r'(-?[0-9.e+-]+|\+Inf)$')
    for line in text.strip().splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or sample.match(line), line
    assert re.search(r'ragen_requests_total\{route="/v1/embeddings",status="200"\} \d+', text)
    assert re.search(r'ragen_request_duration_seconds_bucket\{route="/v1/search",le="\+Inf"\} \d+', text)
    for name in ("ragen_queue_depth", "ragen_batch_size_count", "ragen_tokens_total", "ragen_inference_seconds_sum",
                 "ragen_index_generation"):
        assert name in text


# --- clients ------------------------------------------------------------------------------------------------

def test_a_server_url_is_an_encoder_spec(minilm_server, minilm, minilm_index):
    from ragen import load_encoder
    from ragen.retriever import Retriever

    remote = load_encoder(minilm_server.url)
    assert (remote.dim, remote.fingerprint) == (minilm.dim, minilm.fingerprint)
    texts = ["sugar from sunlight", "the sum of two numbers"]
    np.testing.assert_allclose(remote.encode_queries(texts), minilm.encode_queries(texts), atol=1e-5)
    np.testing.assert_allclose(remote.encode_documents(texts, normalize=True),
                               minilm.encode_documents(texts, normalize=True), atol=1e-5)
    with Retriever.open(minilm_index, model=minilm_server.url) as r, Retriever(minilm, r.store) as local:
        assert [h.chunk_id for h in r.search("why do tides happen", k=3)] == \
            [h.chunk_id for h in local.search("why do tides happen", k=3)]
    with pytest.raises(Exception, match="cannot reach"):
        load_encoder("http://127.0.0.1:9")


def test_integrations_take_a_server_url(gen_server, fixture_model):
    text = "What is the capital of France?"
    want_q = fixture_model.encode_queries([text], normalize=True)[0]
    want_d = fixture_model.encode_documents([text], normalize=True)[0]
    pytest.importorskip("langchain_core")
    from ragen.integrations.langchain import LLM2VecGenEmbeddings

    lc = LLM2VecGenEmbeddings(model_name=gen_server.url)
    np.testing.assert_allclose(lc.embed_query(text), want_q, atol=1e-5)
    np.testing.assert_allclose(lc.embed_documents([text])[0], want_d, atol=1e-5)
    pytest.importorskip("llama_index.core")
    from ragen.integrations.llama_index import LLM2VecGenEmbedding

    li = LLM2VecGenEmbedding(model_name=gen_server.url)
    np.testing.assert_allclose(li.get_query_embedding(text), want_q, atol=1e-5)
    np.testing.assert_allclose(li.get_text_embedding(text), want_d, atol=1e-5)


def test_langchain_and_llama_index_openai_classes_work_unchanged(minilm_server, minilm):
    text = "tides and the moon"
    want = minilm.encode_documents([text], normalize=True)[0]  # these clients send no input_type: documents
    lc_openai = pytest.importorskip("langchain_openai")
    # check_embedding_ctx_length=False: otherwise LangChain sends tiktoken ids (and downloads tiktoken's table)
    lc = lc_openai.OpenAIEmbeddings(model="minilm", base_url=minilm_server.url + "/v1", api_key="unused",
                                    check_embedding_ctx_length=False, max_retries=0)
    np.testing.assert_allclose(lc.embed_query(text), want, atol=1e-5)
    np.testing.assert_allclose(lc.embed_documents([text, "x"])[0], want, atol=1e-5)
    li_mod = pytest.importorskip("llama_index.embeddings.openai_like")
    li = li_mod.OpenAILikeEmbedding(model_name="minilm", api_base=minilm_server.url + "/v1", api_key="unused")
    np.testing.assert_allclose(li.get_text_embedding(text), want, atol=1e-5)
    np.testing.assert_allclose(li.get_query_embedding(text), want, atol=1e-5)


def _light_cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    code = ("import sys\nfrom ragen.cli import app\ntry:\n    app(sys.argv[1:], standalone_mode=False)\nexcept SystemExit:\n"
            "    pass\nheavy=[m for m in ('torch','transformers') if m in sys.modules]\n"
            "sys.stderr.write('HEAVY=' + ','.join(heavy) + '\\n')\n")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def test_model_free_commands_import_neither_torch_nor_transformers(minilm_server, minilm_index):
    out = _light_cli(["query", "why does bread rise?", "--json", "-k", "2"], {"RAGEN_SERVER": minilm_server.url})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["path"] == "bread.txt"
    assert "HEAVY=\n" in out.stderr
    info = _light_cli(["info", "--index", str(minilm_index)], {})
    assert info.returncode == 0 and "minilm" in info.stdout
    assert "HEAVY=\n" in info.stderr


def test_serve_sits_at_the_top_of_the_dependency_rule():
    from tests.test_architecture import ROOT as PKG, _area, _imports

    offenders = []
    for path in PKG.rglob("*.py"):
        area = path.relative_to(PKG).parts[0].removesuffix(".py")
        for mod in _imports(path):
            target = _area(mod)
            if target == "serve" and area not in ("serve", "cli"):
                offenders.append(f"{path.relative_to(PKG)} imports {mod}")  # only the CLI may use the server
            if area == "serve" and target in ("cli", "bench", "training", "integrations"):
                offenders.append(f"{path.relative_to(PKG)} imports {mod}")
    assert not offenders


# --- shutdown -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight_and_exits_cleanly():
    cmd = [sys.executable, "-m", "ragen", "serve", "--model", str(FIXTURE / "checkpoint"), "--base-model",
           str(FIXTURE / "base"), "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "listening on" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "server exited early"
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        while httpx.get(url + "/health", timeout=30).status_code != 200:
            time.sleep(0.05)
        result: dict = {}

        def slow_request():
            result["r"] = httpx.post(url + "/v1/decode", json={"input": ["tell me a story"] * 16, "max_new_tokens": 120},
                                     timeout=120)

        thread = threading.Thread(target=slow_request)
        thread.start()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        thread.join(120)
        rc = proc.wait(timeout=120)
        rest = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert result["r"].status_code == 200 and len(result["r"].json()["data"]) == 16
    assert rc == 0, rest
    assert "stopped" in rest and "Traceback" not in rest
