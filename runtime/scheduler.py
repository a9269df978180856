"""The scheduler: which sequences hold a row of the KV cache, and what each round runs. Policy
only: no ONNX Runtime here (the engine runs the plan; tests drive this with a fake runner).

    sched = Scheduler(max_batch=8, prompt_chunk=256)
    sched.add(seq)                       # waits for a row
    plan = sched.schedule()              # admit waiting sequences into free rows, then:
    plan.prefill                         #   the sequences whose next prompt chunk runs this round
    plan.decode                          #   the sequences past their prompt: one token each
    sched.release(seq)                   # finished, cancelled or timed out: its row is free

Rows. A waiting sequence takes a free row and keeps it until it is released: the one the KV pool
chooses (`place`: the row holding the longest prefix of its prompt, runtime/prefix_cache.py), else
the lowest (a decode step spans rows [0, k), k the highest busy row + 1, so low rows keep it short).
A sequence whose prompt begins with at least SHARED tokens that a running reader is about to compute
waits for them (sequences behind it are admitted meanwhile) and then copies them from that row: a
batch of one prompt reads it once.

Each round is one prompt run (at most) and then one decode step over every sequence past its
prompt, so a running stream waits for at most one prompt run between two of its tokens: at most
`prompt_chunk` tokens of one prompt (fewer deep into a long one, below), or the first chunks of
sequences that arrived together (below), `prefill_tokens` tokens in all.

Fair prefill: which reader's chunk runs. The reader with the fewest prompt tokens left goes first
(shortest remaining first), so a short request that arrives while a long prompt is being read is
not queued behind it: a prompt of one chunk gets its first token after at most `max_skips` + 1
prompt runs once admitted, and after the first run when no reader is being starved. So that a long
prompt is never starved by a stream of short ones, a reader passed over `max_skips` times in a row
goes next (the oldest such first): a long prompt advances at least one chunk every `max_skips` + 1
runs while other readers come and go (every max_batch - 1 others can be ahead of it at most once
more each when several starve together).

A pulled sequence (credit 0 or less: its reader has not asked for the next token yet; a speculative
round may take it below 0) sits out decode steps, keeping its row, until credit is granted.

Deep chunks: while streams are decoding, a chunk far into a long prompt is shortened (chunk()), so
that one run's work, and with it a stream's wait, stays near a first chunk's at any depth.

Prompts read together: when the chosen reader is on its first chunk, the readers on their first
chunks in the rows next to it join the run (the slots read them in one padded batch), up to
`prefill_tokens` tokens (rows x longest chunk). Prompt logprobs need every position's logits and
run alone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .prefix_cache import common_prefix
from .sequence import Sequence

MAX_SKIPS = 4  # prompt runs a reader may be passed over in a row before it goes next
DEEP = 256  # prompt tokens past which a chunk is shortened while streams decode (chunk())
SHARED = 32  # prompt tokens another reader is computing that a new sequence waits for rather than computes


@dataclass
class Plan:
    prefill: list[Sequence] = field(default_factory=list)  # their next chunks, in one run (rows ascending)
    chunks: list[tuple[int, ...]] = field(default_factory=list)  # the prompt tokens each of prefill reads
    decode: list[Sequence] = field(default_factory=list)  # one token each, in one batched step

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(self, max_batch: int, prompt_chunk: int, prefill_tokens: int | None = None,
                 max_skips: int = MAX_SKIPS, place: Callable[[Sequence, list[int]], int] | None = None,
                 share: bool = False):
        """place(seq, free rows) -> the row seq takes (the KV pool's choice: runtime/prefix_cache.py; it may
        set seq.read past a cached prefix); default: the lowest free row. share: a prompt that another
        reader is reading waits for it (below)."""
        if max_batch < 1 or prompt_chunk < 1 or max_skips < 0:
            raise ValueError("max_batch and prompt_chunk must be >= 1, max_skips >= 0")
        self.max_batch, self.prompt_chunk, self.max_skips = max_batch, prompt_chunk, max_skips
        self.min_chunk = max(1, prompt_chunk // 8)
        self.prefill_tokens = max(prefill_tokens or 2 * prompt_chunk, prompt_chunk)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.free = list(range(max_batch))  # free rows, lowest first
        self.place, self.share = place, share

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def queued(self) -> int:
        """Sequences waiting beyond the rows free now (those take the next waiting ones at once)."""
        return len(self.waiting) - len(self.free)

    def release(self, seq: Sequence) -> int | None:
        """seq leaves the scheduler; the row it held, now free (None for a waiting seq: it had none)."""
        if seq in self.running:
            self.running.remove(seq)
            self.free.append(seq.slot)
            self.free.sort()
            return seq.slot
        if seq in self.waiting:
            self.waiting.remove(seq)
        return None

    def schedule(self) -> Plan:
        self._admit()
        readers = [s for s in self.running if s.reading]
        prefill = self._group(self._next_reader(readers)) if readers else []
        for seq in readers:
            seq.skipped = 0 if seq in prefill else seq.skipped + 1
        streams = any(not s.reading and _may_decode(s) for s in self.running)
        chunks = [self.chunk(s, streams) for s in prefill]
        # a reader whose prompt ends in this run samples its first token there, then decodes with the rest
        ends = {id(s) for s, c in zip(prefill, chunks) if s.remaining_prompt <= len(c)}
        decode = [s for s in self.running if (not s.reading or id(s) in ends) and _may_decode(s)]
        return Plan(prefill, chunks, decode)

    def chunk(self, seq: Sequence, streams: bool = False) -> tuple[int, ...]:
        """The prompt tokens seq reads in its next run. With streams decoding, a chunk deep into its
        prompt is shorter: GroupQueryAttention's CPU prompt kernel scores every new token against every
        one before it, so a run's work grows with its depth. Past DEEP tokens a chunk is
        prompt_chunk * DEEP / depth tokens (at least prompt_chunk / 8): each run's attention work stays
        that of a chunk at depth DEEP, and so do the streams' gaps, however long the prompt. Alone, a
        prompt reads whole chunks."""
        n = self.prompt_chunk
        if streams and seq.read > DEEP:
            n = max(self.min_chunk, min(n, n * DEEP // seq.read))
        return seq.req.prompt[seq.read:seq.read + n]

    def _admit(self) -> None:
        for seq in list(self.waiting):
            if not self.free:
                return
            if self.share and self._follows(seq):
                continue
            self.waiting.remove(seq)
            seq.slot = self.place(seq, self.free) if self.place else self.free[0]
            self.free.remove(seq.slot)
            self.running.append(seq)

    def _follows(self, seq: Sequence) -> bool:
        """seq's prompt begins with SHARED or more tokens that a running reader has yet to compute: it
        waits (without holding back the sequences behind it) until they are in that reader's row, then
        copies them (a batch of one prompt, a shared system prompt sent by many at once)."""
        if not seq.req.cache_prompt or seq.req.prompt_logprobs:
            return False
        want = seq.req.prompt[:-1]
        return any(r.reading and r.req.cache_prompt and common_prefix(r.req.prompt, want) - r.read >= SHARED
                   for r in self.running)

    def _next_reader(self, readers: list[Sequence]) -> Sequence:
        starved = [s for s in readers if s.skipped >= self.max_skips]
        if starved:  # the longest passed over (the oldest of equals): starved readers cannot take turns forever
            return max(starved, key=lambda s: s.skipped)
        return min(readers, key=lambda s: s.remaining_prompt)  # min keeps the first of equals: the oldest

    def _group(self, seq: Sequence) -> list[Sequence]:
        """seq and the readers on their first chunks in the rows next to it, lowest row first, as many
        as prefill_tokens allows (just seq when it is past its first chunk or wants prompt logprobs)."""
        def fresh(s: Sequence) -> bool:
            return s.read == 0 and s.prompt_logprobs is None
        if not fresh(seq):
            return [seq]
        by_row = {s.slot: s for s in self.running if fresh(s)}
        group, lo, hi = [seq], seq.slot, seq.slot
        while (nxt := by_row.get(hi + 1) or by_row.get(lo - 1)) is not None:
            longest = max(min(len(s.req.prompt), self.prompt_chunk) for s in group + [nxt])
            if longest * (len(group) + 1) > self.prefill_tokens:
                break
            group.append(nxt)
            lo, hi = min(lo, nxt.slot), max(hi, nxt.slot)
        return sorted(group, key=lambda s: s.slot)


def _may_decode(seq: Sequence) -> bool:
    return seq.credit is None or seq.credit > 0
