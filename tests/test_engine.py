"""The continuous-batching engine (runtime/engine.py) and its slots (runtime/slots.py), against
serial runs of the runtime: Model.step for the numbers, Generator.generate for the text."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from llama2_onnx.runtime import Generator, Model, SamplingParams
from llama2_onnx.runtime.slots import FusedSlots, PortableSlots, make_slots
from llama2_onnx.runtime.logprobs import log_softmax
from llama2_onnx.runtime.engine import Engine, FinishEvent, GenRequest, QueueFull, RequestError, TokenEvent

PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away, there lived", "Hi",
           "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z", "Why is the sky blue?",
           "1, 2, 3, 4, 5, 6, 7,", "Tell me a story about a dragon and a knight who", "def main():"]
GREEDY = SamplingParams()
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # Generator's reasons -> the engine's


@pytest.fixture(scope="module", params=["ort", "portable"])
def gen(request, tiny_onnx, tiny_onnx_ort):
    return Generator.from_dir(tiny_onnx_ort if request.param == "ort" else tiny_onnx, provider="cpu")


@pytest.fixture
def engine(gen):
    eng = Engine.from_generator(gen, max_batch=4, prompt_chunk=8)
    eng.start()
    yield eng
    eng.close()


class Collect:
    """on_event for one request: its events, and a flag once it finished."""

    def __init__(self, on_token=None):
        self.events, self.done, self.on_token = [], threading.Event(), on_token

    def __call__(self, e) -> None:
        self.events.append(e)
        if isinstance(e, FinishEvent):
            self.done.set()
        elif self.on_token:
            self.on_token(self)

    def wait(self) -> FinishEvent:
        assert self.done.wait(60), "no FinishEvent"
        finish = self.events[-1]
        assert isinstance(finish, FinishEvent) and sum(isinstance(e, FinishEvent) for e in self.events) == 1
        # what a streaming client adds up is the whole text
        assert "".join(e.text for e in self.tokens) + finish.tail == finish.text
        return finish

    @property
    def tokens(self) -> list[TokenEvent]:
        return [e for e in self.events if isinstance(e, TokenEvent)]

    @property
    def ids(self) -> list[int]:
        return [e.token for e in self.tokens]


def submit(engine, ids, max_tokens, params=GREEDY, **kw) -> Collect:
    c = Collect(kw.pop("on_token", None))
    engine.submit(GenRequest(tuple(ids), max_tokens, params, **kw), c)
    return c


def assert_same_as_alone(gen, ids, max_tokens, c: Collect, **kw):
    finish = c.wait()
    want = gen.generate_ids([ids], max_tokens, kw.pop("params", GREEDY), **kw)[0]
    assert c.ids == want.tokens
    assert (finish.text, finish.reason, finish.completion_tokens) == (want.text, FINISH[want.finish_reason], len(want.tokens))


# ---- slots: each row computes exactly what Model.step computes alone ---------------------------------


def serial_logits(model: Model, prompt: list[int], n: int) -> list[np.ndarray]:
    """Model.step as Generator runs it: the whole prompt, then greedy tokens one by one."""
    ids = np.array([prompt])
    cache = model.new_cache(np.ones_like(ids), capacity=len(prompt) + n)
    out = [model.step(ids, np.ones_like(ids), cache)[0].copy()]
    for _ in range(n - 1):
        out.append(model.step(np.array([[int(out[-1].argmax())]]), np.ones((1, 1), np.int64), cache)[0].copy())
    return out


def staggered(slots, prompts: list[list[int]], order: list[int], n: int, chunk: int) -> list[list[np.ndarray]]:
    """Requests join every other round into the given slots; one prompt chunk and one decode step a round."""
    state, waiting, rounds = {}, list(range(len(prompts))), 0
    while waiting or any(len(out) < n for _, _, out in state.values()):
        if waiting and rounds % 2 == 0:
            i = waiting.pop(0)
            state[i] = [order[i], 0, []]
        reading = next((i for i, (_, read, _) in state.items() if read < len(prompts[i])), None)
        if reading is not None:
            slot, read, out = state[reading]
            part = prompts[reading][read:read + chunk]
            logits = slots.prefill(slot, part)
            state[reading][1] += len(part)
            if state[reading][1] == len(prompts[reading]):
                out.append(logits[-1].copy())
        decoding = [v for v in state.values() if 0 < len(v[2]) < n]
        if decoding:
            logits = slots.decode([v[0] for v in decoding], [int(v[2][-1].argmax()) for v in decoding])
            for v, row in zip(decoding, logits):
                v[2].append(row.copy())
        rounds += 1
    return [state[i][2] for i in range(len(prompts))]


@pytest.mark.parametrize("graph", ["ort", "portable"])
def test_slots_bit_exact_vs_model_step(graph, tiny_onnx, tiny_onnx_ort):
    """Chunked prompts (first chunk, then past > 0 with S > 1) and decode batches whose rows are at
    different lengths, with rows mid-prompt inside the batch: every logit equals the serial run's."""
    model = Model.from_dir(tiny_onnx_ort if graph == "ort" else tiny_onnx, provider="cpu")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 32000, n).tolist() for n in (5, 37, 1, 60, 13)]
    slots = make_slots(model, 6)
    assert isinstance(slots, FusedSlots if graph == "ort" else PortableSlots)
    got = staggered(slots, prompts, order=[2, 0, 5, 1, 3], n=10, chunk=16)
    for p, rows in zip(prompts, got):
        for a, b in zip(serial_logits(model, p, 10), rows, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("graph", ["ort", "portable"])
def test_prefill_rows_bit_exact_vs_model_step(graph, tiny_onnx, tiny_onnx_ort):
    """First chunks of different lengths in one padded run (rows 1-3), then decode steps with a row
    already busy below them: every logit equals the serial run's."""
    model = Model.from_dir(tiny_onnx_ort if graph == "ort" else tiny_onnx, provider="cpu")
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 32000, n).tolist() for n in (9, 1, 16)]
    slots = make_slots(model, 5)
    busy = slots.prefill(0, [7, 8, 9])[0]
    first = slots.prefill_rows(1, prompts)
    assert first.shape == (3, model.config.model.vocab_size) and slots.lengths.tolist() == [3, 9, 1, 16, 0]
    got = [[row.copy()] for row in first]
    for _ in range(6):
        logits = slots.decode([0, 1, 2, 3], [int(busy.argmax())] + [int(g[-1].argmax()) for g in got])
        busy = logits[0].copy()
        for g, row in zip(got, logits[1:]):
            g.append(row.copy())
    for p, rows in zip(prompts, got):
        for a, b in zip(serial_logits(model, p, 7), rows, strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="empty slots"):
        slots.prefill_rows(3, [[1, 2]])  # slot 3 holds its prompt
    with pytest.raises(ValueError, match="empty slots"):
        slots.prefill_rows(4, [[1], [2]])  # past the last slot


def test_fused_slots_are_rows_of_one_buffer(tiny_onnx_ort):
    """A prefill writes its own row of every shared buffer, in place; a decode batch's idle rows
    get one junk position past their end and keep their length."""
    slots = FusedSlots(Model.from_dir(tiny_onnx_ort, provider="cpu"), 4)
    slots.prefill(2, [5, 6, 7])
    for buf in slots.buffers:  # (4, kv, capacity, hd)
        assert buf[2, :, :3].any() and not buf[2, :, 3:].any()
        assert not buf[[0, 1, 3]].any()
    before = [b[2].copy() for b in slots.buffers]
    slots.prefill(0, [9])
    slots.decode([0], [11])  # rows [0, 1): row 2 is outside the batch
    assert slots.lengths.tolist() == [2, 0, 3, 0]
    slots.decode([0, 2], [12, 13])  # row 1 is idle inside it
    assert slots.lengths.tolist() == [3, 0, 4, 0]
    for buf, old in zip(slots.buffers, before):
        np.testing.assert_array_equal(buf[2, :, :3], old[:, :3])  # row 2's prompt untouched
    slots.free(2)
    assert slots.lengths[2] == 0


# ---- the engine ----------------------------------------------------------------------------------------


def test_concurrent_greedy_equals_generate_alone(gen, engine):
    """8 requests with different prompts and lengths on 4 rows: each gets what generate gives it alone."""
    asks = [(gen.encode_prompt(p), 4 + 5 * i) for i, p in enumerate(PROMPTS)]
    collected = [submit(engine, ids, n) for ids, n in asks]
    for (ids, n), c in zip(asks, collected):
        assert_same_as_alone(gen, ids, n, c)
        assert c.events[-1].prompt_tokens == len(ids) and c.events[-1].ttft_s > 0
    stats = engine.stats()
    assert stats["free_slots"] == 4 and stats["running"] == stats["queued"] == 0
    assert stats["prefill_chunks"] >= sum(-(-len(ids) // 8) for ids, _ in asks)


def test_requests_arriving_together_read_their_prompts_in_one_run(gen):
    """Four requests queued before the scheduler starts take rows 0-3 and read their first chunks
    in one batched run (prefill_tokens 32 = 4 rows x 8), and each still gets what it gets alone."""
    eng = Engine.from_generator(gen, max_batch=4, prompt_chunk=8, prefill_tokens=32)
    try:
        asks = [(gen.encode_prompt(p), 6) for p in PROMPTS[:4]]
        collected = [submit(eng, ids, n) for ids, n in asks]
        eng.start()
        for (ids, n), c in zip(asks, collected):
            assert_same_as_alone(gen, ids, n, c)
        stats = eng.stats()
        chunks = sum(-(-len(ids) // 8) for ids, _ in asks)
        assert stats["prefill_chunks"] == chunks and stats["prefill_runs"] == chunks - 3
    finally:
        eng.close()


def test_request_joining_mid_stream_gets_its_own_tokens(gen, engine):
    ids, joined = gen.encode_prompt(PROMPTS[3]), []

    def join(c):  # on the scheduler thread, when the third long request has 3 tokens: the others are running
        if len(c.tokens) == 3:
            joined.append(submit(engine, ids, 20))

    long = [submit(engine, gen.encode_prompt(p), 60, on_token=join if i == 2 else None) for i, p in enumerate(PROMPTS[:3])]
    for p, c in zip(PROMPTS[:3], long):
        assert_same_as_alone(gen, gen.encode_prompt(p), 60, c)
    assert_same_as_alone(gen, ids, 20, joined[0])
    assert len(joined[0].events) - 1 < len(long[0].tokens) - 3  # it ran while they did


def test_a_long_prompt_stalls_running_streams_one_chunk_at_a_time(gen, engine):
    """While a 60-token prompt is read in chunks of 8, the running stream gets a token after each chunk."""
    chunks_at, joined = [], []

    def on_token(c):
        chunks_at.append(engine.stats()["prefill_chunks"])
        if len(c.tokens) == 2:
            joined.append(submit(engine, gen.encode_prompt(" ".join(["word"] * 58)), 3))

    running = submit(engine, gen.encode_prompt(PROMPTS[0]), 30, on_token=on_token)
    running.wait()
    assert joined[0].wait().prompt_tokens >= 57
    steps = np.diff(chunks_at)
    assert steps.max() == 1 and steps.sum() >= 7  # never two chunks between two of its tokens


def test_cancel_frees_the_row_within_a_step(gen, engine):
    ids, seen = gen.encode_prompt(PROMPTS[1]), {}
    handle = None

    def on_token(c):
        if len(c.tokens) == 3:  # on the scheduler thread, between two steps
            seen["steps"] = engine.stats()["steps"]
            threading.Thread(target=handle.cancel).start()

    c = Collect(on_token)
    handle = engine.submit(GenRequest(tuple(ids), 100, GREEDY), c)
    finish = c.wait()
    assert finish.reason == "cancelled" and finish.completion_tokens < 100
    assert engine.stats()["steps"] <= seen["steps"] + 2  # the cancel lands within a step or so
    assert engine.stats()["free_slots"] == engine.max_batch
    assert_same_as_alone(gen, ids, 5, submit(engine, ids, 5))  # and the engine keeps serving


def test_seed_gives_the_same_text_whatever_else_runs(gen, engine):
    ids, params = gen.encode_prompt(PROMPTS[0]), SamplingParams(temperature=0.9, top_p=0.95)
    alone = submit(engine, ids, 30, params, seed=42)
    alone.wait()
    others = [submit(engine, gen.encode_prompt(p), 25, SamplingParams(temperature=1.0), seed=i) for i, p in enumerate(PROMPTS[1:4])]
    again = submit(engine, ids, 30, params, seed=42)
    assert again.wait().text == alone.events[-1].text
    assert again.ids == alone.ids
    assert_same_as_alone(gen, ids, 30, again, params=params, seed=42)  # Generator's own rng rule
    for c in others:
        c.wait()


def test_stop_strings(gen, engine):
    ids = gen.encode_prompt(PROMPTS[1])
    full = gen.generate_ids([ids], 30, GREEDY)[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    c = submit(engine, ids, 30, stop=(stop, "never there"))
    assert_same_as_alone(gen, ids, 30, c, stop=[stop, "never there"])
    finish = c.events[-1]
    assert finish.reason == "stop" and stop not in finish.text and full.startswith(finish.text)


def test_logprobs_are_log_softmax_of_the_runtimes_logits(gen, engine):
    ids = gen.encode_prompt(PROMPTS[4])
    c = submit(engine, ids, 8, logprobs=3)
    c.wait()
    want = serial_logits(gen.model, ids, len(c.tokens))
    for e, logits in zip(c.tokens, want, strict=True):
        logp = log_softmax(logits)
        assert e.token == int(logits.argmax()) and e.logprob == pytest.approx(logp[e.token], abs=1e-9)
        assert [t for t, _ in e.top_logprobs] == np.argsort(-logp)[:3].tolist()
        assert e.top_logprobs[0] == (e.token, e.logprob)
    plain = submit(engine, ids, 2)
    plain.wait()
    assert all(e.logprob is None and e.top_logprobs is None for e in plain.tokens)


def test_prompt_logprobs_equal_a_full_sequence_pass(gen, engine):
    ids = gen.encode_prompt(PROMPTS[6])  # longer than a prompt chunk (8)
    c = submit(engine, ids, 1, prompt_logprobs=True)
    got = c.wait().prompt_logprobs
    model = gen.model
    cache = model.new_cache(np.ones((1, len(ids)), np.int64))
    # every position's logits: one token at a time through the runtime, then log-softmax
    rows = [model.step(np.array([[t]]), np.ones((1, 1), np.int64), cache)[0] for t in ids[:-1]]
    want = [None] + [float(log_softmax(r)[t]) for r, t in zip(rows, ids[1:])]
    assert got[0] is None and len(got) == len(ids)
    np.testing.assert_allclose(got[1:], want[1:], atol=1e-4)


def test_queue_full_and_close_cancels(gen):
    eng = Engine.from_generator(gen, max_batch=2, max_queue=2)  # not started: nothing leaves the queue
    ids = gen.encode_prompt(PROMPTS[0])
    queued = [submit(eng, ids, 5) for _ in range(4)]  # 2 for the free rows, 2 beyond them
    with pytest.raises(QueueFull):
        submit(eng, ids, 5)
    assert eng.stats()["queued"] == 4
    eng.close()
    assert [c.wait().reason for c in queued] == ["cancelled"] * 4


def test_timeout_in_the_queue_and_while_running(gen):
    eng = Engine.from_generator(gen, max_batch=2)
    ids = gen.encode_prompt(PROMPTS[0])
    queued = submit(eng, ids, 5, timeout_s=0.01)
    time.sleep(0.05)
    eng.start()
    try:
        assert queued.wait().reason == "timeout" and queued.events[-1].completion_tokens == 0
        slow = submit(eng, ids, 100, timeout_s=0.2, on_token=lambda c: time.sleep(0.02))  # ~10 tokens fit
        finish = slow.wait()
        assert finish.reason == "timeout" and 0 < finish.completion_tokens < 100
    finally:
        eng.close()


def test_bad_requests_and_a_raising_callback(gen, engine):
    for prompt in [(), (5, 10**9), tuple(range(3, 3 + engine.context))]:
        with pytest.raises(RequestError):
            engine.submit(GenRequest(prompt, 5, GREEDY), Collect())
    ids = gen.encode_prompt(PROMPTS[2])

    def boom(c):
        raise RuntimeError("client went away")

    broken = submit(engine, ids, 20, on_token=boom)
    assert broken.wait().reason == "cancelled" and len(broken.tokens) == 1
    assert_same_as_alone(gen, ids, 10, submit(engine, ids, 10))


# ---- the real default model -----------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_concurrent_greedy_equals_generate_alone():
    from llama2_onnx import assets

    gen = Generator.from_dir(assets.default_model_dir())
    eng = Engine.from_generator(gen, max_batch=8, prompt_chunk=16)
    eng.start()
    try:
        asks = [(gen.encode_prompt(p * (1 + i % 3)), 8 + 4 * i) for i, p in enumerate(PROMPTS)]
        collected = [submit(eng, ids, n) for ids, n in asks]
        for (ids, n), c in zip(asks, collected):
            assert_same_as_alone(gen, ids, n, c)
        chat = gen.chat_ids([{"role": "user", "content": "What is the capital of France?"}])
        c = submit(eng, chat, 40, logprobs=2)
        assert_same_as_alone(gen, chat, 40, c)  # the chat format's stop token ends it as Generator's does
        assert c.events[-1].reason == "stop"
    finally:
        eng.close()
