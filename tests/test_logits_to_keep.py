"""The head on the last position only (the graph's optional logits_to_keep input, runtime/contract.py):
the same logits and greedy tokens as the full pass, both graph kinds, batch and padding included."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from llama2_onnx.runtime import contract
from llama2_onnx.runtime.session import Model
from llama2_onnx.runtime.slots import make_slots


@pytest.fixture(scope="module", params=["portable", "ort"])
def model(request, tiny_onnx, tiny_onnx_ort):
    return Model.from_dir(tiny_onnx if request.param == "portable" else tiny_onnx_ort, provider="cpu", startup_cache=False)


def _padded_batch(rng):
    ids = rng.integers(3, 32000, (3, 9))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding, as callers pass it
    mask[2, :8] = 0  # a one-token prompt
    return ids, mask


def test_last_position_equals_the_full_pass(model):
    assert model.keeps_logits
    ids, mask = _padded_batch(np.random.default_rng(0))
    last = model.step(ids, mask, model.new_cache(mask, capacity=32))  # (B, V), the head on one position per row
    every = model.step(ids, mask, model.new_cache(mask, capacity=32), all_logits=True)  # (B, S, V)
    np.testing.assert_allclose(last, every[:, -1], rtol=0, atol=1e-5)
    assert (last.argmax(-1) == every[:, -1].argmax(-1)).all()


def test_greedy_tokens_unchanged(model):
    ids, mask = _padded_batch(np.random.default_rng(1))

    def greedy(keep: bool) -> np.ndarray:
        model.keeps_logits = keep  # False: the full head, as for a folder exported before the input
        try:
            cache = model.new_cache(mask, capacity=32)
            out = [model.step(ids, mask, cache).argmax(-1)]
            for _ in range(8):
                out.append(model.step(out[-1][:, None], np.ones((3, 1), np.int64), cache).argmax(-1))
            return np.stack(out, 1)
        finally:
            model.keeps_logits = True

    np.testing.assert_array_equal(greedy(True), greedy(False))


def test_slots_prefill_last_and_all(model):
    prompt = np.random.default_rng(2).integers(3, 32000, 12).tolist()
    slots = make_slots(model, 2)
    last = slots.prefill(0, prompt)  # (1, V)
    every = slots.prefill(1, prompt, all_logits=True)  # (S, V)
    assert last.shape == (1, 32000) and every.shape == (12, 32000)
    np.testing.assert_allclose(last[0], every[-1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("keep", [1, 3, 9, 50])
def test_graph_keeps_each_rows_last_positions(keep, tiny_onnx_ort, tiny_args):
    """The fused graph with right-aligned rows of different lengths: row b's last n tokens end at its length."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    s = ort.InferenceSession(str(tiny_onnx_ort / contract.MODEL_FILE), opts)
    ids = np.random.default_rng(3).integers(3, 32000, (2, 9))
    counts = np.array([9, 5])
    feeds = {contract.INPUT_IDS: ids, contract.ATTENTION_MASK: (np.arange(9)[None] < counts[:, None]).astype(np.int64)}
    feeds.update({n: np.zeros((2, tiny_args.n_kv_heads, 16, tiny_args.head_dim), np.float32)
                  for n in contract.past_names(tiny_args.n_layers)})
    every = s.run([contract.LOGITS], feeds)[0]  # the default: every position
    kept = s.run([contract.LOGITS], {**feeds, contract.LOGITS_TO_KEEP: np.array(keep, np.int64)})[0]
    k = min(keep, 9)
    want = np.stack([every[b, np.maximum(np.arange(c - k, c), 0)] for b, c in enumerate(counts)])
    assert kept.shape == (2, k, 32000)
    np.testing.assert_allclose(kept, want, rtol=0, atol=1e-5)
