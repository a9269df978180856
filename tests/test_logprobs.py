"""runtime/logprobs.py, the generator's logprobs and prompt logprobs, and `generate --logprobs --echo`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llama2_onnx.cli import main
from llama2_onnx.runtime import Generator
from llama2_onnx.runtime.logprobs import log_softmax, prompt_logprobs, token_logprobs


@pytest.mark.parametrize("logits, ids, want", [
    ([[0.0, 0.0]], [1], [np.log(0.5)]),
    ([[1000.0, 0.0, -1000.0]], [0], [0.0]),  # no overflow
    ([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]], [2, 1], [-2 - np.log(1 + np.e ** -1 + np.e ** -2), np.log(1 / 3)]),
])
def test_token_logprobs(logits, ids, want):
    np.testing.assert_allclose(token_logprobs(np.array(logits), ids), want, atol=1e-12)


def test_prompt_logprobs_shift_by_one_and_start_at_zero():
    logits = np.random.default_rng(0).normal(size=(4, 7))
    prompt = [1, 5, 2, 6]
    want = [0.0] + [log_softmax(logits[s - 1])[prompt[s]] for s in range(1, 4)]
    assert prompt_logprobs(logits, prompt) == pytest.approx(want)
    assert prompt_logprobs(logits[:1], [1]) == [0.0]


@pytest.fixture(scope="module", params=["portable", "ort"])
def gen(request, tiny_onnx, tiny_onnx_ort):
    return Generator.from_dir(tiny_onnx if request.param == "portable" else tiny_onnx_ort, provider="cpu")


def test_left_padded_batch_scores_like_single_rows(gen):
    prompts = ["The quick brown fox", "Once upon a time, in a land far away", "Hi"]
    batch = gen.generate(prompts, max_new_tokens=5, logprobs=True, prompt_logprobs=True)
    for p, b in zip(prompts, batch):
        one = gen.generate(p, max_new_tokens=5, logprobs=True, prompt_logprobs=True)
        assert b.tokens == one.tokens and len(b.logprobs) == len(b.tokens)
        assert len(b.prompt_logprobs) == b.prompt_tokens and b.prompt_logprobs[0] == 0.0
        np.testing.assert_allclose(b.logprobs, one.logprobs, atol=1e-4)
        np.testing.assert_allclose(b.prompt_logprobs, one.prompt_logprobs, atol=1e-4)
    plain = gen.generate(prompts[0], max_new_tokens=5)
    assert plain.logprobs is None and plain.prompt_logprobs is None and "logprobs" not in plain.to_dict()


def test_scoring_only_and_per_row_limits(gen):
    ids = [gen.encode_prompt("The quick brown fox"), gen.encode_prompt("Hi")]
    scored = gen.generate_ids(ids, 0, gen_params(), prompt_logprobs=True)
    assert [r.tokens for r in scored] == [[], []] and [len(r.prompt_logprobs) for r in scored] == [len(i) for i in ids]
    rows = gen.generate_ids(ids, [2, 4], gen_params())
    assert [len(r.tokens) for r in rows] == [2, 4]
    with pytest.raises(Exception, match="at least 1"):
        gen.generate_ids(ids, 0, gen_params())


def gen_params():
    from llama2_onnx.runtime import SamplingParams

    return SamplingParams()


def test_cli_generate_logprobs_echo(tiny_onnx, capsys):
    main(["generate", str(tiny_onnx), "--prompt", "Hello world", "--max-new-tokens", "3", "--logprobs", "--echo", "--json"])
    out = json.loads(capsys.readouterr().out)
    n = out["prompt_tokens"]
    assert out["text"].startswith("Hello world") and len(out["tokens"]) == n + 3
    assert len(out["logprobs"]) == len(out["token_texts"]) == len(out["tokens"]) and out["logprobs"][0] == 0.0
    assert all(lp < 0 for lp in out["logprobs"][1:]) and out["token_texts"][:3] == ["", "Hello", "world"]
    main(["generate", str(tiny_onnx), "--prompt", "Hello world", "--max-new-tokens", "3", "--logprobs"])
    text = capsys.readouterr().out
    assert "logprob" in text and len(text.strip().splitlines()) == 1 + 1 + 3  # text, header, 3 tokens
