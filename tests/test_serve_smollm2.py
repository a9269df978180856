"""The server on the default model (SmolLM2, the fused graph): the openai client's chat as users
see it, concurrent requests equal serial runs, and a full queue / disconnect on a real prompt pass."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from serve_live import LiveServer  # noqa: E402

from llama2_onnx.assets import default_model_dir  # noqa: E402
from llama2_onnx.serve.app import ServerState, create_app  # noqa: E402
from llama2_onnx.serve.service import Service  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "smollm2"


@pytest.fixture(scope="module")
def server():
    svc = Service.open(default_model_dir(), max_batch=4, max_queue=4, model_id=MODEL, provider="cpu")
    state = ServerState()
    state.attach(svc)
    try:
        with LiveServer(create_app(state, metrics=True)) as url:
            yield svc, url
    finally:
        svc.close()


def test_openai_chat(server):
    svc, url = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0)
    want = svc.gen.chat(msgs, max_new_tokens=16)
    assert r.choices[0].message.content == want.text
    assert "Paris" in r.choices[0].message.content
    chunks = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text


def test_concurrent_requests_equal_serial_runs(server):
    svc, url = server
    jobs = [("The capital of France is", 12), ("Once upon a time", 20), ("def fibonacci(n):", 16), ("Water boils at", 8)]
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def one(job):
        prompt, n = job
        return client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0).choices[0].text

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(one, jobs))
    assert got == [svc.gen.generate(p, max_new_tokens=n).text for p, n in jobs]


def test_full_queue_then_disconnects_free_the_rows(server):
    svc, url = server
    long_prompt = "The history of the city is long and complicated. " * 60  # ~600 tokens: a prompt pass of seconds
    body = {"model": MODEL, "prompt": long_prompt, "max_tokens": 200, "stream": True}
    opened, clients = [], []
    try:
        for _ in range(8):  # 4 rows + 4 waiting
            c = httpx.Client(timeout=60)
            clients.append(c)
            resp = c.send(c.build_request("POST", url + "/v1/completions", json=body), stream=True)
            assert resp.status_code == 200
            opened.append(resp)  # a burst: requests for free rows never count against max_queue
        r = httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=30)
        assert r.status_code == 503 and r.headers["Retry-After"]
        assert svc.stats()["running"] + svc.stats()["queued"] == 8
    finally:
        for resp in opened:
            resp.close()
        for c in clients:
            c.close()
    deadline = time.monotonic() + 30
    while svc.stats()["running"] or svc.stats()["queued"]:
        assert time.monotonic() < deadline, svc.stats()
        time.sleep(0.05)
    assert httpx.get(url + "/health").status_code == 200
