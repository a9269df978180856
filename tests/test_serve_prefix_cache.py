"""Prefix reuse as a server's users see it: the openai client's usage.prompt_tokens_details.cached_tokens
on the next turn of a chat, the same answer as with `cache_prompt: false` (llama-server's opt-out),
and /metrics counting prompt tokens computed and reused."""

from __future__ import annotations

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from serve_live import serving  # noqa: E402


MODEL = "tiny"


@pytest.fixture(scope="module")
def url(tiny_onnx_ort):
    with serving(tiny_onnx_ort, {"metrics": True}, max_batch=2, max_queue=8, model_id=MODEL) as (u, _):
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30)


def counters(url) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if not line.startswith("#")}


def test_the_next_turn_reuses_the_conversation(client, url):
    dialog = [{"role": "user", "content": "Tell me about foxes and their dens in the forest."}]
    first = client.chat.completions.create(model=MODEL, messages=dialog, max_tokens=12, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    dialog += [{"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "And about wolves?"}]
    before = counters(url)
    second = client.chat.completions.create(model=MODEL, messages=dialog, max_tokens=12, temperature=0)
    after = counters(url)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens < cached < second.usage.prompt_tokens
    assert after["llama2_onnx_prompt_tokens_cached_total"] - before["llama2_onnx_prompt_tokens_cached_total"] == cached
    computed = after["llama2_onnx_prompt_tokens_computed_total"] - before["llama2_onnx_prompt_tokens_computed_total"]
    assert computed == second.usage.prompt_tokens - cached

    # the opt-out reads everything and answers the same
    plain = client.chat.completions.create(model=MODEL, messages=dialog, max_tokens=12, temperature=0,
                                           extra_body={"cache_prompt": False})
    assert plain.usage.prompt_tokens_details.cached_tokens == 0
    assert plain.choices[0].message.content == second.choices[0].message.content

    # streamed, with usage: the same figure in the last chunk
    chunks = list(client.chat.completions.create(model=MODEL, messages=dialog, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == second.choices[0].message.content


def test_completions_report_cached_tokens(client):
    prompt = "The quick brown fox jumps over the lazy dog, and then the dog"
    a = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, extra_body={"cache_prompt": False})
    b = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    assert a.usage.prompt_tokens_details.cached_tokens == 0
    assert b.usage.prompt_tokens_details.cached_tokens == b.usage.prompt_tokens - 2  # the last 2 are always read
    assert a.choices[0].text == b.choices[0].text


def test_cache_prompt_must_be_a_boolean(url):
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "cache_prompt": "no"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_prompt"
