"""runtime/sampler.py against a reference written here from the definitions (HF's CTRL
repetition penalty, temperature, top-k, Meta's sample_top_p), and chi-square tests of the draws."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llama2_onnx.errors import UserError
from llama2_onnx.runtime import sampler
from llama2_onnx.runtime.sampler import SamplingError, SamplingParams, apply_repetition_penalty, probs, sample

# ---- the reference, one row at a time, written from the definitions ----------------------


def reference(row, temperature=1.0, top_p=1.0, top_k=0, penalty=1.0, seen=()) -> np.ndarray:
    x = [float(v) for v in row]
    for t in set(seen):
        x[t] = x[t] / penalty if x[t] > 0 else x[t] * penalty
    vocab = len(x)
    if temperature == 0:
        out = np.zeros(vocab)
        out[max(range(vocab), key=lambda i: x[i])] = 1.0
        return out
    x = [v / temperature for v in x]
    if top_k:
        kth = sorted(x, reverse=True)[min(top_k, vocab) - 1]
        x = [v if v >= kth else -math.inf for v in x]
    m = max(x)
    p = [math.exp(v - m) for v in x]
    total = sum(p)
    p = [v / total for v in p]
    if top_p < 1:
        order = sorted(range(vocab), key=lambda i: -p[i])
        mass_before = 0.0
        for i in order:  # Meta: mask where cumsum - prob > p
            keep = mass_before <= top_p
            mass_before += p[i]
            if not keep:
                p[i] = 0.0
        total = sum(p)
        p = [v / total for v in p]
    return np.array(p)


def chi2_critical(dof: int, z: float = 3.090232) -> float:
    """Wilson-Hilferty: the chi-square quantile at 1 - 0.001 (z is the normal 0.999 quantile)."""
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2_statistic(counts: np.ndarray, expected_p: np.ndarray, n: int) -> tuple[float, int]:
    """Pearson's statistic, bins with expected count < 5 pooled into one."""
    expected = expected_p * n
    big = expected >= 5
    obs, exp = list(counts[big]), list(expected[big])
    if (~big).any() and expected[~big].sum() > 0:
        obs.append(counts[~big].sum())
        exp.append(expected[~big].sum())
    obs, exp = np.array(obs, float), np.array(exp, float)
    return float(((obs - exp) ** 2 / exp).sum()), len(exp) - 1


def test_chi2_critical_matches_tables():
    for dof, table in [(2, 13.816), (5, 20.515), (10, 29.588), (20, 45.315)]:
        assert chi2_critical(dof) == pytest.approx(table, rel=0.03)  # Wilson-Hilferty errs high (lenient) at small dof


LOGITS = np.random.default_rng(7).normal(0, 2, size=12).astype(np.float32)  # (V,) no ties

SETTINGS = [  # temperature, top_p, top_k
    (1.0, 1.0, 0),
    (0.7, 1.0, 0),
    (1.3, 0.8, 0),
    (1.0, 1.0, 5),
    (0.9, 0.6, 4),
    (2.0, 0.95, 8),
    (0.5, 0.3, 0),
]


@pytest.mark.parametrize("temperature, top_p, top_k", SETTINGS)
def test_draws_follow_the_distribution(temperature, top_p, top_k):
    n = 20_000
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    expected = reference(LOGITS, temperature, top_p, top_k)
    batch = np.tile(LOGITS, (n, 1))  # (n, V): n independent draws in one call
    np.testing.assert_allclose(probs(batch[:1], params)[0], expected, rtol=1e-9, atol=1e-12)
    tokens = sample(batch, params, np.random.default_rng(1234))
    counts = np.bincount(tokens, minlength=LOGITS.size)
    assert counts[expected == 0].sum() == 0  # never outside the filtered support
    stat, dof = chi2_statistic(counts, expected, n)
    if dof > 0:
        assert stat < chi2_critical(dof), (stat, dof)


def test_top_p_never_leaves_the_nucleus():
    logits = np.random.default_rng(3).normal(0, 0.5, size=50).astype(np.float32)
    nucleus = reference(logits, 1.0, 0.5) > 0
    assert 1 < nucleus.sum() < 50
    tokens = sample(np.tile(logits, (20_000, 1)), SamplingParams(1.0, top_p=0.5), np.random.default_rng(0))
    assert nucleus[tokens].all()
    assert set(tokens.tolist()) == set(np.flatnonzero(nucleus).tolist())


@pytest.mark.parametrize("scale", [8.0, 0.05])  # peaky: the nucleus is found in the best 1024; flat: full sort
@pytest.mark.parametrize("top_k", [0, 3000])
def test_large_vocab_matches_reference(scale, top_k):
    logits = (np.random.default_rng(11).normal(size=(2, 4096)) * scale).astype(np.float32)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=top_k)
    got = probs(logits, params)
    for b in range(2):
        np.testing.assert_allclose(got[b], reference(logits[b], 0.8, 0.9, top_k), rtol=1e-9, atol=1e-12)
    assert sampler.NUCLEUS_GUESS < 4096


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = np.random.default_rng(5).normal(size=(6, 40)).astype(np.float32)
    want = logits.argmax(axis=1)
    for params in [SamplingParams(1.0, top_k=1), SamplingParams(1.0, top_p=1e-9)]:
        np.testing.assert_array_equal(sample(logits, params, np.random.default_rng(0)), want)


def test_same_seed_same_tokens():
    logits = np.random.default_rng(0).normal(size=(4, 300)).astype(np.float32)
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=50)
    runs = [np.concatenate([sample(logits, params, rng) for _ in range(20)])
            for rng in (np.random.default_rng(42), np.random.default_rng(42), np.random.default_rng(43))]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_greedy_is_argmax():
    logits = np.random.default_rng(1).normal(size=(5, 1000)).astype(np.float32)
    tokens = sample(logits, SamplingParams(), np.random.default_rng(0))
    assert tokens.dtype == np.int64 and tokens.shape == (5,)
    np.testing.assert_array_equal(tokens, logits.argmax(axis=1))
    np.testing.assert_array_equal(probs(logits, SamplingParams()), np.eye(1000)[logits.argmax(axis=1)])


@pytest.mark.parametrize(
    "logits, seen, penalty, want",
    [
        ([2.0, -2.0, 0.5, 0.0], [0, 1], 2.0, [1.0, -4.0, 0.5, 0.0]),
        ([2.0, -2.0, 0.5, 0.0], [0, 0, 0, 1, 1], 2.0, [1.0, -4.0, 0.5, 0.0]),  # each id once
        ([2.0, -2.0, 0.5, 0.0], [3, 2], 1.3, [2.0, -2.0, 0.5 / 1.3, 0.0]),  # 0 stays 0
        ([2.0, -2.0, 0.5, 0.0], [0, 1], 0.5, [4.0, -1.0, 0.5, 0.0]),  # < 1 rewards repeats
        ([2.0, -2.0, 0.5, 0.0], [], 2.0, [2.0, -2.0, 0.5, 0.0]),
        ([2.0, -2.0, 0.5, 0.0], [0, 1, 2, 3], 1.0, [2.0, -2.0, 0.5, 0.0]),
    ],
)
def test_repetition_penalty(logits, seen, penalty, want):
    got = apply_repetition_penalty(np.array([logits], np.float32), [seen], penalty)
    np.testing.assert_allclose(got[0], want)
    params = SamplingParams(temperature=1.0, repetition_penalty=penalty)
    np.testing.assert_allclose(probs(np.array([logits], np.float32), params, [seen])[0],
                               reference(logits, penalty=penalty, seen=seen), rtol=1e-9)


def test_repetition_penalty_applies_to_greedy():
    logits = np.array([[3.0, 2.0, 1.0]], np.float32)
    assert sample(logits, SamplingParams(repetition_penalty=2.0), None, prev_tokens=[[0]]).tolist() == [1]
    assert sample(logits, SamplingParams(repetition_penalty=2.0), None, prev_tokens=[[2]]).tolist() == [0]


def test_rows_are_independent():
    rng = np.random.default_rng(9)
    logits = rng.normal(0, 2, size=(3, 30)).astype(np.float32)
    seen = [[0, 1, 2], [], [int(logits[2].argmax())]]
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=10, repetition_penalty=1.5)
    got = probs(logits, params, seen)
    for b in range(3):
        np.testing.assert_allclose(got[b], reference(logits[b], 0.8, 0.9, 10, 1.5, seen[b]), rtol=1e-9, atol=1e-12)
    # one-hot-like rows: each row gets its own token
    peaked = np.full((4, 10), -50.0, np.float32)
    peaked[np.arange(4), [7, 2, 9, 0]] = 50.0
    assert sample(peaked, SamplingParams(1.0, top_p=0.5), np.random.default_rng(0)).tolist() == [7, 2, 9, 0]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature="1"), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.2), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    ],
)
def test_invalid_params(kwargs, name):
    with pytest.raises(SamplingError, match=name) as info:
        SamplingParams(**kwargs)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)


def test_valid_edges():
    SamplingParams(temperature=0, top_p=1, top_k=0, repetition_penalty=1)
    SamplingParams(temperature=1e-6, top_p=1e-6, top_k=np.int64(3), repetition_penalty=1e-3)


@pytest.mark.parametrize(
    "logits, prev, match",
    [
        (np.zeros(5, np.float32), None, "batch, vocab"),
        (np.array([[0.0, np.nan]], np.float32), None, "NaN"),
        (np.full((1, 3), -np.inf, np.float32), None, "finite"),
        (np.zeros((2, 3), np.float32), [[0]], "rows"),
        (np.zeros((1, 3), np.float32), [[5]], "outside"),
    ],
)
def test_bad_inputs(logits, prev, match):
    with pytest.raises(SamplingError, match=match):
        sample(logits, SamplingParams(1.0, repetition_penalty=1.2), np.random.default_rng(0), prev_tokens=prev)


@pytest.mark.parametrize("temperature", [1e-6, 0.5, 1.0, 100.0])
@pytest.mark.parametrize("top_p, top_k", [(1.0, 0), (0.9, 0), (1.0, 2), (0.5, 3)])
def test_huge_logits_are_stable(temperature, top_p, top_k):
    logits = np.array([[1e4, -1e30, 0.0, 1e4 - 1, -np.inf, 3e38],
                       [-1e30, -1e30, -1e30, -1e30, -1e30, -1e30 + 1e24]], np.float32)
    params = SamplingParams(temperature, top_p, top_k)
    p = probs(logits, params)
    assert np.isfinite(p).all() and np.allclose(p.sum(axis=1), 1.0)
    tokens, logp = sample(logits, params, np.random.default_rng(0), return_logprobs=True)
    assert np.isfinite(logp).all() and (logp <= 0).all()
    assert p[np.arange(2), tokens].min() > 0
    assert tokens[0] in (0, 3, 5)


@pytest.mark.parametrize("temperature, top_p, top_k", SETTINGS + [(0.0, 1.0, 0)])
def test_logprobs_are_of_the_final_distribution(temperature, top_p, top_k):
    logits = np.random.default_rng(2).normal(0, 2, size=(64, 12)).astype(np.float32)
    params = SamplingParams(temperature, top_p, top_k)
    tokens, logp = sample(logits, params, np.random.default_rng(0), return_logprobs=True)
    assert logp.dtype == np.float32 and logp.shape == (64,)
    want = np.log(probs(logits, params)[np.arange(64), tokens])
    np.testing.assert_allclose(logp, want, rtol=1e-5, atol=1e-6)


def test_fast_enough_for_a_decode_loop():
    import time

    logits = np.random.default_rng(0).normal(0, 3, size=(1, 49152)).astype(np.float32)
    rng = np.random.default_rng(0)
    for params in [SamplingParams(0.7), SamplingParams(0.7, top_k=50), SamplingParams(0.7, top_p=0.9, top_k=50),
                   SamplingParams(0.7, top_p=0.9)]:
        start = time.perf_counter()
        for _ in range(20):
            sample(logits, params, rng, prev_tokens=[list(range(200))])
        assert (time.perf_counter() - start) / 20 < 0.02, params  # generous: about 1 ms here
