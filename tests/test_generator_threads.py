"""A Generator inside a desktop app: a stream cancelled from another thread, one Generator shared
by four threads, and progress while a folder is verified and loaded."""

from __future__ import annotations

import threading
import time

import pytest

from llama2_onnx.runtime import Generator
from llama2_onnx.runtime.session import LOAD_STAGES

CHAT = [{"role": "user", "content": "Tell me a long story about a fox."}]


@pytest.fixture(scope="module", params=["portable", "ort"])
def gen(request, tiny_onnx, tiny_onnx_ort):
    return Generator.from_dir(tiny_onnx if request.param == "portable" else tiny_onnx_ort, provider="cpu")


class CountedSteps:
    """Wraps the model runs of gen's engine (its slots' prompt and decode runs) to count them
    (optionally slowed down)."""

    def __init__(self, gen: Generator, delay_s: float = 0.0):
        self.slots, self.delay_s, self.n = gen.engine.slots, delay_s, 0

    def _counted(self, real):
        def run(*args, **kwargs):
            self.n += 1
            if self.delay_s:
                time.sleep(self.delay_s)
            return real(*args, **kwargs)
        return run

    def __enter__(self) -> "CountedSteps":
        for name in ("prefill", "prefill_rows", "decode"):
            setattr(self.slots, name, self._counted(getattr(self.slots, name)))
        return self

    def __exit__(self, *exc) -> None:
        for name in ("prefill", "prefill_rows", "decode"):
            delattr(self.slots, name)  # the class's methods again


def test_cancel_from_another_thread_stops_before_the_next_step(gen):
    stream = gen.stream_chat(CHAT, max_new_tokens=80)
    third, resume, pieces = threading.Event(), threading.Event(), []

    def consume() -> None:
        for piece in stream:
            pieces.append(piece)
            if len(pieces) == 3:
                third.set()
                resume.wait(10)

    with CountedSteps(gen) as steps:
        worker = threading.Thread(target=consume)
        worker.start()
        assert third.wait(30)
        stream.cancel()  # from this thread, while the worker is between steps
        at_cancel = steps.n
        resume.set()
        worker.join(30)
    result = stream.result
    assert stream.cancelled and result.finish_reason == "cancelled"
    assert steps.n == at_cancel  # not one more model step
    assert result.text == "".join(pieces) and len(result.tokens) < 80


def test_cancel_at_any_moment_ends_within_one_step(gen):
    stream = gen.stream_chat(CHAT, max_new_tokens=100)
    with CountedSteps(gen, delay_s=0.01) as steps:
        worker = threading.Thread(target=lambda: [None for _ in stream])
        worker.start()
        time.sleep(0.15)
        stream.cancel()
        at_cancel = steps.n
        worker.join(30)
    assert not worker.is_alive()
    assert stream.result.finish_reason == "cancelled" and steps.n - at_cancel <= 1


def test_four_threads_share_one_generator(gen):
    calls = [  # greedy and seeded sampling, plain and chat, batch and stream
        lambda: gen.generate("The quick brown fox", max_new_tokens=30).tokens,
        lambda: gen.chat(CHAT, max_new_tokens=25, temperature=0.8, top_p=0.9, seed=3).tokens,
        lambda: [r.tokens for r in gen.generate(["Once upon a time", "Hi"], max_new_tokens=20, temperature=1.0, seed=5)],
        lambda: "".join(gen.stream("A list of fruits:", max_new_tokens=30, temperature=0.7, seed=11)),
    ]
    serial = [call() for call in calls]
    for _ in range(2):
        got: list = [None] * len(calls)
        start = threading.Barrier(len(calls))

        def run(i: int) -> None:
            start.wait()
            got[i] = calls[i]()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert got == serial


def test_four_threads_are_decoded_in_one_batch(gen):
    """The calls of four threads share the engine's decode steps: far fewer steps than tokens, each
    answer still its serial run's."""
    prompts = ["The quick brown fox", "Once upon a time", "A list of fruits:", "Hi there"]
    serial = [gen.generate(p, max_new_tokens=40, temperature=0.8, seed=i).tokens for i, p in enumerate(prompts)]
    got: list = [None] * 4
    start = threading.Barrier(4)

    def run(i: int) -> None:
        start.wait()
        got[i] = gen.generate(prompts[i], max_new_tokens=40, temperature=0.8, seed=i).tokens

    with CountedSteps(gen, delay_s=0.002) as steps:  # slowed a little: the four arrive within a step or two
        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert got == serial
    tokens = sum(len(t) for t in got)
    # alone: one run per token (prompt runs included); together: about one per token of the longest
    assert steps.n < 0.5 * tokens, (steps.n, tokens)


def test_progress_while_loading(tiny_onnx_ort):
    seen = []
    Generator.from_dir(tiny_onnx_ort, provider="cpu", check_hashes=True, progress=lambda *a: seen.append(a))
    total = len(LOAD_STAGES)
    assert seen == [*[(stage, i, total) for i, stage in enumerate(LOAD_STAGES)], ("ready", total, total)]
