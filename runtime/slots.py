"""Slots: a fixed number of independent sequences sharing one model, for continuous batching.

A slot is one row of the KV cache. A sequence takes a free slot, runs its prompt through
`prefill` (in chunks of any size), then one token per `decode` step together with the other
busy slots; when it ends the slot is freed and a new sequence can take it between two steps.
Each slot keeps its own length, so the rows of a decode step may be at different positions.

    slots = make_slots(model, n_slots=8)        # FusedSlots for graph "ort", else PortableSlots
    logits = slots.prefill(3, prompt_ids)        # (1, V): the chunk's last position
    logits = slots.prefill(3, ids, all_logits=True)  # (S, V): every position (prompt logprobs)
    logits = slots.prefill_rows(4, [ids4, ids5])    # (2, V): first chunks of empty slots 4 and 5, one run
    logits = slots.decode([0, 3], [t0, t3])      # (2, V): one token each for slots 0 and 3
    slots.free(3)

FusedSlots (the fused graph, GroupQueryAttention with one buffer per layer bound as both past
and present): each layer's cache is ONE buffer [n_slots, n_kv_heads, capacity, head_dim] and a
slot is a row of it. A row holds its tokens from position 0 (right-aligned, as the graph wants),
and the attention mask tells GroupQueryAttention each row's length, so it reads only that row's
tokens and writes the new keys and values at that row's end, in place.
  - prefill(slot, ids) binds a batch-1 view of row `slot` (pointer + offset into every buffer:
    no copy) with a mask of length+S ones. A first chunk has mask width == S, which GQA reads as
    "cache empty"; a later chunk (past > 0, S > 1) continues at the row's length.
  - prefill_rows(first, chunks) runs the first chunks of several empty slots [first, first + n)
    in one batched run: the chunks right-padded to the longest, the mask giving each row its
    length (GQA's first prompt with padding, as Model's first step); the graph keeps each row's
    last real position. Four 128-token prompts this way take 0.8-0.95x the time of four runs.
  - decode(slots, tokens) runs rows [0, k), k = highest slot + 1 (the engine takes the lowest
    free slot, so k stays small). A row not decoding (free, or midway through its prompt) gets a
    pad token and length+1: the step writes one junk position just past its end, which nothing
    reads and its next write overwrites, and its length does not advance.
  The IOBindings (one per slot for prefill, one per k for decode) are made once; a step rebinds
  only its ids and mask.

PortableSlots (the portable graph, whose past and present are separate growing tensors): one
batch-1 KVCache per slot, stepped by Model.step (I/O binding and all), and a decode step runs the
busy slots one after another. Correct and simple; no batched compute (the fused graph is the one
to serve with).

Numerics: every row of a step computes exactly what it would compute alone (tests/test_engine.py
checks prefill chunking and decode batching against Model.step bit for bit on the CPU).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnxruntime as ort

from . import contract
from .session import Model, logits_to_keep


RESIDENT = 1024  # positions of a released row kept in memory (a typical request's; the rest goes back)


class Slots:
    """What both kinds share: per-slot lengths and the checks of the caller's requests."""

    def __init__(self, model: Model, n_slots: int, capacity: int | None = None):
        a = model.config.model
        if n_slots < 1:
            raise ValueError(f"n_slots must be at least 1, got {n_slots}")
        self.model, self.n_slots = model, n_slots
        self.capacity = min(capacity or a.max_seq_len, a.max_seq_len)  # tokens a slot holds at most
        self.pad_id = a.fill_id
        self.lengths = np.zeros(n_slots, np.int64)  # tokens in each slot's cache
        self.ids = np.zeros((n_slots, self.capacity), np.int64)  # the tokens each slot holds: ids[s, :lengths[s]]
        self.row_bytes_per_token = 2 * a.n_layers * a.n_kv_heads * a.head_dim * np.dtype(model.config.kv_dtype).itemsize
        self.can_copy = True  # copy() and save()/load() between rows and host memory (not on a GPU's fused rows)
        self.spans_rows = False  # a decode step reads every row below the highest one it runs (fused)

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0

    def release(self, slot: int) -> None:
        """Free the slot and give back the memory its tokens took where the kind of slots can."""
        self.free(slot)

    def truncate(self, slot: int, n: int) -> None:
        """Keep the slot's first n tokens (its cache continues after them)."""
        if not 0 <= n <= self.lengths[slot]:
            raise ValueError(f"slot {slot} holds {self.lengths[slot]} tokens, cannot keep {n}")
        self.lengths[slot] = n

    def held(self, slot: int) -> np.ndarray:
        """The token ids slot's cache holds, in order (a view)."""
        return self.ids[slot, :self.lengths[slot]]

    def _record(self, slot: int, ids: np.ndarray) -> None:
        at = int(self.lengths[slot])
        self.ids[slot, at:at + len(ids)] = ids

    def copy(self, src: int, dst: int, n: int) -> None:
        """Make dst hold src's first n tokens (their keys and values copied, src unchanged)."""
        self.load(dst, self.save(src, n))

    def save(self, slot: int, n: int) -> "SavedPrefix":
        """A host-memory copy of the slot's first n tokens' keys and values."""
        raise NotImplementedError

    def load(self, slot: int, saved: "SavedPrefix") -> None:
        """Make slot hold a saved prefix."""
        raise NotImplementedError

    def _check_prefill(self, slot: int, ids: Sequence[int]) -> np.ndarray:
        ids = np.asarray(ids, np.int64).reshape(1, -1)  # (1, S)
        if ids.shape[1] == 0:
            raise ValueError("prefill needs at least one token")
        if self.lengths[slot] + ids.shape[1] > self.capacity:
            raise ValueError(f"slot {slot}: {self.lengths[slot]} + {ids.shape[1]} tokens exceed its capacity of {self.capacity}")
        return ids

    def _check_rows(self, first: int, chunks: Sequence[Sequence[int]]) -> list[np.ndarray]:
        rows = range(first, first + len(chunks))
        if not chunks or first < 0 or rows.stop > self.n_slots or self.lengths[first:rows.stop].any():
            raise ValueError(f"prefill_rows needs empty slots, got [{first}, {rows.stop}) holding "
                             f"{self.lengths[first:rows.stop].tolist()} tokens")
        return [self._check_prefill(r, c)[0] for r, c in zip(rows, chunks)]

    def prefill_rows(self, first: int, chunks: Sequence[Sequence[int]]) -> np.ndarray:
        """The first chunks of empty slots first, first + 1, ...: each one's last logits (n, V)."""
        self._check_rows(first, chunks)
        return np.concatenate([self.prefill(first + i, c) for i, c in enumerate(chunks)])

    def _check_decode(self, slots: Sequence[int], tokens: Sequence[int]) -> None:
        if len(slots) != len(tokens) or not slots or len(set(slots)) != len(slots):
            raise ValueError("decode needs distinct slots and one token for each")
        lengths = self.lengths[list(slots)]
        if (lengths < 1).any() or (lengths >= self.capacity).any():
            raise ValueError(f"decode: slots {list(slots)} hold {lengths.tolist()} tokens; need 1 to {self.capacity - 1}")


class FusedSlots(Slots):
    """Rows of the fused graph's shared KV buffers as slots (see the module docstring)."""

    def __init__(self, model: Model, n_slots: int, capacity: int | None = None):
        super().__init__(model, n_slots, capacity)
        a = model.config.model
        self.dtype = np.dtype(model.config.kv_dtype)
        self.row_shape = (a.n_kv_heads, self.capacity, a.head_dim)
        self.device, self.device_id = model.provider.device, model.device_id
        self.on_cpu = self.device == "cpu"
        self.can_copy = self.on_cpu
        self.spans_rows = True
        shape = (n_slots, *self.row_shape)
        # On the CPU NumPy arrays over anonymous mmaps (tests can look inside); else device memory.
        self.buffers = [_zeros_4k(shape, self.dtype) if self.on_cpu else
                        ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device, self.device_id)
                        for _ in contract.past_names(a.n_layers)]
        self._row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        self._names = list(zip(contract.past_names(a.n_layers), contract.present_names(a.n_layers)))
        self.step_logits = np.empty((n_slots, 1, a.vocab_size), np.float32)  # where decode steps write
        # logits_to_keep as OrtValues (IOBinding's bind_input does not know inputs with a default): all, last
        self._keep = {flag: ort.OrtValue.ortvalue_from_numpy(logits_to_keep(flag)) for flag in (True, False)}
        self._prefill_bindings = [self._bind_rows(s, 1) for s in range(n_slots)]
        self._rows_bindings: dict[tuple[int, int], object] = {}  # (first, n) -> IOBinding, made when first used
        self._decode_bindings = [None] + [self._bind_rows(0, k) for k in range(1, n_slots + 1)]
        for k in range(1, n_slots + 1):
            self._decode_bindings[k].bind_output(contract.LOGITS, "cpu", 0, np.float32, [k, 1, a.vocab_size],
                                                 self.step_logits.ctypes.data)

    def save(self, slot: int, n: int) -> "SavedPrefix":
        if not self.on_cpu:
            raise NotImplementedError("rows on a GPU are not copied")
        return SavedPrefix(self.ids[slot, :n].copy(), [np.array(b[slot, :, :n]) for b in self.buffers])

    def load(self, slot: int, saved: "SavedPrefix") -> None:
        if not self.on_cpu:
            raise NotImplementedError("rows on a GPU are not copied")
        n = len(saved.ids)
        for buf, kv in zip(self.buffers, saved.kv):
            buf[slot, :, :n] = kv
        self.ids[slot, :n] = saved.ids
        self.lengths[slot] = n

    def release(self, slot: int) -> None:
        """Free the slot and give back the memory of its positions past RESIDENT (zero pages again when
        next touched): a long conversation's memory returns, a typical request's stays mapped."""
        self.free(slot)
        if self.on_cpu:
            for buf in self.buffers:
                _discard(buf, slot, RESIDENT)

    def _ptr(self, buf) -> int:
        return buf.ctypes.data if self.on_cpu else buf.data_ptr()

    def _bind_rows(self, first: int, count: int):
        """An IOBinding whose past and present are rows [first, first + count) of every buffer."""
        binding = self.model.session.io_binding()
        binding.bind_output(contract.LOGITS, "cpu")  # first: get_outputs()[0] in prefill
        shape = [count, *self.row_shape]
        for (past, present), buf in zip(self._names, self.buffers):
            ptr = self._ptr(buf) + first * self._row_bytes
            binding.bind_input(past, self.device, self.device_id, self.dtype, shape, ptr)
            binding.bind_output(present, self.device, self.device_id, self.dtype, shape, ptr)  # same memory: in place
        return binding

    def _bind_feeds(self, binding, ids: np.ndarray, mask: np.ndarray) -> None:
        for name, value in ((contract.INPUT_IDS, ids), (contract.ATTENTION_MASK, mask)):
            if self.on_cpu:
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, self.device, self.device_id))

    def prefill(self, slot: int, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Run ids after slot's cached tokens; return the last one's logits (1, V), or with all_logits
        every one's (S, V)."""
        ids = self._check_prefill(slot, ids)  # (1, S)
        total = int(self.lengths[slot]) + ids.shape[1]
        mask = np.ones((1, total), np.int64)  # width == S on the first chunk: GQA's "empty cache"
        binding = self._prefill_bindings[slot]
        self._record(slot, ids[0])
        self._bind_feeds(binding, ids, mask)
        if self.model.keeps_logits:  # the head on the last position only, unless all are asked for
            binding.bind_ortvalue_input(contract.LOGITS_TO_KEEP, self._keep[all_logits])
        binding.bind_output(contract.LOGITS, "cpu")
        self.model.session.run_with_iobinding(binding)
        self.lengths[slot] = total
        logits = binding.get_outputs()[0].numpy()[0]  # (S or 1, V)
        return logits if all_logits else logits[-1:]

    def prefill_rows(self, first: int, chunks: Sequence[Sequence[int]]) -> np.ndarray:
        """The first chunks of empty slots [first, first + n) in one run: each one's last logits (n, V)."""
        chunks = self._check_rows(first, chunks)
        n, lengths = len(chunks), np.array([len(c) for c in chunks], np.int64)
        s = int(lengths.max())
        ids = np.full((n, s), self.pad_id, np.int64)  # right-padded: each row's tokens first
        for row, chunk in zip(ids, chunks):
            row[:len(chunk)] = chunk
        mask = (np.arange(s)[None, :] < lengths[:, None]).astype(np.int64)  # width == S: GQA's first prompt
        binding = self._rows_bindings.get((first, n))
        if binding is None:
            binding = self._rows_bindings[(first, n)] = self._bind_rows(first, n)
        for r, chunk in enumerate(chunks):
            self._record(first + r, chunk)
        self._bind_feeds(binding, ids, mask)
        if self.model.keeps_logits:
            binding.bind_ortvalue_input(contract.LOGITS_TO_KEEP, self._keep[False])
        binding.bind_output(contract.LOGITS, "cpu")
        self.model.session.run_with_iobinding(binding)
        self.lengths[first:first + n] = lengths
        logits = binding.get_outputs()[0].numpy()  # (n, 1, V): each row's last real position; or (n, S, V)
        return logits[:, -1] if logits.shape[1] == 1 else logits[np.arange(n), lengths - 1]

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """One token for each of slots; return their next-token logits (len(slots), V), valid until
        the next decode (it may be a view of the buffer the step writes)."""
        self._check_decode(slots, tokens)
        k = max(slots) + 1
        ids = np.full((k, 1), self.pad_id, np.int64)  # (k, 1)
        ids[list(slots), 0] = tokens
        lengths = self.lengths[:k] + 1  # (k,) after the step; rows not decoding write one junk position
        if (lengths > self.capacity).any():
            raise ValueError(f"decode: a row in [0, {k}) is full ({self.lengths[:k].tolist()})")
        mask = (np.arange(int(lengths.max()))[None, :] < lengths[:, None]).astype(np.int64)  # (k, longest)
        binding = self._decode_bindings[k]
        self._bind_feeds(binding, ids, mask)
        self.model.session.run_with_iobinding(binding)
        rows = list(slots)
        self.ids[rows, self.lengths[rows]] = tokens
        self.lengths[rows] += 1
        if rows == list(range(k)):
            return self.step_logits[:k, 0]  # (k, V), a view: valid until the next decode
        return self.step_logits[rows, 0]  # (n, V)


class PortableSlots(Slots):
    """The portable graph: one batch-1 KVCache per slot, run by Model.step; decode runs the slots
    one by one."""

    def __init__(self, model: Model, n_slots: int, capacity: int | None = None):
        super().__init__(model, n_slots, capacity)
        self.caches = [self._new_cache() for _ in range(n_slots)]

    def _new_cache(self):
        return self.model.new_cache(np.ones((1, 0), np.int64))

    def free(self, slot: int) -> None:
        super().free(slot)
        self.caches[slot] = self._new_cache()

    release = free

    def truncate(self, slot: int, n: int) -> None:
        if n != self.lengths[slot]:
            self.load(slot, self.save(slot, n))

    def save(self, slot: int, n: int) -> "SavedPrefix":
        past = self.caches[slot].past
        host = [p.numpy() if isinstance(p, ort.OrtValue) else p for p in past]
        return SavedPrefix(self.ids[slot, :n].copy(), [np.array(p[0, :, :n]) for p in host])

    def load(self, slot: int, saved: "SavedPrefix") -> None:
        n = len(saved.ids)
        cache = self._new_cache()
        past = [kv[None] for kv in saved.kv]
        cache.past = [self.model._to_device(p) for p in past] if self.model.io_binding else past
        cache.attention_mask = np.ones((1, n), np.int64)
        cache.next_pos = np.array([n], np.int64)
        cache.length = n
        self.caches[slot] = cache
        self.ids[slot, :n] = saved.ids
        self.lengths[slot] = n

    def _run(self, slot: int, ids: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """(S, V) with all_logits, else (1, V): the last position's logits."""
        self._record(slot, ids[0])
        logits = self.model.step(ids, np.ones_like(ids), self.caches[slot], all_logits=all_logits)
        self.lengths[slot] += ids.shape[1]
        return logits[0] if all_logits else logits

    def prefill(self, slot: int, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        return self._run(slot, self._check_prefill(slot, ids), all_logits)

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        self._check_decode(slots, tokens)
        return np.concatenate([self._run(s, np.array([[t]], np.int64)) for s, t in zip(slots, tokens)])


@dataclass
class SavedPrefix:
    """A prefix's token ids and each layer's keys and values for them [n_kv_heads, n, head_dim], in host memory."""

    ids: np.ndarray
    kv: list[np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.kv) + self.ids.nbytes


def _discard(buf: np.ndarray, slot: int, keep: int) -> None:
    """madvise(MADV_REMOVE) the whole pages of a row of a _zeros_4k buffer [slots, heads, capacity, dim]
    past its first `keep` positions in every head: that memory goes back to the system and reads as
    zeros when next touched (where the platform has it; elsewhere nothing happens)."""
    mm = buf.base
    while mm is not None and not isinstance(mm, mmap.mmap):
        mm = mm.obj if isinstance(mm, memoryview) else getattr(mm, "base", None)
    advice = getattr(mmap, "MADV_REMOVE", None)  # shared anonymous memory: MADV_REMOVE frees it (Linux)
    if mm is None or advice is None:
        return
    page = mmap.PAGESIZE
    for head in buf[slot]:
        tail = head[keep:]
        start = tail.ctypes.data - buf.ctypes.data
        lo, hi = -(-start // page) * page, (start + tail.nbytes) // page * page
        if hi > lo:
            mm.madvise(advice, lo, hi - lo)


def _zeros_4k(shape: tuple, dtype: np.dtype) -> np.ndarray:
    """Zeros in 4 KB pages that become memory only when written. Not np.zeros: NumPy asks for
    transparent huge pages on large arrays, and one head of one row spans 2 MB at a context of
    8192, so the first token written to a row would make the whole row resident (377 MB for
    SmolLM2) and pay for zeroing it."""
    return np.frombuffer(mmap.mmap(-1, int(np.prod(shape)) * dtype.itemsize), dtype).reshape(shape)


def make_slots(model: Model, n_slots: int, capacity: int | None = None) -> Slots:
    cls = FusedSlots if model.fused else PortableSlots
    return cls(model, n_slots, capacity)
