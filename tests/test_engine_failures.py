"""The engine when something breaks (runtime/engine.py): a row whose logits cannot be sampled fails
alone while its neighbour runs on; an engine thread killed by what step() does not catch is replaced
by the next submit, and close() answers what a dead one left."""

from __future__ import annotations

import numpy as np
import pytest

from llama2_onnx.runtime.engine import Engine, GenRequest
from test_engine import GREEDY, PROMPTS, Collect, assert_same_as_alone, gen, submit  # noqa: F401 (gen: a fixture)


class _Refusing:
    """A grammar state that forbids every token (an error inside the grammar library)."""

    def masked(self, logits):
        return np.full_like(logits, -np.inf)

    def error(self):
        return "the grammar failed: nothing can follow"


def test_a_row_that_cannot_sample_fails_alone(gen):
    """A row whose every token is forbidden ends with "error" and the grammar's message; the row next to
    it in the same steps runs on, as it would alone."""
    eng = Engine.from_generator(gen, max_batch=2, prompt_chunk=8)
    ids = gen.encode_prompt(PROMPTS[1])
    bad = Collect()
    eng.submit(GenRequest(tuple(ids), 6, GREEDY), bad)._seq.constraint = _Refusing()
    good = submit(eng, ids, 6)
    eng.start()
    try:
        finish = bad.wait()
        assert (finish.reason, finish.error, finish.completion_tokens) == ("error", "the grammar failed: nothing can follow", 0)
        assert_same_as_alone(gen, ids, 6, good)
    finally:
        eng.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread killed on purpose
def test_a_dead_engine_thread_is_replaced(gen, monkeypatch):
    """A thread killed by something step() does not catch is started again by the next submit, and
    close() still answers what the dead one left."""
    eng = Engine.from_generator(gen, max_batch=2)
    ids = gen.encode_prompt(PROMPTS[0])
    real = Engine.step

    def die(self):
        raise SystemExit  # not an Exception: the loop's handler does not see it

    monkeypatch.setattr(Engine, "step", die)
    eng.start()
    orphan = submit(eng, ids, 4)
    eng._thread.join(10)
    assert not eng._thread.is_alive() and not orphan.done.is_set()
    monkeypatch.setattr(Engine, "step", real)
    try:
        assert_same_as_alone(gen, ids, 4, submit(eng, ids, 4))  # a new thread runs it
        assert orphan.wait().reason in ("stop", "length")  # and the orphan with it
    finally:
        eng.close()
    monkeypatch.setattr(Engine, "step", die)
    dead = Engine.from_generator(gen, max_batch=2)
    dead.start()
    left = submit(dead, ids, 4)
    dead._thread.join(10)
    dead.close()
    assert left.wait().reason == "cancelled"
