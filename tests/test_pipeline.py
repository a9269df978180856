"""pipeline("text-generation") against transformers' pipeline on the same tiny checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from llama2_onnx import pipeline
from llama2_onnx.errors import UserError
from llama2_onnx.runtime.pipeline import PIPELINES

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

PROMPT = "Plants create energy through a process known as photosynthesis."


@pytest.fixture(scope="module")
def hf_pipe(tiny_hf_checkpoint, tmp_path_factory):
    """transformers' pipeline on the tiny checkpoint; tokenizer_config.json as Llama 2's repositories
    have it (without one, transformers 5 reads tokenizer.model with no BOS)."""
    folder = tmp_path_factory.mktemp("tiny-hf-pipe") / "model"
    shutil.copytree(tiny_hf_checkpoint, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
         "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": False}))
    return transformers.pipeline("text-generation", model=str(folder), dtype=torch.float32)


@pytest.fixture(scope="module")
def pipe(tiny_onnx):
    return pipeline("text-generation", model=tiny_onnx, device="cpu")


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=12), dict(max_new_tokens=12, return_full_text=False),
                                    dict(max_length=20), dict(max_new_tokens=8, repetition_penalty=1.3)])
def test_greedy_equals_transformers(pipe, hf_pipe, kwargs):
    assert pipe(PROMPT, **kwargs) == hf_pipe(PROMPT, do_sample=False, **kwargs)


def test_batch_returns_a_list_per_prompt(pipe, hf_pipe):
    prompts = [PROMPT, "Hi"]
    got = pipe(prompts, max_new_tokens=6)
    assert got == hf_pipe(prompts, do_sample=False, max_new_tokens=6)
    assert [len(x) for x in got] == [1, 1] and got[1][0]["generated_text"].startswith("Hi")


def test_chat_input_answers_with_the_messages_plus_the_reply(pipe):
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    out = pipe(chat, max_new_tokens=5)
    reply = pipe.tokenizer.decode(pipe.generator.chat(chat, max_new_tokens=5).tokens)
    assert out == [{"generated_text": chat + [{"role": "assistant", "content": reply}]}]
    assert pipe([chat, chat], max_new_tokens=5) == [out, out]


def test_sampling_is_seeded(pipe):
    a = pipe(PROMPT, do_sample=True, max_new_tokens=8, temperature=0.9, top_p=0.95, seed=3)
    assert a == pipe(PROMPT, do_sample=True, max_new_tokens=8, temperature=0.9, top_p=0.95, seed=3)


def test_tasks_and_errors(tiny_onnx):
    with pytest.raises(UserError, match="is a text generator, not a text classifier"):  # tests/test_classifier.py has the rest
        pipeline("text-classification", model=tiny_onnx)
    with pytest.raises(UserError, match="unknown task 'summarization'"):
        pipeline("summarization", model=tiny_onnx)
    assert {"text-generation", "text-classification"} <= set(PIPELINES)


def test_pipeline_imports_neither_torch_nor_transformers():
    code = ("import sys, llama2_onnx; assert 'llama2_onnx.runtime' not in sys.modules\n"
            "from llama2_onnx import pipeline\n"
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
