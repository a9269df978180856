"""What the engine sends a request's caller (runtime/engine.py): a TokenEvent per token, then one
FinishEvent; the errors submit() raises; the Handle it returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


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
    cached_tokens: int = 0  # prompt tokens reused from the KV pool (runtime/prefix_cache.py), not computed
    tail: str = ""  # text released at the finish, in no TokenEvent: send it before the finish
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None  # per prompt token (the first: None)
    tokens: tuple[int, ...] = ()  # the generated ids (the stop token not included)
    logprobs: tuple[float, ...] | None = None  # with logprobs asked for: one per token in `tokens`
    stop_token: int | None = None  # the stop token that ended it (reason "stop" by a token, not a stop string)


Event = TokenEvent | FinishEvent


class QueueFull(Exception):
    """More than max_queue requests are waiting."""


class RequestError(ValueError):
    """The request cannot run: empty prompt, a token id outside the vocabulary, prompt past the context."""


class EngineClosed(RuntimeError):
    """submit() after close()."""


class Handle:
    """What Engine.submit returns: the caller's hold on its request."""

    def __init__(self, engine, seq):
        self._engine, self._seq = engine, seq
        self.cancelled = False

    def cancel(self) -> None:
        """Thread-safe; the scheduler frees the row before its next step and sends FinishEvent("cancelled")."""
        self.cancelled = True
        self._engine._wake()

    def grant(self, n: int = 1) -> None:
        """A pulled sequence (submitted with credit): its reader asks for n more tokens. Thread-safe."""
        with self._engine._cond:
            if self._seq.credit is not None:
                self._seq.credit += n
            self._engine._kick()


@dataclass
class Client:
    """The engine's record of a request's caller."""

    on_event: Callable[[Event], None]
    handle: Handle
    logprobs: list[float] | None  # per generated token, when asked for
