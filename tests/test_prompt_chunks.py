"""Model.step reads a long unpadded prompt in chunks of prompt_chunk tokens (runtime/session.py):
the same logits bit for bit as one pass, on both graph kinds, and padded batches still in one pass."""

from __future__ import annotations

import numpy as np
import pytest

from llama2_onnx.runtime.session import PROMPT_CHUNK, Model


@pytest.fixture(params=["ort", "portable"])
def folder(request, tiny_onnx, tiny_onnx_ort):
    return tiny_onnx_ort if request.param == "ort" else tiny_onnx


def _run(model: Model, ids: np.ndarray, mask: np.ndarray, all_logits: bool, steps: int = 5):
    """The prompt's logits, then greedy decode steps' logits."""
    cache = model.new_cache(mask, capacity=ids.shape[1] + steps + 1)
    first = model.step(ids, mask, cache, all_logits=all_logits).copy()
    last = first[:, -1] if all_logits else first
    out = [first]
    for _ in range(steps):
        tok = last.argmax(-1)[:, None].astype(np.int64)
        last = model.step(tok, np.ones_like(tok), cache).copy()
        out.append(last)
    return out


def _counting_steps(monkeypatch) -> list[int]:
    """The S of every Model.step call, recursive ones included."""
    calls, original = [], Model.step

    def counting(self, input_ids, *a, **kw):
        calls.append(input_ids.shape[1])
        return original(self, input_ids, *a, **kw)

    monkeypatch.setattr(Model, "step", counting)
    return calls


@pytest.mark.parametrize("all_logits", [False, True])
def test_chunked_prompt_equals_one_pass(folder, all_logits, monkeypatch):
    whole = Model.from_dir(folder, provider="cpu", startup_cache=False)
    whole.prompt_chunk = 0
    chunked = Model.from_dir(folder, provider="cpu", startup_cache=False)
    chunked.prompt_chunk = 8
    rows = 1 if whole.fused else 2  # the fused graph chunks batch 1 only
    ids = np.random.default_rng(4).integers(3, 32000, (rows, 30))  # 4 chunks, the last one short
    mask = np.ones_like(ids)
    want = _run(whole, ids, mask, all_logits)
    calls = _counting_steps(monkeypatch)
    got = _run(chunked, ids, mask, all_logits)
    assert calls[:5] == [30, 8, 8, 8, 6]  # the prompt, then its chunks; then the decode steps
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("padded", [True, False])
def test_a_padded_batch_is_read_in_one_pass(folder, padded, monkeypatch):
    """Padding splits rows unevenly, and the fused graph continues a cache with S > 1 in batch 1 only:
    a padded batch runs whole on both graphs, an unpadded batch of 2 in chunks on the portable one."""
    model = Model.from_dir(folder, provider="cpu", startup_cache=False)
    model.prompt_chunk = 8
    ids = np.random.default_rng(5).integers(3, 32000, (2, 20))
    mask = np.ones_like(ids)
    if padded:
        mask[1, :7] = 0
    calls = _counting_steps(monkeypatch)
    model.step(ids, mask, model.new_cache(mask, capacity=24))
    assert calls == ([20] if padded or model.fused else [20, 8, 8, 4])


def test_the_cpu_default():
    assert PROMPT_CHUNK == 256
