"""Prefix reuse: the KV cache's rows remember what they hold, so a prompt that begins with tokens some
row (or host memory) already holds reads only the rest.

    pool = PrefixCache(slots, host_gb=1.0)
    row, n = pool.place(prompt, free_rows)   # a free row for the prompt, holding its longest cached prefix
    ...                                      # the prompt pass starts at prompt[n:]
    pool.park(row)                           # the sequence left: the row keeps its tokens for later prompts

Where a prefix comes from, best first (the longest wins; a tie goes to the first kind listed):
  1. a parked row: a finished sequence's row keeps its cache and its ids (`slots.held(row)`: the prompt
     and every generated token fed back, so the next turn of a conversation, which repeats them, reads
     only its new message). A prompt that goes on from all the row holds takes that row itself:
     nothing is copied; one that shares only its start (a system prompt) copies that part into
     another row, leaving the parked conversation as it is;
  2. a row in use by another sequence (a shared system prompt, many users at once), copied into the new
     row: one memory copy per layer, far cheaper on a CPU than computing the tokens again;
  3. host memory: a parked row that had to give its row up is kept there (least recently used first
     out, up to `host_gb`), so more conversations stay warm than there are rows, and copied back.
A free row for a sequence that reuses nothing (or copies its prefix) is an empty row (the lowest), else
the parked row used least recently, which first moves to host memory.

Why whole rows rather than blocks (vLLM's paged blocks, SGLang's radix tree): the fused graph's
GroupQueryAttention reads each row's cache as one contiguous buffer [n_kv_heads, capacity, head_dim],
with no block table, so a prefix cannot be shared in place between rows; it is copied. A copy costs
milliseconds for thousands of tokens on the CPU (SmolLM2: 46 KB per token), so rows plus copies give
the same hits as a radix tree for chat (one conversation per row) and shared system prompts.

Exactness. At least MIN_COMPUTED = 2 prompt tokens are always computed, and a prompt scored for prompt
logprobs reads everything. Where the reused keys and values came from a prompt pass, the logits are
those of reading the whole prompt bit for bit on the CPU (the chunked prompt path); where decode steps
wrote them (the previous answer, in a chat), they equal a whole read to float rounding (GQA's decode
kernel rounds differently; tests/test_prefix_cache.py states and checks the bound, 1e-3 on logits of
order 10); greedy output and seeded samples are the same text.

On a GPU the fused rows live in device memory and are not copied: only a parked row is taken over.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

from .slots import SavedPrefix, Slots

HOST_GB = 1.0  # host memory for parked prefixes beyond the rows (the server's --prefix-cache-gb)
# prompt tokens always computed: the last one's logits give the first new token, and a run of one
# token takes GroupQueryAttention's decode kernel, which rounds differently from the prompt pass's
MIN_COMPUTED = 2
MIN_SAVE = 16  # a parked row shorter than this is not worth keeping in host memory


def common_prefix(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> int:
    """The number of leading tokens a and b share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


class PrefixCache:
    def __init__(self, slots: Slots, enabled: bool = True, host_gb: float = HOST_GB):
        if host_gb < 0:
            raise ValueError(f"host_gb must be >= 0, got {host_gb}")
        self.slots, self.enabled, self.host_gb = slots, enabled, host_gb
        self.host_limit = int(host_gb * 2**30) if enabled and slots.can_copy else 0
        self.used = np.zeros(slots.n_slots, np.int64)  # when each row was last taken or parked
        self.parked = set()  # free rows that hold tokens
        self.host: OrderedDict[int, SavedPrefix] = OrderedDict()  # least recently used first
        self.host_bytes = 0
        self._clock = self._keys = 0

    def place(self, prompt: Sequence[int], free: list[int], reuse: bool = True) -> tuple[int, int]:
        """Choose one of the free rows for a sequence with this prompt and make it hold the longest
        prefix of the prompt found (see the module docstring); (the row, the prompt tokens it holds)."""
        limit = len(prompt) - MIN_COMPUTED
        row, n, host_key = None, 0, None
        if self.enabled and reuse and limit > 0:
            want = np.asarray(prompt[:limit], np.int64)
            for r in range(self.slots.n_slots):
                k = common_prefix(self.slots.held(r), want)
                parked = r in self.parked
                if k and (k > n or (k == n and parked and row not in self.parked)) \
                        and (parked or (r not in free and self.slots.can_copy)):
                    row, n = r, k  # (a tie goes to a parked row: it may be taken without a copy)
            for key, saved in self.host.items():
                k = common_prefix(saved.ids, want)
                if k > n:
                    row, n, host_key = None, k, key
        if row is not None and row in self.parked and (n == self.slots.lengths[row] or not self.slots.can_copy):
            self.parked.discard(row)  # the prompt goes on from all it holds: take the row itself
            self.slots.truncate(row, n)
            return self._took(row), n
        saved = None
        if host_key is not None:  # taken before _victim, whose own saving may push it out of host memory
            saved = self.host[host_key]
            self.host.move_to_end(host_key)
        target = self._victim(free, spare=row)
        if n and target == row:  # the source is the only free row (its whole content went to host memory)
            self.slots.truncate(row, n)
        elif n and saved is not None:
            self.slots.load(target, saved)
            self.slots.truncate(target, n)
        elif n:  # part of a parked row (left as it is for its own conversation) or of a running one
            self.slots.copy(row, target, n)
        else:
            self.slots.free(target)
        return self._took(target), n

    def park(self, row: int, keep: bool = True) -> None:
        """The row's sequence has left. keep: its tokens stay for later prompts (not after an error,
        or with reuse off: the row is emptied and its memory given back)."""
        if not (self.enabled and keep) or self.slots.lengths[row] == 0:
            self.slots.release(row)
            return
        # a decode step writes one position past the end of every row below its highest, parked ones too
        self.slots.truncate(row, min(int(self.slots.lengths[row]), self.slots.capacity - 1))
        self.parked.add(row)
        self._clock += 1
        self.used[row] = self._clock

    def tidy(self, span: int) -> None:
        """A fused decode step is about to span rows [0, span): a parked row there would cost the step
        attention over all its tokens (GQA reads every row it is given), so each one that host memory can
        hold moves there and its row is emptied. One that cannot stays: dropping it would cost recomputing
        it. (The portable graph runs only the rows asked for: nothing to do.)"""
        if not self.slots.spans_rows:
            return
        for row in sorted(r for r in self.parked if r < span):
            if self.slots.lengths[row] * self.slots.row_bytes_per_token <= self.host_limit:
                self.parked.discard(row)
                self._keep_on_host(row)
                self.slots.release(row)

    def forget(self, row: int) -> None:
        """Empty the row, whatever it held (after a failure)."""
        self.parked.discard(row)
        self.slots.release(row)
        self._took(row)

    def _took(self, row: int) -> int:
        self._clock += 1
        self.used[row] = self._clock
        return row

    def _victim(self, free: list[int], spare: int | None = None) -> int:
        """An empty free row (the lowest), else the parked row used least recently (spare only if it is
        the only one), its tokens kept in host memory."""
        empty = [r for r in free if r not in self.parked]
        if empty:
            return min(empty)
        row = min([r for r in free if r != spare] or free, key=lambda r: self.used[r])
        self.parked.discard(row)
        self._keep_on_host(row)
        return row

    def _keep_on_host(self, row: int) -> None:
        n = int(self.slots.lengths[row])
        if n < MIN_SAVE or n * self.slots.row_bytes_per_token > self.host_limit:
            return
        ids = self.slots.held(row)
        for key, saved in list(self.host.items()):
            if common_prefix(saved.ids, ids) == len(saved.ids):  # a shorter copy of the same start: superseded
                self._drop(key)
            elif common_prefix(saved.ids, ids) == n:  # already there, longer
                self.host.move_to_end(key)
                return
        saved = self.slots.save(row, n)
        while self.host and self.host_bytes + saved.nbytes > self.host_limit:
            self._drop(next(iter(self.host)))
        self._keys += 1
        self.host[self._keys] = saved
        self.host_bytes += saved.nbytes

    def _drop(self, key: int) -> None:
        self.host_bytes -= self.host.pop(key).nbytes

    def stats(self) -> dict:
        return {"parked_rows": len(self.parked), "host_prefixes": len(self.host), "host_bytes": self.host_bytes}
