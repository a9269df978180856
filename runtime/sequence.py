"""One request's state as the engine runs it (nano-vllm's Sequence): what it asked for, what it has
read and generated, its stop rules and the text it has released.

    seq = Sequence(req, stop_ids, tokenizer)
    text, done = seq.append(token)       # the text the token releases; done: a stop ended it
    tail = seq.finish("length")          # the text still held back, released at the finish

Finish reasons, OpenAI's words: "stop" (a stop token or a stop string), "length" (its token limit
or the context), and "cancelled", "timeout", "error" where a request ends otherwise.

Text rules (the same for the library and the server): a stop token ends the sequence and is not
part of the output; text that may be the start of a stop string is held back until it is not; what
is released at the finish (held-back text, an unfinished UTF-8 character) is finish()'s tail, so
the texts append() returns plus the tail always add up to `text`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence as Seq

import numpy as np

from llama2_onnx.errors import UserError

from .events import RequestError
from .grammar import Constraint, Grammar
from .sampler import SamplingParams, make_rng
from .tokenizer import StreamDecoder, Tokenizer

STOP, LENGTH, CANCELLED, TIMEOUT, ERROR = "stop", "length", "cancelled", "timeout", "error"
REASONS = (STOP, LENGTH, CANCELLED, TIMEOUT, ERROR)


def stop_strings(stop: str | Seq[str] | None) -> list[str]:
    """The stop strings as a list: one string is one stop string (not its characters); each non-empty."""
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    for s in stops:
        if not isinstance(s, str) or not s:
            raise UserError(f"stop strings must be non-empty strings, got {s!r}")
    return stops


def split_at_stop(pending: str, stop: Seq[str]) -> tuple[str, str, bool]:
    """Decoded text not yet released -> (text to release now, text held back, whether a stop string
    was hit): cut before the first stop string, else hold back a tail that may yet become one."""
    hits = [h for h in (pending.find(s) for s in stop) if h >= 0]
    if hits:
        return pending[:min(hits)], "", True
    keep = max((k for s in stop for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
    cut = len(pending) - keep
    return pending[:cut], pending[cut:], False


@dataclass(frozen=True)
class GenRequest:
    """What one sequence asks for: the APIs check what their users give (runtime/request.py), and the
    engine's submit checks the request once more (check)."""

    prompt: tuple[int, ...]  # token ids, BOS / chat format already applied
    max_tokens: int  # >= 1 (0: the prompt is only scored, with prompt_logprobs); also capped at the context
    params: SamplingParams
    seed: int | None = None  # per-request numpy default_rng(seed)
    stop: tuple[str, ...] = ()  # stop strings
    logprobs: int | None = None  # None: none; k >= 0: each token's logprob + the top k alternatives
    prompt_logprobs: bool = False  # logprob of each prompt token given the ones before (the first: None),
    # with the top `logprobs` alternatives of each when logprobs > 0
    timeout_s: float | None = None  # time limit from submit (queueing included) -> finish "timeout"
    cache_prompt: bool = True  # start after the longest prefix of the prompt the KV pool holds (prefix_cache.py)
    grammar: Grammar | None = None  # constrained decoding: the output keeps to it (runtime/grammar.py)
    # OpenAI's: added to a token's logit; minus presence_penalty once a token was generated, minus
    # frequency_penalty times the number of times it was
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_ids: tuple[int, ...] | None = None  # the tokens that end it (None: the engine's: EOS and the chat format's)

    def check(self, context: int, vocab_size: int) -> None:
        """The engine's last guard (submit): RequestError naming what cannot run."""
        n = len(self.prompt)
        if n == 0:
            raise RequestError("the prompt is empty")
        if n >= context and not (n == context and self.max_tokens == 0):
            raise RequestError(f"the prompt is {n} tokens; the context is {context}")
        for what, ids in (("prompt", self.prompt), ("stop", self.stop_ids or ()),
                          ("logit_bias", [t for t, _ in self.logit_bias])):
            if any(not 0 <= t < vocab_size for t in ids):
                raise RequestError(f"a {what} token id is outside [0, {vocab_size})")
        if self.max_tokens < (0 if self.prompt_logprobs else 1):
            raise RequestError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise RequestError(f"logprobs must be >= 0, got {self.logprobs}")
        try:
            stop_strings(self.stop)
            make_rng(self.seed)
        except UserError as e:  # (SamplingError is one)
            raise RequestError(str(e)) from None


@dataclass(eq=False)
class Sequence:
    req: GenRequest
    stop_ids: frozenset[int]
    decoder: StreamDecoder
    budget: int  # tokens it may generate: max_tokens capped at the context
    rng: np.random.Generator = field(init=False)
    submitted: float = field(default_factory=time.perf_counter)
    slot: int = -1  # its row of the KV cache while running
    read: int = 0  # prompt tokens through the model so far (a reused prefix included)
    cached: int = 0  # prompt tokens reused from the KV pool rather than computed
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # released so far
    pending: str = ""  # decoded, held back: it may start a stop string
    finish_reason: str | None = None
    prompt_logprobs: list | None = None
    prompt_top: list | None = None  # per prompt token, its top alternatives (prompt logprobs with logprobs > 0)
    ttft_s: float = 0.0
    skipped: int = 0  # prompt runs that went to other readers since this one's last (the scheduler's aging)
    seen: set[int] | None = None  # ids in prompt + output, kept as they come (the repetition penalty's)
    credit: int | None = None  # decode steps the reader has asked for (None: no limit; a pulled stream's)
    stop_token: int | None = None  # the stop token that ended it, if one did
    cut: bool = False  # a stop string was hit: what follows it is dropped, not released at the finish
    constraint: Constraint | None = None  # the grammar's state (req.grammar), made at submit
    counts: dict[int, int] | None = None  # generated ids and how often (OpenAI's presence/frequency penalties)
    spec: object | None = None  # speculative decoding's record of this sequence (runtime/speculate.py SpecState)

    def __post_init__(self) -> None:
        self.rng = make_rng(self.req.seed)  # the same seed, the same draws, wherever it runs
        if self.req.prompt_logprobs:
            self.prompt_logprobs = [None]
            self.prompt_top = [None] if self.req.logprobs else None
        if self.req.params.repetition_penalty != 1.0:
            self.seen = set(self.req.prompt)
        if self.req.presence_penalty or self.req.frequency_penalty:
            self.counts = {}

    @classmethod
    def of(cls, req: GenRequest, stop_ids: set[int] | frozenset[int], tokenizer: Tokenizer, context: int) -> "Sequence":
        ids = stop_ids if req.stop_ids is None else req.stop_ids
        return cls(req, frozenset(ids), StreamDecoder(tokenizer), min(req.max_tokens, context - len(req.prompt)))

    @property
    def reading(self) -> bool:
        """Still reading its prompt."""
        return self.read < len(self.req.prompt)

    @property
    def remaining_prompt(self) -> int:
        return len(self.req.prompt) - self.read

    @property
    def history(self) -> list[set[int]] | None:
        """The sampler's prev_tokens for this row (None without a repetition penalty)."""
        return None if self.seen is None else [self.seen]

    def adjusted(self, logits: np.ndarray) -> np.ndarray:
        """One row of logits (V,) as this request samples from it: its logit_bias and OpenAI penalties
        applied, then its grammar's mask (a copy when anything changes; the raw row gives logprobs)."""
        req = self.req
        if req.logit_bias or self.counts:
            logits = np.array(logits, np.float32)
            for token, bias in req.logit_bias:
                logits[token] += bias
            if self.counts:
                ids = np.fromiter(self.counts, np.int64, len(self.counts))
                n = np.fromiter(self.counts.values(), np.float32, len(self.counts))
                logits[ids] -= req.presence_penalty + req.frequency_penalty * n
        return logits if self.constraint is None else self.constraint.masked(logits)

    def constraint_error(self) -> str | None:
        return None if self.constraint is None else self.constraint.error()

    def late(self, now: float) -> bool:
        return self.req.timeout_s is not None and now - self.submitted > self.req.timeout_s

    def append(self, token: int) -> tuple[str, bool]:
        """Take one sampled token: (the text it releases, whether the sequence is done). A stop token
        or stop string finishes it ("stop"; finish() then returns the tail), reaching its budget
        finishes it with "length"."""
        if token in self.stop_ids:
            self.finish_reason, self.stop_token = STOP, token
            return "", True
        self.tokens.append(token)
        if self.seen is not None:
            self.seen.add(token)
        if self.counts is not None:
            self.counts[token] = self.counts.get(token, 0) + 1
        text, self.pending, hit = split_at_stop(self.pending + self.decoder.push(token), self.req.stop)
        self.text += text
        if hit:
            self.finish_reason, self.cut = STOP, True
        elif len(self.tokens) >= self.budget:
            self.finish_reason = LENGTH
        return text, self.finish_reason is not None

    def finish(self, reason: str | None = None) -> str:
        """End the sequence (reason, or the one append() found); return the text released now."""
        self.finish_reason = reason or self.finish_reason
        if self.finish_reason not in REASONS:
            raise ValueError(f"finish reason {self.finish_reason!r} is not one of {REASONS}")
        tail = "" if self.cut else self.pending + self.decoder.flush()
        self.pending, self.cut = "", True  # a second finish releases nothing
        self.text += tail
        return tail
