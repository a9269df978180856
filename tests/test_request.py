"""runtime/request.py: the one budget rule and the defaults table every API fills sampling from."""

from __future__ import annotations

import pytest

from llama2_onnx.runtime.request import DEFAULTS, ContextError, sampling, token_budget
from llama2_onnx.runtime.sampler import SamplingParams


@pytest.mark.parametrize("prompt, asked, context, explicit, want", [
    (10, None, 100, False, 90),  # no ask: the rest of the context
    (10, 50, 100, False, 50),
    (10, 500, 100, False, 90),  # capped (Meta's and HF's generate)
    (10, 90, 100, True, 90),  # an explicit ask that just fits
    (100, 0, 100, False, 0),  # a prompt only scored may fill the context
    (99, 1, 100, True, 1),
])
def test_token_budget(prompt, asked, context, explicit, want):
    assert token_budget(prompt, asked, context, explicit=explicit) == want


@pytest.mark.parametrize("prompt, asked, context, explicit, blamed", [
    (100, None, 100, False, None),  # the prompt fills the context
    (100, 1, 100, False, None),
    (101, 0, 100, False, None),  # past it, even to be scored
    (10, 91, 100, True, 91),  # an explicit ask past what is left (OpenAI's max_tokens)
])
def test_token_budget_refusals(prompt, asked, context, explicit, blamed):
    with pytest.raises(ContextError) as e:
        token_budget(prompt, asked, context, explicit=explicit)
    assert (e.value.prompt_tokens, e.value.context, e.value.asked) == (prompt, context, blamed)
    assert str(e.value).count("\n") == 0 and f"{prompt} tokens" in str(e.value)


def test_defaults_table():
    assert sampling("generator") == SamplingParams()  # greedy
    assert sampling("openai") == SamplingParams(temperature=1.0, top_p=1.0)
    assert sampling("meta", temperature=0.8) == SamplingParams(temperature=0.8, top_p=0.9)
    assert sampling("hf").top_k == 50 and sampling("hf", top_k=0).top_k == 0
    # do_sample false: greedy, whatever else is given, the penalty kept
    assert sampling("hf", greedy=True, temperature=0.7, top_k=5, repetition_penalty=1.3) == \
        SamplingParams(repetition_penalty=1.3)
    assert sampling("chat") == SamplingParams(temperature=0.6, top_p=0.9)  # Meta's Llama 2 chat values
    assert set(DEFAULTS) == {"generator", "openai", "chat", "hf", "meta"}
    with pytest.raises(TypeError):
        sampling("openai", temprature=0.5)


def test_a_folders_generation_config_under_each_api():
    """transformers' rule for our API, the CLIs and Hugging Face's (sampled only with do_sample), vLLM's
    for the OpenAI routes (its values whatever do_sample says), none for Meta's signature defaults."""
    from llama2_onnx.runtime.generation_config import GenerationConfig

    chat = GenerationConfig.parse({"do_sample": True, "temperature": 0.7, "top_p": 0.8}, "x")
    assert sampling("generator", folder=chat) == SamplingParams(temperature=0.7, top_p=0.8, top_k=50)
    assert sampling("generator", folder=chat, temperature=0) == SamplingParams(top_p=0.8, top_k=50)  # explicit wins
    assert sampling("chat", folder=chat) == SamplingParams(temperature=0.7, top_p=0.8)
    assert sampling("openai", folder=chat, top_p=0.5) == SamplingParams(temperature=0.7, top_p=0.5)
    assert sampling("meta", folder=chat) == SamplingParams(temperature=0.6, top_p=0.9)
    greedy = GenerationConfig.parse({"temperature": 0.7, "repetition_penalty": 1.2}, "x")  # no do_sample
    assert sampling("generator", folder=greedy) == SamplingParams(repetition_penalty=1.2)
    assert sampling("openai", folder=greedy) == SamplingParams(temperature=0.7, repetition_penalty=1.2)
