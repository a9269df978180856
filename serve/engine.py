"""The engine: one scheduler thread that owns the model and serves many requests at once.

    engine = Engine.from_generator(Generator.from_dir(folder), max_batch=8)
    engine.start()
    handle = engine.submit(GenRequest(prompt=ids, max_tokens=64, params=SamplingParams()), on_event)
    # on_event(TokenEvent) for each token, then on_event(FinishEvent) exactly once
    handle.cancel()                                  # any thread; the row is freed within one step

Continuous batching. The model's KV cache has `max_batch` rows (runtime/slots.py: for the fused
graph, rows of one shared buffer per layer). A request waits in `waiting` until a row is free,
then runs in `running` until it finishes; its row is then free for the next one. The scheduler
loops schedule -> run -> postprocess, as nano-vllm's does:

  1. retire: requests cancelled or past their time limit leave `waiting` and `running` (their
     FinishEvent goes out, their row is freed);
  2. admit: waiting requests take the lowest free rows (the decode batch spans rows [0, k), k the
     highest busy row + 1, so low rows keep it short);
  3. prefill: the oldest request still reading its prompt runs one chunk of at most
     `prompt_chunk` tokens (GroupQueryAttention continues a row's cache chunk by chunk); when its
     prompt is done its first token is sampled. When it is on its first chunk, the requests on
     their first chunks in the rows next to it join it in one batched run (slots.prefill_rows),
     up to `prefill_tokens` tokens padded: requests that arrive together read their prompts
     together (0.94x the time of one after another, and the last one's first token comes after
     one run instead of after all of them);
  4. decode: every request past its prompt runs one token, all rows in one batched step;
  5. postprocess: each row samples with its own parameters, random generator (seeded per request)
     and repetition history, then applies its stop tokens, stop strings and length limit.

(The portable graph has no shared buffer: each row keeps its own cache and a decode step runs
the rows one after another: the same scheduling and results, none of the batched speed.)

So a running stream waits at most one prompt chunk per token while a new request reads its
prompt, and a short request never waits for a long one. Every row computes exactly what it would
alone (the slots' numerics are tested bit for bit), so a request's tokens do not depend on what
else runs: greedy output equals Generator.generate's, and a seed gives the same text every time.

Text follows Generator's rules: a stop token ends with reason "stop" and is not part of the
output; text that may be the start of a stop string is held back (TokenEvent.text "") until it
is not; the text released at the finish (held back text, an unfinished UTF-8 character) comes
in FinishEvent.tail, so the TokenEvent texts plus the tail always add up to FinishEvent.text.
Logprobs are the log-softmax of the raw logits (float64), before temperature, top-p and penalty.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from llama2_onnx.runtime.generator import Generator, split_at_stop
from llama2_onnx.runtime.logprobs import log_softmax, top_logprobs
from llama2_onnx.runtime.sampler import SamplingError, SamplingParams, make_rng, sample
from llama2_onnx.runtime.session import Model
from llama2_onnx.runtime.slots import make_slots
from llama2_onnx.runtime.tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger(__name__)

STOP, LENGTH, CANCELLED, TIMEOUT, ERROR = "stop", "length", "cancelled", "timeout", "error"


# ---- the interface -------------------------------------------------------------------------


@dataclass(frozen=True)
class GenRequest:
    prompt: tuple[int, ...]  # token ids, BOS / chat format already applied
    max_tokens: int  # >= 1; the engine also caps at the context (finish "length")
    params: SamplingParams
    seed: int | None = None  # per-request numpy default_rng(seed)
    stop: tuple[str, ...] = ()  # stop strings
    logprobs: int | None = None  # None: none; k >= 0: each token's logprob + the top k alternatives
    prompt_logprobs: bool = False  # logprob of each prompt token given the ones before (the first: None),
    # with the top `logprobs` alternatives of each when logprobs > 0
    timeout_s: float | None = None  # per-request time limit, from submit (queueing included) -> finish "timeout"


@dataclass
class TokenEvent:
    token: int
    text: str  # the text this token releases ("" while held back)
    logprob: float | None
    top_logprobs: list[tuple[int, float]] | None  # (token id, logprob), best first


@dataclass
class FinishEvent:
    reason: str  # "stop", "length", "cancelled", "timeout", "error"
    text: str  # the whole generated text (stop string excluded)
    prompt_tokens: int
    completion_tokens: int  # tokens generated, the stop token not counted
    prompt_logprobs: list[float | None] | None
    error: str | None = None  # reason "error": a one-line message
    ttft_s: float = 0.0  # submit -> first token
    tail: str = ""  # text released at the finish, in no TokenEvent: send it before the finish
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None  # per prompt token (the first: None)


Event = TokenEvent | FinishEvent


class QueueFull(Exception):
    """More than max_queue requests are waiting."""


class RequestError(ValueError):
    """The request cannot run: empty prompt, a token id outside the vocabulary, prompt past the context."""


class EngineClosed(RuntimeError):
    """submit() after close()."""


class Handle:
    def __init__(self, engine: "Engine"):
        self._engine = engine
        self.cancelled = False

    def cancel(self) -> None:
        """Thread-safe; the scheduler frees the row before its next step and sends FinishEvent("cancelled")."""
        self.cancelled = True
        self._engine._wake()


# ---- one request's state (nano-vllm's Sequence) ---------------------------------------------------


@dataclass(eq=False)
class _Seq:
    req: GenRequest
    on_event: Callable[[Event], None]
    handle: Handle
    decoder: StreamDecoder
    rng: np.random.Generator
    budget: int  # tokens it may generate: max_tokens capped at the context
    submitted: float
    slot: int = -1
    read: int = 0  # prompt tokens through the model so far
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # released so far
    pending: str = ""  # decoded, held back: it may start a stop string
    prompt_logprobs: list | None = None
    prompt_top: list | None = None  # per prompt token, its top alternatives (prompt logprobs with logprobs > 0)
    ttft_s: float = 0.0

    @property
    def prefilling(self) -> bool:
        return self.read < len(self.req.prompt)

    @property
    def decoding(self) -> bool:
        """Prompt read (its first token is sampled in the same round): in every decode step until it
        finishes, when it leaves `running`."""
        return not self.prefilling


# ---- the engine ------------------------------------------------------------------------------------


class Engine:
    def __init__(self, model: Model, tokenizer: Tokenizer, stop_ids: set[int], *, max_batch: int = 8,
                 max_queue: int = 64, prompt_chunk: int = 128, prefill_tokens: int | None = None,
                 context: int | None = None):
        """prefill_tokens: the most tokens (rows x longest chunk) one batched prompt run takes
        (default 4 chunks); context: the tokens a row holds at most, prompt included (default
        and cap: the model's)."""
        if max_batch < 1 or max_queue < 0 or prompt_chunk < 1:
            raise ValueError("max_batch and prompt_chunk must be >= 1, max_queue >= 0")
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, set(stop_ids)
        self.max_batch, self.max_queue, self.prompt_chunk = max_batch, max_queue, prompt_chunk
        self.prefill_tokens = max(prefill_tokens or 4 * prompt_chunk, prompt_chunk)
        self.slots = make_slots(model, max_batch, context)
        self.context = self.slots.capacity
        self.vocab_size = model.config.model.vocab_size
        self.waiting: deque[_Seq] = deque()  # guarded by _cond (submit runs on other threads)
        self.running: deque[_Seq] = deque()  # the scheduler thread's own
        self.free = list(range(max_batch))  # free rows, lowest first
        self.counts: Counter = Counter()  # steps, prefill_chunks, tokens, finished by reason
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False

    @classmethod
    def from_generator(cls, gen: Generator, **kw) -> "Engine":
        """The generator's model and tokenizer, and its stop ids (EOS + the chat format's)."""
        return cls(gen.model, gen.tokenizer, gen.stop_ids(), **kw)

    # ---- the caller's side (any thread) ---------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="llama2-onnx-engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the scheduler; every request not finished gets FinishEvent("cancelled")."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is threading.current_thread():  # close() from a callback: the loop ends after this step
            return
        if self._thread is not None:
            self._thread.join()
        else:
            self._cancel_all()

    def submit(self, req: GenRequest, on_event: Callable[[Event], None]) -> Handle:
        """Queue req; on_event gets its events on the scheduler thread (it must not block).

        Raises RequestError for a request that cannot run, QueueFull when max_queue requests already wait
        beyond the free rows."""
        self._check(req)
        try:
            rng = make_rng(req.seed)  # as Generator's: the same seed, the same draws
        except SamplingError as e:
            raise RequestError(str(e)) from None
        handle = Handle(self)
        seq = _Seq(req=req, on_event=on_event, handle=handle, decoder=StreamDecoder(self.tokenizer), rng=rng,
                   budget=min(req.max_tokens, self.context - len(req.prompt)), submitted=time.perf_counter(),
                   prompt_logprobs=[None] if req.prompt_logprobs else None,
                   prompt_top=[None] if req.prompt_logprobs and req.logprobs else None)
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine is closed")
            # rows free now take the next waiting requests at the next step: only those beyond them queue
            queued = len(self.waiting) - len(self.free)
            if queued >= self.max_queue:
                raise QueueFull(f"{queued} requests are waiting for a row (max_queue {self.max_queue})")
            self.waiting.append(seq)
            self._cond.notify()
        return handle

    def stats(self) -> dict:
        """Gauges and counters (numbers only): running = decoding + reading their prompt; steps = decode
        steps; prefill_runs = prompt runs (one run may carry several rows' first chunks)."""
        c, running = self.counts, list(self.running)
        return {"running": len(running), "decoding": sum(s.decoding for s in running), "queued": len(self.waiting),
                "max_batch": self.max_batch, "free_slots": len(self.free), "context": self.context,
                "steps": c["steps"], "prefill_chunks": c["prefill_chunks"], "prefill_runs": c["prefill_runs"],
                "prompt_tokens": c["prompt_tokens"],
                "generated_tokens": c["generated_tokens"],
                **{f"finished_{r}": c[f"finished_{r}"] for r in (STOP, LENGTH, CANCELLED, TIMEOUT, ERROR)}}

    def _check(self, req: GenRequest) -> None:
        n = len(req.prompt)
        if n == 0:
            raise RequestError("the prompt is empty")
        if n >= self.context:
            raise RequestError(f"the prompt is {n} tokens; the context is {self.context}")
        if min(req.prompt) < 0 or max(req.prompt) >= self.vocab_size:
            raise RequestError(f"a prompt token id is outside [0, {self.vocab_size})")
        if req.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {req.max_tokens}")
        if any(not isinstance(s, str) or not s for s in req.stop):
            raise RequestError(f"stop strings must be non-empty strings, got {req.stop!r}")
        if req.logprobs is not None and req.logprobs < 0:
            raise RequestError(f"logprobs must be >= 0, got {req.logprobs}")

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # ---- the scheduler thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self.waiting and not self.running:
                    self._cond.wait()
                if self._closing:
                    break
            try:
                self.step()
            except Exception as e:  # a bug, not a model error (those fail their rows in step): fail all
                log.exception("engine step failed")
                for seq in list(self.running):
                    self._finish(seq, ERROR, error=_one_line(e))
        self._cancel_all()

    def step(self) -> None:
        """One round: retire, admit, one prompt chunk, one decode step (see the module docstring)."""
        self._retire()
        self._admit()
        reading = next((s for s in self.running if s.prefilling), None)
        if reading is not None:
            group = self._readers_with(reading)
            if len(group) > 1:
                self._prefill_rows(group)
            else:
                self._prefill(reading)
        decoding = [s for s in self.running if s.decoding]
        if decoding:
            self._decode(decoding)

    def _retire(self) -> None:
        now = time.perf_counter()
        with self._cond:
            gone = [s for s in self.waiting if s.handle.cancelled or _late(s, now)]
            for seq in gone:
                self.waiting.remove(seq)
        for seq in gone + [s for s in self.running if s.handle.cancelled or _late(s, now)]:
            self._finish(seq, CANCELLED if seq.handle.cancelled else TIMEOUT)

    def _admit(self) -> None:
        with self._cond:
            while self.waiting and self.free:
                seq = self.waiting.popleft()
                seq.slot = self.free.pop(0)  # the lowest: self.free stays sorted
                self.running.append(seq)

    def _readers_with(self, seq: _Seq) -> list[_Seq]:
        """seq and the requests on their first chunks in the rows next to it, lowest row first, as
        many as prefill_tokens allows (just seq when it is past its first chunk or wants prompt
        logprobs: those run alone)."""
        def fresh(s: _Seq) -> bool:
            return s.read == 0 and s.prompt_logprobs is None
        if not fresh(seq):
            return [seq]
        by_row = {s.slot: s for s in self.running if fresh(s)}
        group, lo, hi = [seq], seq.slot, seq.slot
        while True:
            nxt = by_row.get(hi + 1) or by_row.get(lo - 1)
            if nxt is None:
                return sorted(group, key=lambda s: s.slot)
            longest = max(min(len(s.req.prompt), self.prompt_chunk) for s in group + [nxt])
            if longest * (len(group) + 1) > self.prefill_tokens:
                return sorted(group, key=lambda s: s.slot)
            group.append(nxt)
            lo, hi = min(lo, nxt.slot), max(hi, nxt.slot)

    def _prefill(self, seq: _Seq) -> None:
        """One chunk of seq's prompt; after the last, sample its first token."""
        prompt = seq.req.prompt
        chunk = prompt[seq.read:seq.read + self.prompt_chunk]
        try:
            logits = self.slots.prefill(seq.slot, chunk, all_logits=seq.prompt_logprobs is not None)  # (S or 1, V)
        except Exception as e:  # ORT failure: this request only
            self._finish(seq, ERROR, error=_one_line(e))
            return
        if seq.prompt_logprobs is not None:  # logits[j] predicts prompt[read + j + 1]
            nxt = np.asarray(prompt[seq.read + 1:seq.read + len(chunk) + 1], np.int64)  # (S or S-1,)
            logp = log_softmax(logits[:len(nxt)])  # (S or S-1, V)
            seq.prompt_logprobs += np.take_along_axis(logp, nxt[:, None], axis=-1)[:, 0].tolist()
            if seq.prompt_top is not None:
                seq.prompt_top += [top_logprobs(row, seq.req.logprobs) for row in logp]
        self._after_chunks([seq], [len(chunk)], logits[-1:])

    def _prefill_rows(self, seqs: list[_Seq]) -> None:
        """The first chunks of seqs (in rows next to each other, lowest first) in one batched run."""
        chunks = [s.req.prompt[:self.prompt_chunk] for s in seqs]
        try:
            logits = self.slots.prefill_rows(seqs[0].slot, chunks)  # (n, V)
        except Exception as e:
            for seq in seqs:
                self._finish(seq, ERROR, error=_one_line(e))
            return
        self._after_chunks(seqs, [len(c) for c in chunks], logits)

    def _after_chunks(self, seqs: list[_Seq], read: list[int], last_logits: np.ndarray) -> None:
        """seqs read read[i] more prompt tokens; those whose prompts are done sample their first token
        from their row of last_logits."""
        self.counts["prefill_chunks"] += len(seqs)
        self.counts["prefill_runs"] += 1
        done = []
        for i, (seq, n) in enumerate(zip(seqs, read)):
            seq.read += n
            if not seq.prefilling:
                self.counts["prompt_tokens"] += len(seq.req.prompt)
                seq.ttft_s = time.perf_counter() - seq.submitted
                done.append(i)
        if done:
            self._postprocess([seqs[i] for i in done], last_logits[done])

    def _decode(self, seqs: list[_Seq]) -> None:
        """One token for every seq (their last sampled tokens), in one batched step."""
        try:
            logits = self.slots.decode([s.slot for s in seqs], [s.tokens[-1] for s in seqs])  # (n, V)
        except Exception as e:
            for seq in seqs:
                self._finish(seq, ERROR, error=_one_line(e))
            return
        self.counts["steps"] += 1
        self._postprocess(seqs, logits)

    def _postprocess(self, seqs: list[_Seq], logits: np.ndarray) -> None:
        """Sample one token per seq from its logits row, emit it, retire the finished."""
        for seq, row in zip(seqs, logits):
            req = seq.req
            history = [list(req.prompt) + seq.tokens] if req.params.repetition_penalty != 1.0 else None
            tok = int(sample(row[None, :], req.params, seq.rng, prev_tokens=history)[0])
            if tok in self.stop_ids:
                self._finish(seq, STOP, tail=seq.pending + seq.decoder.flush())
                continue
            seq.tokens.append(tok)
            self.counts["generated_tokens"] += 1
            text, hit = self._release(seq, seq.pending + seq.decoder.push(tok))
            lp = top = None
            if req.logprobs is not None:
                logp = log_softmax(row)  # (V,)
                lp, top = float(logp[tok]), top_logprobs(logp, req.logprobs)
            if not self._emit(seq, TokenEvent(tok, text, lp, top)):
                continue
            if hit:
                self._finish(seq, STOP)
            elif len(seq.tokens) >= seq.budget:
                self._finish(seq, LENGTH, tail=seq.pending + seq.decoder.flush())

    def _release(self, seq: _Seq, pending: str) -> tuple[str, bool]:
        """Generator's stop-string rule: (text to release now, whether a stop string was hit)."""
        text, seq.pending, hit = split_at_stop(pending, seq.req.stop)
        seq.text += text
        return text, hit

    def _emit(self, seq: _Seq, event: Event) -> bool:
        """Call the request's callback; a callback that raises cancels its request."""
        try:
            seq.on_event(event)
            return True
        except Exception:
            log.exception("on_event raised; cancelling the request")
            if not isinstance(event, FinishEvent):
                seq.handle.cancelled = True
                self._finish(seq, CANCELLED)
            return False

    def _finish(self, seq: _Seq, reason: str, tail: str = "", error: str | None = None) -> None:
        """Send the FinishEvent and free the row (seq leaves `running`; a waiting seq has no row)."""
        if seq in self.running:
            self.running.remove(seq)
            self.slots.free(seq.slot)
            self.free.append(seq.slot)
            self.free.sort()
        seq.text += tail
        self.counts[f"finished_{reason}"] += 1
        self._emit(seq, FinishEvent(reason, seq.text, len(seq.req.prompt), len(seq.tokens), seq.prompt_logprobs,
                                    error=error, ttft_s=seq.ttft_s, tail=tail, prompt_top_logprobs=seq.prompt_top))

    def _cancel_all(self) -> None:
        with self._cond:
            left = list(self.running) + list(self.waiting)
            self.waiting.clear()
        for seq in left:
            self._finish(seq, CANCELLED)


def _late(seq: _Seq, now: float) -> bool:
    return seq.req.timeout_s is not None and now - seq.submitted > seq.req.timeout_s


def _one_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]
