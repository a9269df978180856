"""Next-token sampling in pure NumPy: repetition penalty, temperature, top-k, top-p.

    params = SamplingParams(temperature=0.7, top_p=0.9)
    tokens = sample(logits, params, np.random.default_rng(0))          # logits (B, V) -> (B,)

The order of operations follows Hugging Face's logits processors and Meta's reference:
repetition penalty (CTRL-style) on the raw logits, then temperature, then top-k, then
top-p with Meta's ``sample_top_p`` rule, then renormalise and draw. Randomness comes in
as a ``numpy.random.Generator`` (one uniform per row, inverse CDF), so a seed reproduces
a run exactly. ``probs`` returns the exact distribution ``sample`` draws from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Sequence

import numpy as np

from llama2_onnx.errors import UserError

TokenHistory = Sequence[Sequence[int]]  # per row: the token ids already seen


class SamplingError(UserError, ValueError):
    """A sampling parameter is out of range, or the inputs to sample() do not fit together."""


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise SamplingError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy (argmax); top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0  # >= 0
    top_p: float = 1.0  # (0, 1]
    top_k: int = 0  # >= 0, 0 = off
    repetition_penalty: float = 1.0  # > 0, 1 = off

    def __post_init__(self) -> None:
        if _real("temperature", self.temperature) < 0:
            raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < _real("top_p", self.top_p) <= 1:
            raise SamplingError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, Integral) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if _real("repetition_penalty", self.repetition_penalty) <= 0:
            raise SamplingError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


MAX_SEED = 2**63 - 1  # seeds are int64 everywhere they travel (JSON, the OpenAI API)


def make_rng(seed: int | None) -> np.random.Generator:
    """The random generator for a seed: None draws fresh entropy; else an integer in [0, 2**63 - 1]."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed <= MAX_SEED):
        raise SamplingError(f"seed must be an integer from 0 to {MAX_SEED} (or none for a random run), got {seed!r}")
    return np.random.default_rng(None if seed is None else int(seed))


# ---- the distribution -------------------------------------------------------------------


def _check_logits(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise SamplingError(f"logits must be (batch, vocab), got shape {logits.shape}")
    return logits


def apply_repetition_penalty(logits: np.ndarray, prev_tokens: TokenHistory | None, penalty: float) -> np.ndarray:
    """CTRL's penalty as in Hugging Face: a seen token's logit is divided by the penalty when
    positive, multiplied when negative; each seen id counts once. Returns a float64 copy (B, V)."""
    x = np.array(logits, dtype=np.float64)  # (B, V), a copy
    if prev_tokens is None or penalty == 1.0:
        return x
    batch, vocab = x.shape
    if len(prev_tokens) != batch:
        raise SamplingError(f"prev_tokens has {len(prev_tokens)} rows but logits have {batch}")
    for row, seen in enumerate(prev_tokens):
        # a set (a sequence's running record of seen ids) or any sequence of ids
        seen = np.fromiter(seen, np.int64, len(seen)) if isinstance(seen, (set, frozenset)) else np.asarray(seen, np.int64)
        ids = np.unique(seen)  # (n,) each id once
        if ids.size == 0:
            continue
        if ids[0] < 0 or ids[-1] >= vocab:
            raise SamplingError(f"prev_tokens row {row} holds ids outside [0, {vocab})")
        v = x[row, ids]
        x[row, ids] = np.where(v > 0, v / penalty, v * penalty)
    return x


def _gather(x: np.ndarray, ids: np.ndarray | None, cols: np.ndarray):
    """Keep columns cols (B, K') of x (B, K), whose vocabulary ids are ids (None: K = V, in order)."""
    return (cols if ids is None else np.take_along_axis(ids, cols, axis=-1)), np.take_along_axis(x, cols, axis=-1)


def _top_k(x: np.ndarray, ids: np.ndarray | None, k: int):
    return _gather(x, ids, np.argpartition(-x, k - 1, axis=-1)[:, :k])  # (B, k), unordered


NUCLEUS_GUESS = 1024  # top-p looks at this many best tokens first, before sorting everything


def _top_p(x: np.ndarray, ids: np.ndarray | None, top_p: float):
    """Meta's sample_top_p on the candidates: sort descending and drop a token when the mass
    before it already exceeds top_p (the top token, with nothing before it, always stays)."""
    e = np.exp(x)  # (B, K), x's max is 0
    total = e.sum(axis=-1, keepdims=True)  # (B, 1)
    m = NUCLEUS_GUESS
    if m < x.shape[1]:
        # Fast path: when the m best tokens already hold more than top_p, every token after
        # them has more than top_p before it, so sorting those m suffices. The margin keeps
        # the decision the same as a full sort's cumulative sum would make it.
        cols = np.argpartition(-x, m - 1, axis=-1)[:, :m]  # (B, m)
        if (np.take_along_axis(e, cols, axis=-1).sum(axis=-1) > (top_p + 1e-9) * total[:, 0]).all():
            ids, x = _gather(x, ids, cols)
    ids, x = _gather(x, ids, np.argsort(-x, axis=-1))  # (B, K') sorted descending
    p = np.exp(x) / total
    before = np.cumsum(p, axis=-1) - p  # (B, K')
    return ids, np.where(before > top_p, -np.inf, x)


def _candidates(logits: np.ndarray, params: SamplingParams, prev_tokens: TokenHistory | None):
    """The candidates after every filter, before normalising.

    Returns (ids, x): ids (B, K) int64 vocabulary ids or None when the candidates are the whole
    vocabulary in order (K = V); x (B, K) float64 scaled logits, max 0 (always kept), -inf where
    a filter removed a token.
    """
    x = apply_repetition_penalty(logits, prev_tokens, params.repetition_penalty)  # (B, V), a copy
    if np.isnan(x).any():
        raise SamplingError("logits contain NaN: the model produced invalid output")
    top = x.max(axis=-1, keepdims=True)  # (B, 1)
    if not np.isfinite(top).all():
        raise SamplingError("a row of logits has no finite maximum (all -inf, or +inf present)")
    # Subtract the max before dividing by the temperature: no overflow for huge logits or tiny T.
    x -= top
    x /= params.temperature  # (B, V), max 0

    ids = None
    if 0 < params.top_k < x.shape[1]:
        ids, x = _top_k(x, ids, params.top_k)
    if params.top_p < 1.0:
        ids, x = _top_p(x, ids, params.top_p)
    return ids, x


def _filtered(logits: np.ndarray, params: SamplingParams, prev_tokens: TokenHistory | None):
    """The candidates and their log-probabilities after every filter: (ids, logp (B, K) float64)."""
    ids, x = _candidates(logits, params, prev_tokens)
    # log-softmax over what is left (x's max is 0 and always kept, so the sum is >= 1)
    return ids, x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def probs(logits: np.ndarray, params: SamplingParams, prev_tokens: TokenHistory | None = None) -> np.ndarray:
    """The exact distribution sample() draws from, float64 (B, V); one-hot when greedy."""
    logits = _check_logits(logits)
    batch, vocab = logits.shape
    if params.greedy:
        out = np.zeros((batch, vocab))
        out[np.arange(batch), _greedy(logits, params, prev_tokens)] = 1.0
        return out
    ids, logp = _filtered(logits, params, prev_tokens)
    if ids is None:
        return np.exp(logp)
    out = np.zeros((batch, vocab))
    np.put_along_axis(out, ids, np.exp(logp), axis=-1)
    return out


# ---- drawing ----------------------------------------------------------------------------


def _greedy(logits: np.ndarray, params: SamplingParams, prev_tokens: TokenHistory | None) -> np.ndarray:
    # The penalty applies to greedy decoding too, as in Hugging Face.
    if prev_tokens is not None and params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, prev_tokens, params.repetition_penalty)
    best = np.argmax(logits, axis=-1).astype(np.int64)  # (B,)
    if not np.isfinite(logits[np.arange(len(best)), best]).all():  # (NaN is found by argmax too)
        raise SamplingError("a row of logits has no finite maximum (all -inf, NaN, or +inf present)")
    return best


BLOCK = 1024  # a long row's inverse CDF sums blocks of this many columns first


def _draw(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Inverse CDF with one uniform per row of weights (B, K) (>= 0, unnormalised, each row some
    > 0): the column index chosen in each row, (B,)."""
    u = rng.random(weights.shape[0])  # (B,)
    if weights.shape[1] > 4 * BLOCK:
        return np.array([_inverse_cdf(row, v) for row, v in zip(weights, u)], np.int64)
    cdf = np.cumsum(weights, axis=-1)  # (B, K)
    col = (cdf <= u[:, None] * cdf[:, -1:]).sum(axis=-1)  # first column whose cdf exceeds the threshold
    # u * total can round up to total itself: then take the last column that has mass.
    last = weights.shape[1] - 1 - np.argmax(weights[:, ::-1] > 0, axis=-1)
    return np.where(col > last, last, col)


def _inverse_cdf(weights: np.ndarray, u: float) -> int:
    """One row's first column whose cumulative weight exceeds u * total: a cumulative sum of the
    block sums, then of the one block it falls in (a full cumsum of 49152 float64 is 0.18 ms,
    a third of a sample)."""
    starts = np.arange(0, weights.size, BLOCK)
    cdf = np.cumsum(np.add.reduceat(weights, starts))  # (blocks,)
    threshold = u * cdf[-1]
    b = min(int(np.searchsorted(cdf, threshold, side="right")), len(starts) - 1)
    inner = (cdf[b - 1] if b else 0.0) + np.cumsum(weights[starts[b]:starts[b] + BLOCK])
    col = int(starts[b] + np.searchsorted(inner, threshold, side="right"))
    if col >= weights.size or weights[col] == 0:  # rounding past the last weight: the last with any
        col = weights.size - 1 - int(np.argmax(weights[::-1] > 0))
    return col


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           prev_tokens: TokenHistory | None = None, return_logprobs: bool = False):
    """Choose one token per row of logits (B, V).

    prev_tokens: per row, the ids already seen (for the repetition penalty).
    Returns int64 (B,); with return_logprobs also float32 (B,), each chosen token's
    log-probability under the final, filtered distribution (0 when greedy: a point mass).
    """
    logits = _check_logits(logits)
    batch = logits.shape[0]
    if params.greedy:
        tokens = _greedy(logits, params, prev_tokens)
        return (tokens, np.zeros(batch, np.float32)) if return_logprobs else tokens
    ids, x = _candidates(logits, params, prev_tokens)  # (B, K), max 0
    weights = np.exp(x)  # (B, K), unnormalised: the draw scales its uniform by each row's total
    col = _draw(weights, rng)  # (B,)
    rows = np.arange(batch)
    tokens = (col if ids is None else ids[rows, col]).astype(np.int64)
    if return_logprobs:
        return tokens, (x[rows, col] - np.log(weights.sum(axis=-1))).astype(np.float32)
    return tokens
