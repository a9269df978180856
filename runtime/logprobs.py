"""Log-probabilities of chosen tokens: the log-softmax of the raw logits (before temperature,
top-k, top-p or the repetition penalty), as Meta's generation.py and the OpenAI API report them.

    token_logprobs(logits, ids)              # logits (N, V), ids (N,) -> float64 (N,)
    prompt_logprobs(logits, prompt)          # one row's prompt-pass logits (S, V) -> S values, the first 0.0
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def token_logprobs(logits: np.ndarray, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """log p(ids[n]) under logits[n]: logits (N, V), ids (N,) -> float64 (N,)."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0:
        return np.zeros(0)
    return np.take_along_axis(log_softmax(logits), ids[:, None], axis=-1)[:, 0]


def prompt_logprobs(logits: np.ndarray, prompt: Sequence[int]) -> list[float]:
    """Each prompt token's logprob given the tokens before it; logits (S, V) from the prompt pass.

    Token s is scored by the logits after token s - 1. The first token has nothing before it and
    gets 0.0, as in Meta's generate(): its token_logprobs start as zeros and position 0 is never
    written (with echo=True, BOS comes out with logprob 0.0).
    """
    return [0.0] + token_logprobs(logits[: len(prompt) - 1], prompt[1:]).tolist()


def top_logprobs(logp: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k best (token id, logprob) of one row of log-probabilities (V,), best first (ties: lower id)."""
    k = min(k, len(logp))
    best = np.argpartition(-logp, k - 1)[:k] if k else np.zeros(0, np.int64)
    return sorted(((int(i), float(logp[i])) for i in best), key=lambda p: (-p[1], p[0]))
