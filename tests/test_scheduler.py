"""The scheduler's policy (runtime/scheduler.py) with a fake runner: no model, no ONNX Runtime.
Rows, one prompt run a round, shortest remaining prompt first without starving a long one,
first chunks read together, pulled sequences sitting out decode steps."""

from __future__ import annotations

import pytest

from llama2_onnx.runtime.sampler import SamplingParams
from llama2_onnx.runtime.scheduler import DEEP, MAX_SKIPS, Scheduler
from llama2_onnx.runtime.sequence import GenRequest, Sequence

CHUNK = 256


def seq(prompt_len: int, tokens: int = 8, **kw) -> Sequence:
    req = GenRequest(tuple(range(1, prompt_len + 1)), tokens, SamplingParams(), **kw)
    return Sequence(req, frozenset(), decoder=None, budget=tokens)


class FakeRunner:
    """Runs plans as the engine would: a prompt run advances its readers, a decode step gives each a
    token; a sequence with its budget done is released. Records what each round ran."""

    def __init__(self, sched: Scheduler):
        self.sched, self.rounds = sched, []

    def round(self):
        plan = self.sched.schedule()
        self.rounds.append(plan)
        for s, chunk in zip(plan.prefill, plan.chunks):
            s.read += len(chunk)
            if not s.reading:
                s.tokens.append(0)  # the first token, sampled from the prompt run
        for s in plan.decode:
            if not s.reading and len(s.tokens) < s.budget:
                s.tokens.append(0)
        for s in list(self.sched.running):
            if len(s.tokens) >= s.budget:
                self.sched.release(s)
        return plan

    def until_first_token(self, s: Sequence, limit: int = 1000) -> int:
        """Rounds until s has its first token."""
        for n in range(1, limit + 1):
            self.round()
            if s.tokens:
                return n
        raise AssertionError("no first token")


def test_rows_lowest_free_first_and_released():
    sched = Scheduler(max_batch=2, prompt_chunk=CHUNK)
    a, b, c = seq(4), seq(4), seq(4)
    for s in (a, b, c):
        sched.add(s)
    sched.schedule()
    assert (a.slot, b.slot) == (0, 1) and c in sched.waiting and sched.queued == 1
    assert sched.release(a) == 0
    sched.schedule()
    assert c.slot == 0 and sched.free == []
    assert sched.release(seq(4)) is None  # never added: nothing to free


def test_a_short_prompt_is_not_queued_behind_a_long_one():
    """A 4000-token prompt is being read; a 4-token request arrives: its prompt runs next, so its
    first token comes one round later (the long prompt read in arrival order would take 16)."""
    sched = Scheduler(max_batch=4, prompt_chunk=CHUNK)
    run = FakeRunner(sched)
    long = seq(4000)
    sched.add(long)
    for _ in range(3):
        run.round()
    short = seq(4)
    sched.add(short)
    assert run.until_first_token(short) == 1
    assert long.reading and long.read == 3 * CHUNK


def test_a_long_prompt_is_not_starved_by_short_ones():
    """A new short request every round: the long prompt still gets a chunk at least every MAX_SKIPS + 1 runs."""
    sched = Scheduler(max_batch=8, prompt_chunk=CHUNK)
    run = FakeRunner(sched)
    long = seq(4000, tokens=1)
    sched.add(long)
    served = []
    for n in range(60):
        sched.add(seq(CHUNK - 1, tokens=1))  # each one chunk, always shorter than what the long one has left
        before = long.read
        run.round()
        if long.read > before:
            served.append(n)
        if not long.reading:
            break
    gaps = [b - a for a, b in zip([-1] + served, served)]
    assert max(gaps) <= MAX_SKIPS + 1, gaps
    assert any(len(p.prefill) == 1 and p.prefill[0] is not long for p in run.rounds)  # short ones did go first


def test_one_prompt_run_a_round_and_every_decoder_steps():
    """A running stream waits at most one prompt run (prefill_tokens at most) between two of its tokens."""
    sched = Scheduler(max_batch=4, prompt_chunk=CHUNK)
    run = FakeRunner(sched)
    stream = seq(10, tokens=40)
    sched.add(stream)
    run.round()
    sched.add(seq(3000))
    sched.add(seq(2000))
    for _ in range(20):
        plan = run.round()
        assert stream in plan.decode
        assert len(plan.prefill) * CHUNK <= sched.prefill_tokens


def test_first_chunks_of_neighbouring_rows_are_read_together():
    sched = Scheduler(max_batch=4, prompt_chunk=8, prefill_tokens=24)
    readers = [seq(n) for n in (5, 12, 7, 30)]
    for s in readers:
        sched.add(s)
    plan = sched.schedule()
    assert plan.prefill == readers[:3]  # 3 rows x 8 = 24 tokens: the fourth would pass prefill_tokens
    # logprob readers run alone
    sched2 = Scheduler(max_batch=2, prompt_chunk=8)
    a, b = seq(5, prompt_logprobs=True), seq(6)
    sched2.add(a)
    sched2.add(b)
    assert sched2.schedule().prefill == [a]


def test_a_reader_ending_its_prompt_decodes_in_the_same_round():
    sched = Scheduler(max_batch=2, prompt_chunk=CHUNK)
    s = seq(10)
    sched.add(s)
    plan = sched.schedule()
    assert plan.prefill == [s] and plan.decode == [s]
    long = seq(600)
    sched.add(long)
    plan = sched.schedule()
    assert long in plan.prefill and long not in plan.decode  # 600 tokens: not done after one chunk


def test_a_pulled_sequence_sits_out_decode_steps_until_granted():
    sched = Scheduler(max_batch=2, prompt_chunk=CHUNK)
    pulled, free = seq(4), seq(4)
    pulled.credit = 0
    for s in (pulled, free):
        sched.add(s)
        s.read = 4  # prompts read
    sched.schedule()
    assert sched.schedule().decode == [free]
    pulled.credit = 1
    assert sched.schedule().decode == [pulled, free]


@pytest.mark.parametrize("bad", [dict(max_batch=0, prompt_chunk=8), dict(max_batch=1, prompt_chunk=0),
                                 dict(max_batch=1, prompt_chunk=8, max_skips=-1)])
def test_bad_settings(bad):
    with pytest.raises(ValueError):
        Scheduler(**bad)


def test_deep_chunks_shrink_only_while_streams_decode():
    """Alone, a long prompt reads whole chunks; with a stream decoding, a chunk at depth d > DEEP is
    CHUNK * DEEP / d tokens (at least CHUNK / 8), so each run's attention work stays that at DEEP."""
    alone = Scheduler(max_batch=2, prompt_chunk=CHUNK)
    run = FakeRunner(alone)
    long = seq(4000, tokens=1)
    alone.add(long)
    while long.reading:
        plan = run.round()
        assert len(plan.chunks[0]) == min(CHUNK, 4000 - (long.read - len(plan.chunks[0])))
    shared = Scheduler(max_batch=2, prompt_chunk=CHUNK)
    run = FakeRunner(shared)
    stream, long = seq(4, tokens=10_000), seq(4000, tokens=1)
    shared.add(stream)
    run.round()
    shared.add(long)
    sizes = {}
    while long.reading:
        depth = long.read
        plan = run.round()
        sizes[depth] = len(plan.chunks[0])
        assert stream in plan.decode
    assert all(n == CHUNK for depth, n in sizes.items() if depth <= DEEP)
    for depth, n in sizes.items():
        if depth > DEEP:
            assert n == min(max(CHUNK // 8, CHUNK * DEEP // depth), 4000 - depth), (depth, n)
    assert CHUNK // 8 in sizes.values()  # the floor, reached deep in the prompt
