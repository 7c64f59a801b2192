"""``POST /v1/chat/completions`` and the refusal guard of ``ragen serve``, over real HTTP on loopback
(httpx and the ``openai`` client, streaming included)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from typer.testing import CliRunner  # noqa: E402

from ragen.cli import app as cli_app  # noqa: E402
from ragen.guard import GuardConfig  # noqa: E402
from ragen.rag import ChatGenerator  # noqa: E402
from ragen.serve import ServeConfig  # noqa: E402
from ragen.serve.app import create_app  # noqa: E402
from ragen.serve.runner import BackgroundServer  # noqa: E402

DOCS = {
    "plants.txt": "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar and oxygen.",
    "ocean.md": "The moon's gravity pulls the oceans, which makes the tides rise and fall twice a day.",
}
HELLO = [{"role": "system", "content": "be brief."}, {"role": "user", "content": "hello there"}]
runner = CliRunner()


def _openai(url: str, key: str = "unused"):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def _chat(url: str, payload: dict, **kw) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=payload, timeout=60, **kw)


def _sse(url: str, payload: dict) -> list:
    """The decoded ``data:`` events of a streamed completion (the final ``[DONE]`` kept as a string)."""
    events = []
    with httpx.stream("POST", url + "/v1/chat/completions", json={**payload, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                body = line[len("data: "):]
                events.append(body if body == "[DONE]" else json.loads(body))
    return events


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith((name + " ", name + "{")))


def _index(encoder, root: Path, docs: dict[str, str] = DOCS) -> Path:
    from ragen.retriever import build_index

    src = root / "docs"
    src.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (src / name).write_text(text, encoding="utf-8")
    build_index(src, root / "index", encoder=encoder, chunk_size=200, chunk_overlap=20)
    return root / "index"


@pytest.fixture(scope="module")
def reference(fixture_model):
    """What the fixture model's own backbone answers, computed in process before any server runs."""
    gen = ChatGenerator.from_encoder(fixture_model)
    g = gen.stream(HELLO, max_new_tokens=12)
    text = g.read()
    return {"text": text, "prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
            "finish_reason": g.finish_reason}


@pytest.fixture(scope="module")
def chat_server(fixture_model, reference):
    config = ServeConfig(model_name="tiny-gen", max_new_tokens=4000, chat_step_tokens=4)
    application = create_app(fixture_model, config=config)
    with BackgroundServer(application) as server:
        server.state = application.state.ragen
        yield server


# --- protocol -----------------------------------------------------------------------------------------------

def test_openai_client_gets_the_backbones_answer_with_usage(chat_server, reference):
    client = _openai(chat_server.url)
    got = client.chat.completions.create(model="tiny-gen", messages=HELLO, max_tokens=12)
    assert got.object == "chat.completion" and got.model == "tiny-gen" and got.id.startswith("chatcmpl-")
    choice = got.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == reference["text"]
    assert choice.finish_reason == reference["finish_reason"] == "length"
    assert got.usage.prompt_tokens == reference["prompt_tokens"] > 0
    assert got.usage.completion_tokens == reference["completion_tokens"] == 12
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    newer = client.chat.completions.create(model="tiny-gen", messages=HELLO, max_completion_tokens=5,
                                           temperature=0.9)  # accepted; decoding stays greedy
    assert newer.usage.completion_tokens == 5 and reference["text"].startswith(newer.choices[0].message.content)


def test_openai_client_streams_chunks_that_make_the_answer(chat_server, reference):
    client = _openai(chat_server.url)
    stream = client.chat.completions.create(model="tiny-gen", messages=HELLO, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) >= 2  # 12 tokens in steps of 4: more than one piece
    assert "".join(content) == reference["text"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == reference["prompt_tokens"]


def test_raw_sse_ends_with_done(chat_server, reference):
    events = _sse(chat_server.url, {"messages": HELLO, "max_tokens": 12})
    assert events[-1] == "[DONE]" and all(isinstance(e, dict) for e in events[:-1])
    assert "usage" not in events[-2]  # only with stream_options.include_usage
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1]) == reference["text"]


def test_stop_strings_end_the_answer_and_never_leak(chat_server, reference):
    text = reference["text"]
    assert len(text) >= 2
    stop = text[1:3] if text[1:3].strip() else text[1]
    got = _chat(chat_server.url, {"messages": HELLO, "max_tokens": 12, "stop": [stop]}).json()
    content = got["choices"][0]["message"]["content"]
    assert got["choices"][0]["finish_reason"] == "stop"
    assert content == text[: text.find(stop)] and stop not in content
    streamed = _sse(chat_server.url, {"messages": HELLO, "max_tokens": 12, "stop": stop})
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in streamed[:-1] if e["choices"]) == content


def test_generation_shares_the_served_encoders_weights(chat_server, fixture_model):
    gen = chat_server.state.generator
    assert gen is not None and gen.lm is fixture_model.lm
    enc = {p.data_ptr() for p in fixture_model.lm.parameters()}
    ptrs = [p.data_ptr() for p in gen.lm.parameters()]
    assert ptrs and set(ptrs) == enc


def test_chat_errors_are_json_4xx(chat_server):
    url = chat_server.url
    cases = [
        ({"messages": HELLO, "max_tokens": 4001}, 400, "max_tokens_too_large"),
        ({"messages": HELLO, "max_tokens": 0}, 400, None),
        ({"messages": HELLO, "max_tokens": 2040}, 400, None),  # prompt + 2040 > the 2048-token context window
        ({"messages": []}, 400, None),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, None),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, 400, None),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, None),
        ({"messages": HELLO, "n": 2}, 400, None),
        ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, None),
        ({"messages": HELLO, "model": "gpt-4"}, 404, "model_not_found"),
        ({"messages": HELLO, "index": "nope"}, 404, "index_not_found"),
    ]
    for payload, status, code in cases:
        r = _chat(url, payload)
        assert r.status_code == status, (payload, r.text)
        err = r.json()["error"]
        assert err["message"] and "\n" not in err["message"] and err["type"] == "invalid_request_error"
        if code:
            assert err["code"] == code, (payload, err)
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError, match="at most 4000 tokens"):
        _openai(url).chat.completions.create(model="tiny-gen", messages=HELLO, max_tokens=5000)
    parts = _chat(url, {"messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}],
                        "max_tokens": 3})
    assert parts.status_code == 200 and parts.json()["usage"]["completion_tokens"] == 3


def test_message_limits(fixture_model):
    config = ServeConfig(max_inputs=3, max_input_tokens=20, max_new_tokens=8)
    with BackgroundServer(create_app(fixture_model, config=config)) as server:
        many = _chat(server.url, {"messages": [{"role": "user", "content": "hi"}] * 4})
        assert many.status_code == 413 and many.json()["error"]["code"] == "too_many_messages"
        long = _chat(server.url, {"messages": [{"role": "user", "content": "word " * 40}]})
        assert long.status_code == 400 and long.json()["error"]["code"] == "input_too_long"
        cap = _chat(server.url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9})
        assert cap.status_code == 400 and "at most 8" in cap.json()["error"]["message"]
        ok = _chat(server.url, {"messages": [{"role": "user", "content": "hi"}]})  # default: the cap
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 8


def test_api_key_guards_chat(fixture_model):
    with BackgroundServer(create_app(fixture_model, config=ServeConfig(api_key="s3cret"))) as server:
        r = _chat(server.url, {"messages": HELLO, "max_tokens": 2})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        openai = pytest.importorskip("openai")
        with pytest.raises(openai.AuthenticationError):
            _openai(server.url, "wrong").chat.completions.create(model=str(fixture_model.spec), messages=HELLO)
        ok = _openai(server.url, "s3cret").chat.completions.create(model=str(fixture_model.spec), messages=HELLO,
                                                                   max_tokens=2)
        assert ok.usage.completion_tokens == 2


def test_a_baseline_encoder_needs_llm(minilm, tiny_backbone):
    with BackgroundServer(create_app(minilm)) as server:
        r = _chat(server.url, {"messages": HELLO})
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_cannot_generate"
        assert "--llm" in r.json()["error"]["message"]
        assert httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["chat"] is None
    llm = ChatGenerator.from_pretrained(tiny_backbone, device="cpu")
    with BackgroundServer(create_app(minilm, generator=llm)) as server:
        got = _openai(server.url).chat.completions.create(model="minilm", messages=HELLO, max_tokens=3)
        assert got.usage.completion_tokens == 3
        assert httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["chat"] == str(tiny_backbone)
        assert got.choices[0].message.content == llm.stream(HELLO, max_new_tokens=3).read()


def test_serve_cli_refuses_a_missing_llm_or_guard_file(tmp_path):
    res = runner.invoke(cli_app, ["serve", "--model", "minilm", "--llm", str(tmp_path / "none"), "--port", "0"])
    assert res.exit_code != 0 and "--llm" in res.output and "Traceback" not in res.output
    res = runner.invoke(cli_app, ["serve", "--model", "minilm", "--guard-config", str(tmp_path / "g.json")])
    assert res.exit_code != 0 and "--guard-config" in res.output and "Traceback" not in res.output


# --- sharing the model with embeddings ----------------------------------------------------------------------

def test_an_embedding_completes_while_a_long_generation_streams(chat_server, fixture_model):
    """Generation runs in steps of chat_step_tokens on the worker, so an embedding request queued meanwhile
    is answered between two steps, long before the answer ends."""
    url = chat_server.url
    first_piece = threading.Event()
    times: dict[str, float] = {}
    pieces_after: list[int] = []

    def stream() -> None:
        n = 0
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=120,
                          json={"messages": HELLO, "max_tokens": 1500, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
                    n += 1
                    first_piece.set()
                    if "embed" in times:
                        pieces_after.append(n)
        times["stream"] = time.monotonic()

    t = threading.Thread(target=stream)
    t.start()
    assert first_piece.wait(60)
    r = httpx.post(url + "/v1/embeddings", json={"input": "tides", "normalize": False}, timeout=60)
    times["embed"] = time.monotonic()
    assert r.status_code == 200
    t.join(120)
    assert "stream" in times
    assert times["embed"] < times["stream"]
    assert len(pieces_after) > 10  # the answer went on streaming well after the embedding was answered
    import numpy as np

    np.testing.assert_allclose(r.json()["data"][0]["embedding"], fixture_model.encode_documents(["tides"])[0],
                               atol=1e-5)


def test_a_client_that_disconnects_stops_the_generation(chat_server):
    url = chat_server.url
    steps0 = _metric(url, "ragen_chat_steps_total")
    abandoned0 = _metric(url, "ragen_chat_abandoned_total")
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                      json={"messages": HELLO, "max_tokens": 2000, "stream": True}) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                seen += 1
                if seen == 2:
                    break  # leaving the block closes the connection
    deadline = time.monotonic() + 30
    while _metric(url, "ragen_chat_abandoned_total") == abandoned0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(url, "ragen_chat_abandoned_total") == abandoned0 + 1
    steps = _metric(url, "ragen_chat_steps_total") - steps0
    time.sleep(0.5)
    assert _metric(url, "ragen_chat_steps_total") - steps0 == steps  # nothing runs on for the gone client
    assert steps < 100  # far fewer than the 500 steps of 4 tokens that 2000 tokens take
    assert httpx.get(url + "/ready", timeout=30).json()["queue_depth"] == 0


# --- the refusal guard --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gen_index(fixture_model, tmp_path_factory):
    return _index(fixture_model, tmp_path_factory.mktemp("chat-index"))


def test_search_and_chat_with_an_index_and_a_blocking_guard(fixture_model, gen_index, tmp_path):
    blocks_all = GuardConfig(threshold=-1.0, decode=False).save(tmp_path / "all.json")
    with BackgroundServer(create_app(fixture_model, indexes={"docs": gen_index}, guard=blocks_all)) as server:
        assert httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["guard"] == ["docs"]
        r = httpx.post(server.url + "/v1/search", json={"query": "why do tides happen?", "k": 2}, timeout=60).json()
        assert r["data"] == [] and r["blocked"] is True and "cosine" in r["reason"]
        assert r["guard"]["threshold"] == -1.0
        # per-request guard: false cannot switch off the server's guard
        r = httpx.post(server.url + "/v1/search", json={"query": "tides", "guard": False}, timeout=60).json()
        assert r["blocked"] is True and r["data"] == []
        chat = _chat(server.url, {"messages": [{"role": "user", "content": "why do tides happen?"}], "index": "docs"})
        body = chat.json()
        assert chat.status_code == 200 and body["blocked"] is True and body["sources"] == []
        assert body["reason"] in body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] == 0
        events = _sse(server.url, {"messages": [{"role": "user", "content": "tides"}], "index": "docs"})
        assert events[0]["blocked"] is True and events[0]["sources"] == [] and "cosine" in events[0]["reason"]
        assert events[-1] == "[DONE]"
        blocked = _metric(server.url, "ragen_guard_blocked_total")
        assert blocked == 4


def test_guard_per_request_and_query_server_guard(fixture_model, gen_index, tmp_path):
    import shutil

    index = tmp_path / "index"
    shutil.copytree(gen_index, index)
    GuardConfig(threshold=-1.0, decode=False).save(index)  # the index's guard.json blocks everything
    with BackgroundServer(create_app(fixture_model, indexes={"docs": index})) as server:
        plain = httpx.post(server.url + "/v1/search", json={"query": "tides", "k": 2}, timeout=60).json()
        assert len(plain["data"]) == 2 and "blocked" not in plain  # no guard unless asked
        asked = httpx.post(server.url + "/v1/search", json={"query": "tides", "guard": True}, timeout=60).json()
        assert asked["data"] == [] and asked["blocked"] is True
        bad = httpx.post(server.url + "/v1/search", json={"query": "tides", "guard": "yes"}, timeout=60)
        assert bad.status_code == 400 and "'guard'" in bad.json()["error"]["message"]
        res = runner.invoke(cli_app, ["query", "tides", "--server", server.url, "--guard", "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout) == [] and "blocked" in res.stderr and "cosine" in res.stderr
        res = runner.invoke(cli_app, ["query", "tides", "--server", server.url, "--guard"])
        assert res.exit_code == 0 and "blocked" in res.stderr and "index is empty" not in res.stderr
        res = runner.invoke(cli_app, ["query", "tides", "--server", server.url, "--json"])
        assert res.exit_code == 0 and len(json.loads(res.stdout)) == 2
        res = runner.invoke(cli_app, ["query", "tides", "--server", server.url, "--guard-config", str(index / "guard.json")])
        assert res.exit_code != 0 and "ragen serve --guard-config" in res.output


def test_a_guard_that_lets_the_query_through_reports_it(fixture_model, gen_index, tmp_path):
    lets_all = GuardConfig(threshold=1.0, decode=False).save(tmp_path / "none.json")
    with BackgroundServer(create_app(fixture_model, indexes={"docs": gen_index}, guard=lets_all)) as server:
        r = httpx.post(server.url + "/v1/search", json={"query": "tides", "k": 1}, timeout=60).json()
        assert r["blocked"] is False and len(r["data"]) == 1 and r["reason"].startswith("not a refusal")


# --- grounded answers ---------------------------------------------------------------------------------------

from tests.test_ask import QA, SYSTEM  # noqa: E402 - the taught backbone (fixture `taught`) of ragen ask


@pytest.fixture(scope="module")
def taught_server(taught):
    from ragen import load_encoder

    encoder = load_encoder(str(taught.parent / "ckpt"), device="cpu")
    with BackgroundServer(create_app(encoder, indexes={"kb": taught}, config=ServeConfig(model_name="taught"))) as server:
        yield server


def test_chat_with_an_index_cites_the_right_chunk(taught_server):
    client = _openai(taught_server.url)
    for question, (fact, path) in QA.items():
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        got = client.chat.completions.create(model="taught", messages=messages, max_tokens=24,
                                             extra_body={"index": "kb", "k": 2})
        body = got.model_dump()
        numbers = {s["number"]: s["path"] for s in body["sources"]}
        assert sorted(numbers) == [1, 2] and set(numbers.values()) == {"geo/france.txt", "sky.md"}
        right = next(n for n, p in numbers.items() if p == path)
        assert got.choices[0].message.content == f"{fact} [{right}]."
        assert body["cited"] == [right] and body["blocked"] is False and body["reason"] is None
        assert got.choices[0].finish_reason == "stop"
        # streamed: the sources come first, the pieces make the same answer, the last chunk names the citation
        events = _sse(taught_server.url, {"messages": messages, "max_tokens": 24, "index": "kb", "k": 2})
        assert [s["number"] for s in events[0]["sources"]] == sorted(numbers)
        assert {s["number"]: s["path"] for s in events[0]["sources"]} == numbers
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
        assert text == f"{fact} [{right}]."
        last = events[-2]
        assert last["choices"][0]["finish_reason"] == "stop" and last["cited"] == [right]


def test_grounded_chat_keeps_earlier_turns_and_the_requests_system_prompt(fixture_model, gen_index):
    with BackgroundServer(create_app(fixture_model, indexes={"docs": gen_index})) as server:
        q = {"role": "user", "content": "why do tides happen?"}
        base = _chat(server.url, {"messages": [q], "index": "docs", "k": 1, "max_tokens": 1}).json()
        history = [{"role": "user", "content": "an earlier question about the sea"},
                   {"role": "assistant", "content": "an earlier answer about the sea"}]
        longer = _chat(server.url, {"messages": [*history, q], "index": "docs", "k": 1, "max_tokens": 1}).json()
        system = _chat(server.url, {"messages": [{"role": "system", "content": "x"}, q], "index": "docs", "k": 1,
                                    "max_tokens": 1}).json()
    gen = ChatGenerator.from_encoder(fixture_model)
    turns = gen.count_tokens(history[0]["content"]) + gen.count_tokens(history[1]["content"])
    assert longer["usage"]["prompt_tokens"] > base["usage"]["prompt_tokens"] + turns  # both turns, templated
    assert system["usage"]["prompt_tokens"] < base["usage"]["prompt_tokens"]  # "x" replaced the long default
    assert [s["path"] for s in base["sources"]] == [s["path"] for s in longer["sources"]] and len(base["sources"]) == 1
