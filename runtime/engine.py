"""The engine: one scheduler thread that owns the model and serves many sequences at once, for the
library (Generator) and the server (serve.Service) alike.

    engine = Engine.from_generator(Generator.from_dir(folder), max_batch=8)
    engine.start()
    handle = engine.submit(GenRequest(prompt=ids, max_tokens=64, params=SamplingParams()), on_event)
    # on_event(TokenEvent) for each token, then on_event(FinishEvent) exactly once
    handle.cancel()                                  # any thread; the row is freed within one step

Continuous batching. The model's KV cache has `max_batch` rows (runtime/slots.py: for the fused
graph, rows of one shared buffer per layer). The loop is nano-vllm's, schedule -> run ->
postprocess, each round:

  1. retire: sequences cancelled or past their time limit leave (their FinishEvent goes out,
     their row is freed);
  2. schedule (runtime/scheduler.py, which states the policy and its bounds): waiting sequences
     take free rows; one prompt run is chosen (shortest remaining prompt first, never starving a
     long one; first chunks of neighbouring rows read together);
  3. prefill: that run; a sequence whose prompt is done samples its first token from it;
  4. decode: every sequence past its prompt runs one token, all rows in one batched step;
  5. postprocess: each row samples with its own parameters, seeded random generator and
     repetition history, then applies its stop tokens, stop strings and length limit
     (runtime/sequence.py).

(The portable graph has no shared buffer: each row keeps its own cache and a decode step runs
the rows one after another: the same scheduling and results, none of the batched speed.)

Every row computes exactly what it would alone (the slots' numerics are tested bit for bit), so a
sequence's tokens do not depend on what else runs: greedy output equals a lone run's, and a seed
gives the same text every time. Logprobs are the log-softmax of the raw logits (float64), before
temperature, top-p and penalty. Text follows runtime/sequence.py: the TokenEvent texts plus
FinishEvent.tail always add up to FinishEvent.text.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Callable

import numpy as np

from .events import Client, EngineClosed, Event, FinishEvent, Handle, QueueFull, RequestError, TokenEvent
from .grammar import GrammarError, Grammars
from .logprobs import log_softmax, top_logprobs
from .sampler import SamplingError, sample
from .prefix_cache import HOST_GB, PrefixCache
from .scheduler import Scheduler
from .sequence import CANCELLED, ERROR, LENGTH, REASONS, STOP, TIMEOUT, GenRequest, Sequence
from .session import PROMPT_CHUNK, Model
from .slots import make_slots
from .speculate import Speculator
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # with every sequence paused, how often the loop still checks time limits

__all__ = ["Engine", "GenRequest", "TokenEvent", "FinishEvent", "QueueFull", "RequestError", "EngineClosed", "Handle",
           "STOP", "LENGTH", "CANCELLED", "TIMEOUT", "ERROR"]


# ---- the engine ------------------------------------------------------------------------------------


class Engine:
    def __init__(self, model: Model, tokenizer: Tokenizer, stop_ids: set[int], *, max_batch: int = 8,
                 max_queue: int = 64, prompt_chunk: int | None = None, prefill_tokens: int | None = None,
                 context: int | None = None, prefix_cache: bool = True, prefix_cache_gb: float = HOST_GB,
                 speculator: Speculator | None = None):
        """prompt_chunk: prompt tokens one run reads of one sequence (default: the model's, as its own
        chunked prompt passes); prefill_tokens: the most tokens (rows x longest chunk) one batched
        prompt run takes (default 2 chunks: 512 tokens on the CPU); context: the tokens a row holds at
        most, prompt included (default and cap: the model's); prefix_cache: reuse the KV cache of prompt
        prefixes rows hold, with prefix_cache_gb of host memory for those that lose their row
        (runtime/prefix_cache.py); speculator: speculative decoding for a sequence decoding alone
        (runtime/speculate.py)."""
        if max_batch < 1 or max_queue < 0 or (prompt_chunk is not None and prompt_chunk < 1):
            raise ValueError("max_batch and prompt_chunk must be >= 1, max_queue >= 0")
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, frozenset(stop_ids)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prompt_chunk = prompt_chunk or model.prompt_chunk or PROMPT_CHUNK
        self.slots = make_slots(model, max_batch, context)
        self.pool = PrefixCache(self.slots, prefix_cache, prefix_cache_gb)
        self.scheduler = Scheduler(max_batch, self.prompt_chunk, prefill_tokens, place=self._place,
                                   share=prefix_cache and self.slots.can_copy)
        self.prefill_tokens = self.scheduler.prefill_tokens
        self.context = self.slots.capacity
        self.vocab_size = model.config.model.vocab_size
        self.clients: dict[Sequence, Client] = {}
        self.speculator = speculator
        self.grammars = Grammars(tokenizer, self.stop_ids)  # llguidance, imported on the first grammar
        self.counts: Counter = Counter()  # steps, prefill_chunks, tokens, finished by reason
        # The scheduler, the slots and the pool belong to the engine thread; _cond guards what other
        # threads touch: the inbox (submitted, not yet scheduled), clients, credit and the backlog figure.
        self._cond = threading.Condition()
        self._inbox: list[Sequence] = []
        self._backlog = self.scheduler.queued  # waiting beyond the free rows at the last round (< 0: rows free)
        self._thread: threading.Thread | None = None
        self._closing = False
        self._kicked = False  # something changed since the loop last looked (no wake-up is lost)

    @classmethod
    def from_generator(cls, gen, **kw) -> "Engine":
        """The generator's model and tokenizer, and its stop ids (EOS + the chat format's)."""
        return cls(gen.model, gen.tokenizer, gen.stop_ids(), **kw)

    # ---- the caller's side (any thread) ---------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            self._start()

    def _start(self) -> None:  # with self._cond held
        if self._thread is None or (not self._thread.is_alive() and not self._closing):  # (again, if it died)
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
        self._cancel_all()  # (the loop's own did it, unless the thread had died)

    def submit(self, req: GenRequest, on_event: Callable[[Event], None], *, credit: int | None = None) -> Handle:
        """Queue req; on_event gets its events on the scheduler thread (it must not block). credit: a
        pulled sequence's tokens decoded ahead of its reader (handle.grant() adds more; its first
        token, from the prompt pass, is free); None: as fast as the engine runs.

        Raises RequestError for a request that cannot run, QueueFull when max_queue requests already wait
        beyond the free rows."""
        req.check(self.context, self.vocab_size)
        seq = Sequence.of(req, self.stop_ids, self.tokenizer, self.context)
        seq.credit = credit
        if req.grammar is not None:  # compiled here, on the caller's thread (cached per grammar)
            try:
                seq.constraint = self.grammars.compile(req.grammar).matcher()
            except GrammarError as e:
                raise RequestError(str(e)) from None
        handle = Handle(self, seq)
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine is closed")
            queued = self._backlog + len(self._inbox)
            if queued >= self.max_queue:
                raise QueueFull(f"{queued} requests are waiting for a row (max_queue {self.max_queue})")
            self.clients[seq] = Client(on_event, handle, [] if req.logprobs is not None else None)
            self._inbox.append(seq)
            self._kick()
            if self._thread is not None:
                self._start()  # a thread that died of a bug is replaced, rather than leaving requests unanswered
        return handle

    def stats(self) -> dict:
        """Gauges and counters (numbers only): running = decoding + reading their prompt; steps = decode
        steps; prefill_runs = prompt runs (one run may carry several rows' first chunks)."""
        c, sched = self.counts, self.scheduler
        with self._cond:
            inbox = len(self._inbox)
        running, queued, free = list(sched.running), len(sched.waiting) + inbox, len(sched.free)  # (a moment's view)
        return {"running": len(running), "decoding": sum(not s.reading for s in running), "queued": queued,
                "max_batch": self.max_batch, "free_slots": free, "context": self.context,
                "steps": c["steps"], "prefill_chunks": c["prefill_chunks"], "prefill_runs": c["prefill_runs"],
                "prompt_tokens": c["prompt_tokens"], "prompt_tokens_cached": c["prompt_tokens_cached"],
                "generated_tokens": c["generated_tokens"], **self.pool.stats(),
                **(self.speculator.stats() if self.speculator is not None else {}),
                **{f"finished_{r}": c[f"finished_{r}"] for r in REASONS}}

    def _wake(self) -> None:
        with self._cond:
            self._kick()

    def _kick(self) -> None:  # with self._cond held
        self._kicked = True
        self._cond.notify()

    # ---- the scheduler thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self.clients:
                    self._cond.wait()
                if self._closing:
                    break
                self._kicked = False
            try:
                if not self.step():  # every sequence waits on its reader (or a row): sleep until woken
                    with self._cond:
                        if not self._kicked:
                            self._cond.wait(IDLE_WAIT_S)
            except Exception as e:  # a bug, not a model error (those fail their rows in step): fail all
                log.exception("engine step failed")
                for seq in list(self.scheduler.running):
                    self._finish(seq, ERROR, error=_one_line(e))
        self._cancel_all()

    def step(self) -> bool:
        """One round: retire, schedule, one prompt run, one decode step (see the module docstring).
        False when there was nothing to run."""
        with self._cond:
            inbox, self._inbox = self._inbox, []
            for seq in inbox:
                if seq in self.clients:  # (not cancelled before it was scheduled: _retire finished those)
                    self.scheduler.add(seq)
        self._retire()
        plan = self.scheduler.schedule()  # admission may copy cached prefixes: outside the lock
        with self._cond:
            self._backlog = self.scheduler.queued
        if plan.prefill:
            self._prefill(plan.prefill, plan.chunks)
        decoding = [s for s in plan.decode if s.finish_reason is None and not s.reading]
        if decoding:
            self._decode(decoding)
        return bool(plan.prefill or decoding)

    def _place(self, seq: Sequence, free: list[int]) -> int:
        """The scheduler's admission: the row the KV pool gives seq, past its cached prefix."""
        try:
            row, seq.cached = self.pool.place(seq.req.prompt, free, seq.req.cache_prompt and not seq.req.prompt_logprobs)
        except Exception:  # a bug or no memory for a copy: the request goes on without reuse, in an emptied row
            log.exception("prefix cache placement failed; reading the whole prompt")
            row, seq.cached = free[0], 0
            self.pool.forget(row)
        seq.read = seq.cached
        return row

    def _retire(self) -> None:
        now = time.perf_counter()
        with self._cond:
            gone = [s for s, c in self.clients.items() if c.handle.cancelled or s.late(now)]
        for seq in gone:
            self._finish(seq, CANCELLED if self.clients[seq].handle.cancelled else TIMEOUT)

    def _prefill(self, seqs: list[Sequence], chunks: list[tuple[int, ...]]) -> None:
        """One prompt run: the next chunk of one sequence, or the first chunks of several in adjacent rows."""
        want_all = seqs[0].prompt_logprobs is not None  # runs alone (the scheduler's rule)
        try:
            if len(seqs) > 1:
                logits = self.slots.prefill_rows(seqs[0].slot, chunks)  # (n, V)
            else:
                logits = self.slots.prefill(seqs[0].slot, chunks[0], all_logits=want_all)  # (S or 1, V)
        except Exception as e:  # ORT failure: these requests only
            for seq in seqs:
                self._finish(seq, ERROR, error=_one_line(e))
            return
        if want_all:
            self._score_prompt(seqs[0], len(chunks[0]), logits)
            logits = logits[-1:]
        self.counts["prefill_chunks"] += len(seqs)
        self.counts["prefill_runs"] += 1
        done = []
        for i, (seq, chunk) in enumerate(zip(seqs, chunks)):
            seq.read += len(chunk)
            if not seq.reading:
                self.counts["prompt_tokens"] += len(seq.req.prompt)
                self.counts["prompt_tokens_cached"] += seq.cached
                seq.ttft_s = time.perf_counter() - seq.submitted
                done.append(i)
        if done:
            self._postprocess([seqs[i] for i in done], logits[done])

    def _score_prompt(self, seq: Sequence, n: int, logits: np.ndarray) -> None:
        """Prompt logprobs of this chunk: logits[j] predicts prompt[read + j + 1]."""
        prompt = seq.req.prompt
        nxt = np.asarray(prompt[seq.read + 1:seq.read + n + 1], np.int64)  # (S or S-1,)
        logp = log_softmax(logits[:len(nxt)])  # (S or S-1, V)
        seq.prompt_logprobs += np.take_along_axis(logp, nxt[:, None], axis=-1)[:, 0].tolist()
        if seq.prompt_top is not None:
            seq.prompt_top += [top_logprobs(row, seq.req.logprobs) for row in logp]

    def _decode(self, seqs: list[Sequence]) -> None:
        """One token for every seq (their last sampled tokens), in one batched step; or, for a sequence
        decoding alone, a speculative round where one pays (runtime/speculate.py)."""
        if self.pool.parked:
            self.pool.tidy(max(s.slot for s in seqs) + 1)
        alone = seqs[0] if len(seqs) == 1 and self.speculator is not None else None
        if alone is not None and self._speculate(alone):
            return
        start = time.perf_counter()
        try:
            logits = self.slots.decode([s.slot for s in seqs], [s.tokens[-1] for s in seqs])  # (n, V)
        except Exception as e:
            for seq in seqs:
                self._finish(seq, ERROR, error=_one_line(e))
            return
        if alone is not None:
            self.speculator.plain(alone, time.perf_counter() - start)
        self._stepped(seqs, 1)
        self._postprocess(seqs, logits)

    def _speculate(self, seq: Sequence) -> bool:
        """A speculative round for seq; False when none pays this step (a plain step runs instead)."""
        try:
            got = self.speculator.round(seq, self.slots)
        except Exception as e:
            self._finish(seq, ERROR, error=_one_line(e))
            return True
        if got is None:
            return False
        tokens, logits = got
        self._stepped([seq], len(tokens))
        for tok, row in zip(tokens, logits):
            if not self._take(seq, tok, row):
                break
        return True

    def _stepped(self, seqs: list[Sequence], tokens: int) -> None:
        self.counts["steps"] += 1
        with self._cond:
            for seq in seqs:
                if seq.credit is not None:
                    seq.credit -= tokens

    def _postprocess(self, seqs: list[Sequence], logits: np.ndarray) -> None:
        """Sample one token per seq from its logits row, emit it, retire the finished."""
        for seq, row in zip(seqs, logits):
            if seq.budget == 0:  # the prompt was only scored
                self._finish(seq, LENGTH)
                continue
            try:
                tok = int(sample(seq.adjusted(row)[None, :], seq.req.params, seq.rng, prev_tokens=seq.history)[0])
            except (SamplingError, GrammarError) as e:  # this row only (every token forbidden, a grammar's error)
                self._finish(seq, ERROR, error=seq.constraint_error() or _one_line(e))
                continue
            self._take(seq, tok, row)

    def _take(self, seq: Sequence, tok: int, row: np.ndarray) -> bool:
        """seq takes tok, sampled from row (its raw logits: they give the logprobs); emit it. False once
        seq has finished."""
        text, done = seq.append(tok)
        if tok in seq.stop_ids:
            self._finish(seq)
            return False
        if seq.constraint is not None:
            try:
                if seq.constraint.advance(tok) and not done:  # the grammar is complete: nothing may follow
                    done, seq.finish_reason = True, STOP
            except GrammarError as e:
                self._finish(seq, ERROR, error=str(e))
                return False
        self.counts["generated_tokens"] += 1
        lp = top = None
        if seq.req.logprobs is not None:
            logp = log_softmax(row)  # (V,)
            lp, top = float(logp[tok]), top_logprobs(logp, seq.req.logprobs)
            self.clients[seq].logprobs.append(lp)
        if self._emit(seq, self.clients[seq], TokenEvent(tok, text, lp, top)) and done:
            self._finish(seq)
        return seq in self.clients

    def _emit(self, seq: Sequence, client: Client, event: Event) -> bool:
        """Call the request's callback; a callback that raises cancels its request."""
        try:
            client.on_event(event)
            return True
        except Exception:
            log.exception("on_event raised; cancelling the request")
            if not isinstance(event, FinishEvent):
                client.handle.cancelled = True
                self._finish(seq, CANCELLED)
            return False

    def _finish(self, seq: Sequence, reason: str | None = None, error: str | None = None) -> None:
        """Send the FinishEvent and free the row (reason None: the one seq.append found). On the engine
        thread (or in close() once it has ended)."""
        row = self.scheduler.release(seq)
        if row is not None:  # its tokens stay for later prompts (prefix_cache.py)
            self.pool.park(row, keep=reason != ERROR)
        with self._cond:
            client = self.clients.pop(seq, None)
        if client is None:  # finished already
            return
        tail = seq.finish(reason)
        self.counts[f"finished_{seq.finish_reason}"] += 1
        self._emit(seq, client, FinishEvent(seq.finish_reason, seq.text, len(seq.req.prompt), len(seq.tokens),
                                            seq.prompt_logprobs, error=error, ttft_s=seq.ttft_s, tail=tail,
                                            cached_tokens=seq.cached,
                                            prompt_top_logprobs=seq.prompt_top, tokens=tuple(seq.tokens),
                                            logprobs=None if client.logprobs is None else tuple(client.logprobs),
                                            stop_token=seq.stop_token))

    def _cancel_all(self) -> None:
        with self._cond:
            left = list(self.clients)
        for seq in left:
            self._finish(seq, CANCELLED)


def _one_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]
