"""The guard in front of every route (serve/guard.py) and the app's edges (serve/app.py): 413 for
every oversized body, chunked or not; the Host allowlist; HEAD; no CDN-loaded docs; a
non-streaming client that disconnects logs nothing; a stopping server ends running requests as
errors (a stream: an error event, then [DONE])."""

from __future__ import annotations

import json
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("fastapi")

from serve_live import LiveServer, open_service, slowed  # noqa: E402

from llama2_onnx.serve.app import ServerState, create_app  # noqa: E402
from llama2_onnx.serve.guard import host_allowed, host_name  # noqa: E402

KEY = "sk-guard"
MODEL = "tiny"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def service(tiny_onnx_ort):
    with open_service(tiny_onnx_ort, max_batch=4, max_queue=8, model_id=MODEL) as svc:
        yield svc


def served(service, **options) -> tuple[LiveServer, ServerState]:
    """A server (not started) over service, sharing it with others: state.service, not attach."""
    state = ServerState()
    state.service = service
    return LiveServer(create_app(state, **options), state=state), state


@pytest.fixture(scope="module")
def url(service):
    with served(service, api_key=KEY, max_body=4096, web=True)[0] as u:
        yield u


def wait_idle(service, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while service.engine.stats()["free_slots"] < service.engine.max_batch:
        assert time.monotonic() < deadline, "the engine did not free its rows"
        time.sleep(0.02)


# ---- bodies --------------------------------------------------------------------------------------


def test_chunked_body_over_the_limit_is_413(url):
    def chunks():
        for _ in range(10):
            yield b"x" * 1024  # 10 KiB, no Content-Length: chunked

    r = httpx.post(url + "/v1/completions", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(url + "/v1/completions", content=b"x" * 8192, headers=AUTH)  # with Content-Length, as before
    assert r.status_code == 413
    assert httpx.get(url + "/health").status_code == 200


def test_chunked_body_under_the_limit_is_read(url):
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}).encode()
    r = httpx.post(url + "/v1/completions", content=iter([body[:10], body[10:]]),
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


# ---- Host ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("header, name", [(b"localhost:8000", "localhost"), (b"[::1]:80", "::1"), (b"Example.COM", "example.com"),
                                          (b"127.0.0.1", "127.0.0.1"), (b"a.localhost:1", "a.localhost")])
def test_host_name(header, name):
    assert host_name(header) == name


@pytest.mark.parametrize("name, allowed, ok", [
    ("localhost", (), True), ("app.localhost", (), True), ("127.0.0.1", (), True), ("::1", (), True),
    ("10.0.0.5", (), True), ("attacker.example", (), False), ("attacker.example", ("chat.example",), False),
    ("chat.example", ("chat.example",), True), ("anything.example", ("*",), True), ("anything.example", None, True),
    ("localhost.attacker.example", (), False)])
def test_host_allowed(name, allowed, ok):
    assert host_allowed(name, allowed) is ok


def test_dns_rebinding_host_is_refused(url):
    r = httpx.get(url + "/v1/models", headers={**AUTH, "Host": "attacker.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    assert "--allowed-host attacker.example" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", headers={"Host": "attacker.example:80"},
                   json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 403  # before the key: a rebinding page learns nothing else
    assert httpx.get(url + "/health", headers={"Host": "localhost"}).status_code == 200


def test_allowed_hosts_and_any_host(service):
    for allowed, status in ((("chat.example",), 200), (None, 200), ((), 403)):
        with served(service, allowed_hosts=allowed)[0] as u:
            assert httpx.get(u + "/health", headers={"Host": "chat.example"}).status_code == status


# ---- small edges ---------------------------------------------------------------------------------


def test_head_on_page_and_health(url):
    for path in ("/", "/health"):
        r = httpx.head(url + path)
        assert r.status_code == 200 and r.content == b""


def test_no_cdn_docs_and_the_schema_is_open(url):
    for path in ("/docs", "/redoc"):
        assert httpx.get(url + path, headers=AUTH).status_code == 404
    r = httpx.get(url + "/openapi.json")  # no key: the schema says only what the API accepts
    assert r.status_code == 200 and "/v1/chat/completions" in r.json()["paths"]


def test_disconnected_non_stream_request_logs_nothing(url, service, caplog):
    """The disconnect watcher read task.result() of a task it had just cancelled: InvalidStateError,
    "unhandled error" and two tracebacks (~110 lines) per disconnect."""
    body = json.dumps({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 100, "temperature": 0,
                       "stop": ["never-produced"]}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    port = int(url.rsplit(":", 1)[1])
    with caplog.at_level(logging.INFO), slowed(service, 0.05):
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(head + body)
                time.sleep(0.3)  # generating: a few slowed steps
        wait_idle(service)
        time.sleep(0.2)
    lines = sum(len(r.getMessage().splitlines()) + (len(r.exc_text.splitlines()) if r.exc_text else 0)
                + (1 if r.exc_info else 0) for r in caplog.records)
    assert lines <= 3, [r.getMessage() for r in caplog.records]


# ---- stopping --------------------------------------------------------------------------------------


def _stream(u: str, body: dict) -> list:
    events = []
    with httpx.Client(timeout=30) as c, c.stream("POST", u + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_shut_down_ends_streams_with_an_error_and_done(service):
    """What the server does when its grace runs out: running streams get an error event and [DONE],
    a whole answer a 503 body, and new requests 503."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 100,
            "temperature": 0, "stream": True, "stop": ["never-produced"]}
    live, state = served(service)
    try:
        with live as u, slowed(service, 0.05), ThreadPoolExecutor(3) as pool:
            streams = [pool.submit(_stream, u, body) for _ in range(2)]
            whole = pool.submit(httpx.post, u + "/v1/chat/completions", json={**body, "stream": False}, timeout=30)
            deadline = time.monotonic() + 20
            while service.engine.stats()["decoding"] < 3:  # all three are generating
                assert time.monotonic() < deadline, service.engine.stats()
                time.sleep(0.02)
            time.sleep(0.3)  # a few slowed tokens each
            live.server.loop.call_soon_threadsafe(state.shut_down)
            results = [f.result(timeout=30) for f in streams]
            refused = whole.result(timeout=30)
            late = httpx.get(u + "/health")
    finally:
        service.stopping = False  # the module's service serves the other tests
    for events in results:
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "shutting_down", events[-3:]
        assert any(e.get("choices") and e["choices"][0]["delta"].get("content") for e in events[:-2])  # it had started
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    wait_idle(service, timeout_s=2)  # their rows were cancelled, not left to run their 100 slowed tokens
