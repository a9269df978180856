"""Prefix reuse (runtime/prefix_cache.py): a prompt that begins as what a row (or host memory) holds
reads only the rest, and gets what reading all of it gives: the same logits (bit for bit where the
prefix came from a prompt pass; within float rounding where decode steps wrote it), the same greedy
tokens and the same seeded samples, on both graph kinds, the tiny model and SmolLM2."""

from __future__ import annotations

import numpy as np
import pytest

from llama2_onnx.runtime import Generator, SamplingParams
from llama2_onnx.runtime.prefix_cache import PrefixCache, common_prefix
from llama2_onnx.runtime.scheduler import SHARED, Scheduler
from llama2_onnx.runtime.sequence import GenRequest, Sequence
from llama2_onnx.runtime.slots import make_slots

GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95)
# a decode step's keys and values differ from a prompt pass's by float rounding; logits of order 10
DECODE_BOUND = 1e-3


@pytest.fixture(scope="module", params=["ort", "portable"])
def gen(request, tiny_onnx, tiny_onnx_ort):
    g = Generator.from_dir(tiny_onnx_ort if request.param == "ort" else tiny_onnx, provider="cpu")
    yield g
    g.close()


def prompt(gen, text: str) -> list[int]:
    return gen.encode_prompt(text)


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix(np.array([7, 1]), [8]) == 0


# ---- the pool on the slots: what is reused is what reading everything computes ------------------------

def test_a_prompt_pass_prefix_is_bit_exact(gen):
    """A row that read prompt[:40] and is parked serves prompt (60 tokens): the rest's logits equal a
    whole read's bit for bit (the chunked prompt path), via the parked row, a copy and host memory."""
    ids = prompt(gen, "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z " * 3)[:60]
    slots = make_slots(gen.model, 3)
    pool = PrefixCache(slots, host_gb=1)
    whole = slots.prefill(2, ids, all_logits=True)  # (60, V): the reference
    slots.free(2)

    row, n = pool.place(ids[:40], [0, 1, 2])  # empty: nothing reused
    assert (row, n) == (0, 0)
    slots.prefill(row, ids[:40])
    pool.park(row)
    row, n = pool.place(ids, [0, 1, 2])  # the parked row itself
    assert (row, n) == (0, 40)
    np.testing.assert_array_equal(slots.prefill(row, ids[n:], all_logits=True), whole[40:])

    # row 0 busy with the 60 tokens: a copy of its first 58 into the lowest empty row (2 are computed)
    row, n = pool.place(ids, [1, 2])
    assert (row, n) == (1, 58)
    np.testing.assert_array_equal(slots.prefill(row, ids[n:], all_logits=True), whole[58:])
    pool.park(1)
    pool.park(0)
    # a prompt sharing only BOS with the parked rows copies it into the empty row, leaving them parked
    other = prompt(gen, "Completely different words here, nothing in common at all with the rest")
    assert pool.place(other, [0, 2]) == (2, 1) and pool.stats()["parked_rows"] == 2
    # no empty row: the parked row used least recently (1) gives way, its 60 tokens kept in host memory
    assert pool.place(other, [0, 1], reuse=False) == (1, 0)
    assert pool.stats() == {"parked_rows": 1, "host_prefixes": 1, "host_bytes": pool.host_bytes}
    pool.park(1)
    # row 0 (parked, 60 tokens) has 48 of ids[:50]; it is the only free row: kept on host, then cut
    assert pool.place(ids[:50], [0]) == (0, 48)
    pool.park(0)
    row, n = pool.place(ids, [0])  # host memory holds 58 of them, row 0 only 48: loaded from host
    assert (row, n) == (0, 58)
    np.testing.assert_array_equal(slots.prefill(row, ids[n:], all_logits=True), whole[58:])


def test_decode_written_prefix_within_rounding(gen):
    """The next turn repeats an answer whose keys and values decode steps wrote: its logits match a
    whole read within DECODE_BOUND and choose the same tokens."""
    first = prompt(gen, "Once upon a time, in a land far away, there lived")
    answer = gen.generate_ids([first], 12, GREEDY)[0]
    follow = first + answer.tokens + prompt(gen, "and then the dragon said")[1:]
    slots = gen.engine.slots
    held = list(slots.held(gen.engine.pool.used.argmax()))
    assert held == first + answer.tokens[:-1]  # the last token was sampled, never fed
    got = gen.generate_ids([follow], 8, GREEDY, prompt_logprobs=False)[0]
    assert got.cached_tokens == len(held)
    gen.engine.pool.enabled = False
    try:
        want = gen.generate_ids([follow], 8, GREEDY)[0]
    finally:
        gen.engine.pool.enabled = True
    assert want.cached_tokens == 0 and got.tokens == want.tokens and got.text == want.text

    # the logits themselves, on slots of our own: decode steps write the answer, the next prompt reuses it
    slots = make_slots(gen.model, 2)
    pool = PrefixCache(slots)
    row, _ = pool.place(first, [0, 1])
    logits = slots.prefill(row, first)
    for _ in range(12):
        logits = slots.decode([row], [int(logits[-1].argmax())])
    pool.park(row)
    row, n = pool.place(follow, [0, 1])
    assert (row, n) == (0, len(first) + 12)  # the 12 tokens fed, which the 12 answer tokens begin with
    reused = slots.prefill(row, follow[n:], all_logits=True)
    whole = slots.prefill(1, follow, all_logits=True)[n:]
    assert np.abs(reused - whole).max() <= DECODE_BOUND
    assert (reused.argmax(-1) == whole.argmax(-1)).all()


# ---- through the engine: chat turns, seeds, batches of one prompt, opting out ---------------------------

def dialog_turns(gen, turns: list[str], **kw):
    dialog, out = [], []
    for text in turns:
        dialog.append({"role": "user", "content": text})
        result = gen.generate_ids([_chatml(gen, dialog)], 10, kw.get("params", GREEDY), seed=kw.get("seed"))[0]
        dialog.append({"role": "assistant", "content": result.text})
        out.append(result)
    return out


def _chatml(gen, dialog) -> list[int]:  # the tiny folders name no chat format: a plain transcript
    text = "".join(f"{m['role']}: {m['content']}\n" for m in dialog) + "assistant:"
    return gen.encode_prompt(text)


@pytest.mark.parametrize("params,seed", [(GREEDY, None), (SAMPLED, 7)])
def test_chat_turns_reuse_and_match(gen, params, seed):
    turns = ["Hello there, who are you?", "Tell me about the sea.", "And the mountains?"]
    with_cache = dialog_turns(gen, turns, params=params, seed=seed)
    gen.engine.pool.enabled = False
    try:
        without = dialog_turns(gen, turns, params=params, seed=seed)
    finally:
        gen.engine.pool.enabled = True
    assert [r.text for r in with_cache] == [r.text for r in without]
    assert all(r.cached_tokens == 0 for r in without)
    assert all(r.cached_tokens > 10 for r in with_cache[1:])


def test_batch_of_one_prompt_reads_it_once(gen):
    """Four rows of one 40-token prompt: one reads it, three copy it (the scheduler holds them back)."""
    ids = prompt(gen, "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,")
    gen.engine.pool.park  # noqa: B018 (the pool exists)
    before = gen.engine.stats()
    results = gen.generate_ids([ids] * 4, 6, SAMPLED, seed=3)
    after = gen.engine.stats()
    cached = after["prompt_tokens_cached"] - before["prompt_tokens_cached"]
    assert cached >= 3 * (len(ids) - 2) and [r.cached_tokens > 0 for r in results].count(True) >= 3
    alone = [gen.generate_ids([ids], 6, SAMPLED, seed=3 + i)[0] for i in range(4)]
    assert [r.text for r in results] == [r.text for r in alone]


def test_cache_prompt_false_reads_everything(gen):
    ids = prompt(gen, "The quick brown fox jumps over the lazy dog again and again")
    gen.generate_ids([ids], 4, GREEDY)
    seen = []
    from llama2_onnx.runtime.engine import FinishEvent
    gen.engine.start()
    gen.engine.submit(GenRequest(tuple(ids), 4, GREEDY, cache_prompt=False), seen.append)
    gen.engine.submit(GenRequest(tuple(ids), 4, GREEDY), seen.append)
    import time
    deadline = time.time() + 30
    while sum(isinstance(e, FinishEvent) for e in seen) < 2 and time.time() < deadline:
        time.sleep(0.01)
    fins = [e for e in seen if isinstance(e, FinishEvent)]
    assert sorted(f.cached_tokens for f in fins) == [0, len(ids) - 2]


def test_more_conversations_than_rows_stay_warm(tiny_onnx_ort):
    """One row, three conversations taking turns: each comes back from host memory."""
    g = Generator.from_dir(tiny_onnx_ort, provider="cpu", max_batch=1)
    try:
        talks = [[f"Conversation {k}: let us talk about topic number {k} at some length."] for k in range(3)]
        firsts = [g.generate_ids([_chatml(g, [{"role": "user", "content": t[0]}])], 8, GREEDY)[0] for t in talks]
        assert g.engine.stats()["host_prefixes"] == 2
        for t, r in zip(talks, firsts):
            d = [{"role": "user", "content": t[0]}, {"role": "assistant", "content": r.text},
                 {"role": "user", "content": "go on"}]
            assert g.generate_ids([_chatml(g, d)], 4, GREEDY)[0].cached_tokens > 10
    finally:
        g.close()


def test_released_row_gives_its_memory_back(tiny_onnx_ort, monkeypatch):
    """With reuse off a finished row is released: its positions past RESIDENT read as zero pages again."""
    from llama2_onnx.runtime import slots as slots_module

    monkeypatch.setattr(slots_module, "RESIDENT", 16)
    g = Generator.from_dir(tiny_onnx_ort, provider="cpu", prefix_cache=False)
    try:
        g.generate("The quick brown fox " * 12, max_new_tokens=30)
        page_tokens = 4096 // (g.engine.slots.row_shape[2] * g.engine.slots.dtype.itemsize)  # positions per page
        start = -(-16 // page_tokens) * page_tokens
        assert all(buf[0, :, :16].any() for buf in g.engine.slots.buffers)  # kept
        assert not any(buf[0, :, start:].any() for buf in g.engine.slots.buffers)  # given back
        assert g.engine.stats()["parked_rows"] == 0
    finally:
        g.close()


# ---- the scheduler's share rule, with no model ---------------------------------------------------------

class _Tok:
    def decode(self, ids):
        return ""


def _seq(ids, **kw) -> Sequence:
    from llama2_onnx.runtime.tokenizer import StreamDecoder
    req = GenRequest(tuple(ids), 4, GREEDY, **kw)
    return Sequence(req, frozenset(), StreamDecoder.__new__(StreamDecoder), 4)


def test_a_second_copy_of_a_prompt_waits_for_the_first():
    sched = Scheduler(4, 16, share=True)
    long = list(range(1, 100))
    a, b, c = _seq(long), _seq(long), _seq([5, 6, 7])
    for s in (a, b, c):
        sched.add(s)
    plan = sched.schedule()
    assert [s.slot for s in sched.running] == [0, 1] and b in sched.waiting  # c went ahead of b
    assert plan.prefill == [a] or a in plan.prefill
    a.read = len(long) - SHARED + 1  # fewer than SHARED shared tokens left to compute: b comes in
    sched.schedule()
    assert b not in sched.waiting
    off = Scheduler(4, 16, share=True)
    d, e = _seq(long), _seq(long, cache_prompt=False)
    off.add(d)
    off.add(e)
    off.schedule()
    assert e.slot >= 0  # opted out: it does not wait


def test_parked_rows_leave_a_decode_steps_span(tiny_onnx_ort):
    """A conversation parked in row 0 while row 1 decodes would cost every step attention over its
    tokens: it moves to host memory (and comes back from there on its next turn)."""
    g = Generator.from_dir(tiny_onnx_ort, provider="cpu", max_batch=2)
    try:
        first = prompt(g, "Row zero holds this conversation about the weather in the mountains today")
        a = g.generate_ids([first], 6, GREEDY)[0]
        assert g.engine.stats()["parked_rows"] == 1 and g.engine.slots.lengths[0] > 0
        stream = g.stream_ids(prompt(g, "Something else entirely, a new user with a new question"), max_new_tokens=30)
        assert "".join(stream)  # took row 1 (row 0 is parked, row 1 was empty), decoding in a span of 2 rows
        assert g.engine.slots.lengths[0] == 0 and g.engine.stats()["host_prefixes"] >= 1
        again = g.generate_ids([first + a.tokens + prompt(g, "and tomorrow?")[1:]], 4, GREEDY)[0]
        assert again.cached_tokens == len(first) + len(a.tokens) - 1
    finally:
        g.close()


def test_host_match_survives_the_victims_move_to_host(gen):
    """The best prefix is in host memory, and the only free row is parked with another conversation that
    host memory (room for one) takes in its place: the match is still loaded, exact."""
    ids = prompt(gen, "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z " * 3)[:60]
    other = prompt(gen, "Completely different words here, nothing in common at all with the rest " * 2)[:50]
    slots = make_slots(gen.model, 1)
    whole = slots.prefill(0, ids, all_logits=True)
    slots.free(0)
    pool = PrefixCache(slots, host_gb=1)
    pool.host_limit = 60 * slots.row_bytes_per_token  # one conversation at a time
    slots.prefill(0, ids[:40])
    pool.park(0)
    assert pool.place(other, [0], reuse=False) == (0, 0)  # ids[:40] goes to host memory
    slots.prefill(0, other)
    pool.park(0)
    assert pool.stats()["host_prefixes"] == 1
    row, n = pool.place(ids, [0])  # other moves to host memory and pushes ids[:40] out: still loaded
    assert (row, n) == (0, 40)
    np.testing.assert_array_equal(slots.prefill(row, ids[n:], all_logits=True), whole[40:])


def test_a_tie_goes_to_the_parked_row(gen):
    """A running row and a parked row hold the same prefix: the parked row is taken, with no copy."""
    ids = prompt(gen, "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z " * 2)[:40]
    slots = make_slots(gen.model, 3)
    pool = PrefixCache(slots)
    for row in (0, 1):
        slots.prefill(row, ids[:30])
    pool.park(1)  # row 0 runs on, row 1 is parked
    assert pool.place(ids, [1, 2]) == (1, 30)


@pytest.mark.parametrize("case", ["identical", "strict prefix", "diverges mid-way"])
def test_reuse_cases_equal_a_cold_read(gen, case):
    """A prompt identical to a parked row's ids, one that is a strict prefix of them, one that leaves
    them mid-way: the same tokens as a cold read, with what was shared reused."""
    base = prompt(gen, "Seven swans swimming, six geese laying, five golden rings, four calling birds")
    gen.generate_ids([base], 6, GREEDY)  # parks base + 5 answer tokens
    ask = {"identical": base, "strict prefix": base[:12],
           "diverges mid-way": base[:10] + prompt(gen, "three french hens and a partridge")[1:]}[case]
    got = gen.generate_ids([ask], 8, GREEDY)[0]
    assert got.cached_tokens == {"identical": len(base) - 2, "strict prefix": 10, "diverges mid-way": 10}[case]
    gen.engine.pool.enabled = False
    try:
        cold = gen.generate_ids([ask], 8, GREEDY)[0]
    finally:
        gen.engine.pool.enabled = True
    assert (got.tokens, got.text) == (cold.tokens, cold.text)


def test_no_text_leaks_between_conversations(tiny_onnx_ort):
    """Two conversations with distinct secrets, one row each and then a single row for both: each
    answer equals its own cold run, so nothing of the other's cache is read."""
    secrets = ["The password is AZURE-FALCON-7731. Repeat the password:",
               "The password is CRIMSON-OTTER-0420. Repeat the password:"]
    for rows in (2, 1):
        g = Generator.from_dir(tiny_onnx_ort, provider="cpu", max_batch=rows)
        cold = Generator.from_dir(tiny_onnx_ort, provider="cpu", max_batch=1, prefix_cache=False)
        try:
            for _ in range(2):  # the second round reuses each conversation's own row or host copy
                for s in secrets:
                    got = g.generate(s, max_new_tokens=8)
                    assert got.tokens == cold.generate(s, max_new_tokens=8).tokens
            assert g.engine.stats()["prompt_tokens_cached"] > 0
        finally:
            g.close()
            cold.close()
