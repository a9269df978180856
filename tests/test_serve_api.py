"""The HTTP server on the tiny fused model: a real uvicorn on a free 127.0.0.1 port, driven by the
official openai client and httpx. (The engine's own batching tests are in test_engine.py.)"""

from __future__ import annotations

import json
import math
import time

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from serve_live import LiveServer, rows_busy  # noqa: E402

from llama2_onnx.serve.app import ServerState, create_app  # noqa: E402
from llama2_onnx.serve.service import Service  # noqa: E402

KEY = "sk-test-key"
MODEL = "tiny"
MSGS = [{"role": "user", "content": "Tell me about foxes."}]
GREEDY = dict(temperature=0)


@pytest.fixture(scope="module")
def service(tiny_onnx_ort):
    svc = Service.open(tiny_onnx_ort, max_batch=4, max_queue=8, model_id=MODEL, provider="cpu")
    try:
        yield svc
    finally:
        svc.close()


@pytest.fixture(scope="module")
def url(service):
    state = ServerState()
    app = create_app(state, api_key=KEY, metrics=True, max_body=64 * 1024)
    state.attach(service)
    with LiveServer(app) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def post(url, path, body, key=KEY, timeout=30):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, json=body, headers=headers, timeout=timeout)


def metrics(url) -> dict[str, float]:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if not line.startswith("#")}


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max()
    return x - np.log(np.exp(x).sum())


# ---- the routes, as the openai client sees them ------------------------------------------------


def test_health_and_models(url, client):
    assert httpx.get(url + "/health").status_code == 200  # open without a key
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_health_503_while_loading():
    state = ServerState()
    with LiveServer(create_app(state)) as u:
        r = httpx.get(u + "/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert httpx.post(u + "/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 503


def test_chat_equals_generator(client, service):
    r = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=12, **GREEDY)
    want = service.gen.chat(MSGS, max_new_tokens=12)
    assert r.choices[0].message.content == want.text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(service.gen.chat_ids(MSGS))
    assert r.usage.completion_tokens == len(want.tokens)


def test_chat_stream_equals_non_stream(client):
    whole = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=16, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=16, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_sse_ends_with_done(url):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_completion_list_and_stream(client, service):
    prompts = ["The quick brown fox", "Once upon a time, in a land far away,"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=10, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1]
    for prompt, choice in zip(prompts, r.choices):
        want = service.gen.generate(prompt, max_new_tokens=10)
        assert choice.text.lstrip(" ") == want.text.lstrip(" ")
    streamed = ["", ""]
    for chunk in client.completions.create(model=MODEL, prompt=prompts, max_tokens=10, stream=True, **GREEDY):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == [c.text for c in r.choices]


def test_stop_strings(client):
    full = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=20, **GREEDY).choices[0].text
    stop = full.strip()[3:6]
    assert len(stop) == 3
    cut = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=20, stop=[stop, "zzzz"], **GREEDY)
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].text and full.startswith(cut.choices[0].text)
    chunks = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=20, stop=stop, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cut.choices[0].text


def test_seed_gives_the_same_text(client):
    kw = dict(model=MODEL, messages=MSGS, max_tokens=16, temperature=1.0, top_p=0.95)
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    others = {client.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (1, 2, 3)}
    assert a == b
    assert len(others | {a}) > 1


def test_chat_logprobs_equal_the_runtime(client, service, tiny_onnx_ort):
    from llama2_onnx.runtime.session import Model

    r = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=3, logprobs=True, top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    first = content[0]
    assert len(first.top_logprobs) == 3
    assert first.top_logprobs[0].logprob == first.logprob  # greedy: the chosen token is the best
    assert bytes(first.bytes).decode("utf-8", errors="replace") == first.token
    # the runtime's own logits for the prompt, through Model directly
    model = Model.from_dir(tiny_onnx_ort, provider="cpu")
    ids = np.array([service.gen.chat_ids(MSGS)])
    logits = model.step(ids, np.ones_like(ids), model.new_cache(np.ones_like(ids)))[0]
    want = log_softmax(logits)
    assert math.isclose(first.logprob, want.max(), abs_tol=1e-4)
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(np.sort(want)[::-1][:3], abs=1e-4)


def test_completion_logprobs_and_echo(client, service):
    prompt = "The quick brown fox"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, logprobs=2, echo=True, **GREEDY)
    choice = r.choices[0]
    lp = choice.logprobs
    n_prompt = len(service.gen.encode_prompt(prompt))
    assert choice.text.startswith(prompt)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n_prompt + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)
    assert all(len(d) >= 2 for d in lp.top_logprobs[n_prompt:])
    # the prompt's tokens carry their top 2 alternatives too (plus the token itself when not among them),
    # equal to the runtime's own log-softmax over the prompt pass's logits
    from llama2_onnx.runtime.session import Model

    model = Model.from_dir(service.gen.model.folder, provider="cpu")
    ids = np.array([service.gen.encode_prompt(prompt)])
    logits = model.step(ids, np.ones_like(ids), model.new_cache(np.ones_like(ids)), all_logits=True)[0]  # (S, V)
    for i in range(1, n_prompt):
        want = log_softmax(logits[i - 1])
        best = np.sort(want)[::-1][:2]
        got = lp.top_logprobs[i]
        assert 2 <= len(got) <= 3 and lp.tokens[i] in got
        assert sorted(got.values(), reverse=True)[:2] == pytest.approx(best, abs=1e-4)
        assert lp.token_logprobs[i] == pytest.approx(want[ids[0, i]], abs=1e-4)
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, logprobs=0, **GREEDY).choices[0]
    assert choice.text == prompt + plain.text
    assert plain.logprobs.token_logprobs == pytest.approx(lp.token_logprobs[n_prompt:], abs=1e-9)
    assert plain.logprobs.text_offset[0] == 0


def test_completion_text_offsets_count_the_returned_text(client, service):
    """A completion continues its prompt, so its first token keeps SentencePiece's leading space in the
    returned text; every token's text_offset points at that token in the returned text, and the
    non-streamed offsets equal the streamed ones (which count the text as it is sent)."""
    texts, tok = service.texts, service.tokenizer
    ids = tok.encode("Hello world again", bos=False, eos=False)  # ▁Hello ▁world ▁again
    returned = "0123456789" + " " + tok.decode(ids)  # decoded alone the first space is dropped; returned, it is kept
    offsets = texts.offsets(ids, 10, after=tok.encode("Say", bos=False, eos=False)[-1])
    assert [returned[o:o + len(texts.text(i))] for o, i in zip(offsets, ids)] == [texts.text(i) for i in ids]

    kw = dict(model=MODEL, prompt="The quick brown fox", max_tokens=8, logprobs=0, **GREEDY)
    whole = client.completions.create(**kw).choices[0].logprobs.text_offset
    streamed = [o for c in client.completions.create(stream=True, **kw) if c.choices and c.choices[0].logprobs
                for o in c.choices[0].logprobs.text_offset]
    assert whole == streamed


def test_score_model_card_sample(url):
    body = {"input_data": {"input_string": ["the meaning of life is", "Hello"],
                           "parameters": {"temperature": 0.5, "top_p": 0.5, "max_new_tokens": 10, "do_sample": True}}}
    r = post(url, "/score", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert isinstance(out, list) and len(out) == 1 and set(out[0]) == {"0", "1"}
    assert out[0]["0"].startswith("the meaning of life is") and len(out[0]["0"]) > len("the meaning of life is")
    assert out[0]["1"].startswith("Hello")
    body["input_data"]["parameters"] = {"max_new_tokens": 5, "return_full_text": False}
    part = post(url, "/score", body).json()[0]["0"]
    assert not part.startswith("the meaning")


def test_score_chat(url, service):
    body = {"input_data": {"input_string": MSGS, "parameters": {"max_new_tokens": 8, "do_sample": False}}}
    r = post(url, "/score", body)
    assert r.status_code == 200
    assert r.json() == {"output": service.gen.chat(MSGS, max_new_tokens=8).text}


def test_tokenize_detokenize(url, service):
    r = post(url, "/tokenize", {"prompt": "hello world"}).json()
    assert r["tokens"] == service.gen.encode_prompt("hello world") and r["count"] == len(r["tokens"])
    assert post(url, "/tokenize", {"messages": MSGS}).json()["tokens"] == service.gen.chat_ids(MSGS)
    assert post(url, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": "hello world"}


# ---- errors ---------------------------------------------------------------------------------------------


def test_api_key(url):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    for key in (None, "wrong", KEY + "x"):
        r = post(url, "/v1/completions", body, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_unknown_model_and_route(url, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=MSGS, max_tokens=1)
    assert e.value.body["code"] == "model_not_found"
    r = httpx.get(url + "/v2/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_body_too_large(url):
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "x" * 70000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_context_length_exceeded(url, service):
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "word " * 200, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": service.context})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


C = {"model": MODEL, "messages": MSGS, "max_tokens": 2}
P = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
S = {"input_data": {"input_string": ["hi"], "parameters": {"max_new_tokens": 2}}}
BAD = [  # (route, body, the param the 400 names)
    ("/v1/chat/completions", {**C, "n": 0}, "n"),
    ("/v1/chat/completions", {**C, "n": 17}, "n"),
    ("/v1/completions", {**P, "prompt": ["a"] * 16, "n": 5}, "n"),
    ("/v1/chat/completions", {**C, "frequency_penalty": 3}, "frequency_penalty"),
    ("/v1/completions", {**P, "presence_penalty": -2.5}, "presence_penalty"),
    ("/v1/chat/completions", {**C, "logit_bias": {"word": -100}}, "logit_bias"),
    ("/v1/chat/completions", {**C, "logit_bias": {"50": -101}}, "logit_bias"),
    ("/v1/chat/completions", {**C, "logit_bias": {"99999999": 5}}, "logit_bias"),
    ("/v1/chat/completions", {**C, "tools": []}, "tools"),
    ("/v1/chat/completions", {**C, "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {**C, "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {**C, "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {**C, "top_p": 1.5}, "top_p"),
    ("/v1/chat/completions", {**C, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {**C, "max_tokens": True}, "max_tokens"),
    ("/v1/chat/completions", {**C, "max_completion_tokens": 3}, "max_completion_tokens"),
    ("/v1/chat/completions", {**C, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/chat/completions", {**C, "stop": ""}, "stop"),
    ("/v1/chat/completions", {**C, "stop": 5}, "stop"),
    ("/v1/chat/completions", {**C, "seed": -1}, "seed"),
    ("/v1/chat/completions", {**C, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {**C, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {**C, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {**C, "stream": True, "stream_options": {"extra": 1}}, "stream_options.extra"),
    ("/v1/chat/completions", {**C, "messages": []}, "messages"),
    ("/v1/chat/completions", {**C, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {**C, "messages": [{"role": "user", "content": "x", "name": "b" * 65}]}, "messages[0].name"),
    ("/v1/chat/completions", {**C, "messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]},
     "messages[0].content"),
    ("/v1/chat/completions", {**C, "messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": MSGS}, "model"),
    ("/v1/completions", {**P, "logprobs": 6}, "logprobs"),
    ("/v1/completions", {**P, "logprobs": True}, "logprobs"),
    ("/v1/completions", {**P, "suffix": "x"}, "suffix"),
    ("/v1/completions", {**P, "prompt": [1, 2, 99999999]}, "prompt"),
    ("/v1/completions", {**P, "prompt": [[1, 2], []]}, "prompt"),
    ("/v1/completions", {**P, "prompt": []}, "prompt"),
    ("/v1/completions", {**P, "prompt": "  "}, "prompt"),
    ("/v1/completions", {**P, "echo": "yes"}, "echo"),
    ("/v1/completions", {**P, "best_of": 2}, "best_of"),
    ("/v1/completions", {**P, "stream": True, "echo": True, "logprobs": 1}, "echo"),
    ("/score", {"input_data": {"input_string": ["hi"], "parameters": {"num_beams": 4}}}, "input_data.parameters.num_beams"),
    ("/score", {"input_data": {"input_string": ["hi"], "parameters": {"do_sample": True, "temperature": 0}}},
     "input_data.parameters.temperature"),
    ("/score", {"input_data": {"input_string": []}}, "input_data.input_string"),
    ("/score", {**S, "extra": 1}, "extra"),
    ("/tokenize", {"prompt": "x", "messages": MSGS}, "prompt"),
    ("/detokenize", {"tokens": [10 ** 9]}, "tokens[0]"),
]


def test_no_op_penalties_and_bias_are_accepted(client):
    """What chat front ends send with every request: zero penalties and an empty logit_bias."""
    noop = dict(frequency_penalty=0, presence_penalty=0.0, logit_bias={})
    chat = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2, temperature=0, **noop)
    plain = client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2, temperature=0)
    assert chat.choices[0].message.content == plain.choices[0].message.content
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=1, **noop).choices


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{p}:{param}" for p, _, param in BAD])
def test_bad_parameter_is_400(url, client, path, body, param):
    r = post(url, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    assert client.completions.create(model=MODEL, prompt="still serving", max_tokens=1).choices  # still serving


def test_invalid_json_is_400_not_422(url):
    r = httpx.post(url + "/v1/completions", content=b'{"model": ', headers={"Authorization": f"Bearer {KEY}",
                                                                           "Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


# ---- cancellation, backpressure, metrics ----------------------------------------------------------------


def _wait_idle(url, timeout_s=10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = metrics(url)
        if m["llama2_onnx_requests_running"] == 0 and m["llama2_onnx_requests_queued"] == 0:
            return m
        time.sleep(0.02)
    raise AssertionError("the engine did not free its rows")


def test_disconnect_mid_stream_frees_the_row(url):
    before = _wait_idle(url).get('llama2_onnx_engine_finished_cancelled', 0)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 120, "temperature": 0, "stream": True,
            "stop": ["never-produced-stop-text"]}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
            lines = r.iter_lines()
            next(lines)  # the stream has started: the request holds a row
    m = _wait_idle(url)
    assert m['llama2_onnx_engine_finished_cancelled'] == before + 1


def test_disconnect_non_stream_frees_the_row(url):
    before = _wait_idle(url).get('llama2_onnx_engine_finished_cancelled', 0)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 120, "temperature": 0,
            "stop": ["never-produced-stop-text"]}
    with pytest.raises(httpx.TimeoutException):
        post(url, "/v1/completions", body, timeout=httpx.Timeout(30, read=0.02))
    m = _wait_idle(url)
    assert m['llama2_onnx_engine_finished_cancelled'] == before + 1


def test_full_queue_is_503(tiny_onnx_ort):
    svc = Service.open(tiny_onnx_ort, max_batch=1, max_queue=0, model_id=MODEL, provider="cpu")
    state = ServerState()
    state.attach(svc)
    try:
        with LiveServer(create_app(state)) as u, rows_busy(svc):
            r = httpx.post(u + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 503 and r.headers["Retry-After"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
            assert httpx.get(u + "/health").status_code == 200
    finally:
        svc.close()


def test_metrics_text(url, client):
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=3)
    m = metrics(url)
    assert m['llama2_onnx_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert m["llama2_onnx_generation_tokens_total"] >= 3 and m["llama2_onnx_prompt_tokens_total"] > 0
    assert m['llama2_onnx_time_to_first_token_seconds_bucket{le="+Inf"}'] >= 1
    assert m["llama2_onnx_time_per_output_token_seconds_count"] >= 2
    assert "llama2_onnx_batch_occupancy" in m and m["llama2_onnx_engine_max_batch"] == 4


def test_no_cors_unless_asked(url, service):
    r = httpx.get(url + "/health", headers={"Origin": "http://evil.example"})
    assert not any(h.lower().startswith("access-control") for h in r.headers)
    state = ServerState()
    state.service = service  # not attach: the module's server keeps its counters
    with LiveServer(create_app(state, cors_origins=("http://ok.example",))) as u:
        r = httpx.options(u + "/v1/completions", headers={"Origin": "http://ok.example", "Access-Control-Request-Method": "POST"})
        assert r.headers["access-control-allow-origin"] == "http://ok.example"
        r = httpx.get(u + "/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
