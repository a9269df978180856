"""End to end on the real model: SmolLM2-135M-Instruct from its GGUF, against transformers and onnxruntime-genai."""

import subprocess
import sys

import numpy as np
import pytest

from llama2_onnx.runtime import Generator, SamplingParams

pytestmark = pytest.mark.slow
# An open request, so that the answer runs past 32 tokens.
STORY = [{"role": "user", "content": "Write a long story about a robot who learns to paint."}]


@pytest.fixture(scope="module")
def gen(smollm2_onnx):
    return Generator.from_dir(smollm2_onnx)


@pytest.fixture(scope="module")
def prompt_ids(gen):
    return gen.chat_ids(STORY)


def test_export_verified(smollm2_onnx):
    import json

    v = json.loads((smollm2_onnx / "config.json").read_text())["verify"]
    assert v["max_abs_logit_diff"] < 1e-3 and v["greedy_agreement"] == 32


def test_greedy_equals_transformers(gen, prompt_ids, smollm2_gguf):
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=32, do_sample=False)
    want = out[0, len(prompt_ids):].tolist()
    got = gen.generate_ids([prompt_ids], 32, SamplingParams())[0].tokens
    assert len(got) == 32 and got == want


def test_onnxruntime_genai_loads_folder_and_agrees(gen, prompt_ids, smollm2_onnx):
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(smollm2_onnx))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + 32, do_sample=False)
    g = og.Generator(model, params)
    g.append_tokens(np.array(prompt_ids, dtype=np.int32))
    while not g.is_done():
        g.generate_next_token()
    theirs = list(g.get_sequence(0))[len(prompt_ids):]
    ours = gen.generate_ids([prompt_ids], 32, SamplingParams())[0].tokens
    assert len(ours) == 32 and theirs == ours


def test_chat_cli_answers_paris(smollm2_onnx):
    code = "import sys; from llama2_onnx.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "chat", str(smollm2_onnx), "--max-new-tokens", "48"],
                          input="What is the capital of France?\n", capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
