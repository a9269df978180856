"""transformers' Auto classes over a model folder (runtime/hf_auto.py): the Hugging Face Llama 2 page's
snippet, its import line and model path changed, gives transformers' own greedy ids on the tiny
checkpoint (max_length, max_new_tokens, a padded batch), and the same without torch; sampled
num_return_sequences follow transformers' shape and order and are reproducible with a seed; the
plain forward's logits are transformers'; the classifier's likewise."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llama2_onnx import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from llama2_onnx.runtime import Generator, SamplingParams  # noqa: E402

PROMPT = "Hello, my llama is"
BATCH = ["Hello, my llama is", "The capital of France, a city of many museums, is"]


@pytest.fixture(scope="module")
def hf_folder(tiny_hf_checkpoint, tmp_path_factory):
    """The tiny checkpoint as transformers reads it: Llama's tokenizer (BOS first), EOS as padding."""
    folder = tmp_path_factory.mktemp("tiny-hf-tok")
    for f in tiny_hf_checkpoint.iterdir():
        shutil.copyfile(f, folder / f.name)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>", "padding_side": "left"}))
    return folder


@pytest.fixture(scope="module")
def theirs(hf_folder):
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_folder))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    return tok, model


@pytest.fixture(scope="module", params=["portable", "ort"])
def ours(request, tiny_onnx, tiny_onnx_ort):
    folder = tiny_onnx_ort if request.param == "ort" else tiny_onnx
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", device_map="auto")  # HF-only options ignored
    yield AutoTokenizer.from_pretrained(folder), model, folder
    model.close()


def test_the_model_pages_snippet(ours, theirs):
    tokenizer, model, _ = ours
    inputs = tokenizer(PROMPT, return_tensors="pt").to(model.device)
    outputs = model.generate(**inputs, max_length=50)
    text = tokenizer.decode(outputs[0])

    hf_tok, hf_model = theirs
    hf_inputs = hf_tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        want = hf_model.generate(**hf_inputs, max_length=50, do_sample=False)
    assert torch.equal(inputs["input_ids"], hf_inputs["input_ids"])
    assert isinstance(outputs, torch.Tensor) and outputs.tolist() == want.tolist()
    assert text == hf_tok.decode(want[0]) and text.startswith("<s> Hello")
    assert tokenizer.decode(outputs[0], skip_special_tokens=True) == hf_tok.decode(want[0], skip_special_tokens=True)


def test_max_new_tokens_and_a_padded_batch(ours, theirs):
    tokenizer, model, _ = ours
    hf_tok, hf_model = theirs
    inputs = tokenizer(BATCH, return_tensors="pt", padding=True)
    hf_inputs = hf_tok(BATCH, return_tensors="pt", padding=True)
    assert torch.equal(inputs["input_ids"], hf_inputs["input_ids"])
    assert torch.equal(inputs["attention_mask"], hf_inputs["attention_mask"])
    out = model.generate(**inputs, max_new_tokens=24)
    with torch.no_grad():
        want = hf_model.generate(**hf_inputs, max_new_tokens=24, do_sample=False, pad_token_id=hf_tok.eos_token_id)
    assert out.tolist() == want.tolist()
    assert tokenizer.batch_decode(out, skip_special_tokens=True) == hf_tok.batch_decode(want, skip_special_tokens=True)
    # greedy rows are the Generator's, token for token
    _, model_, folder = ours
    gen = model_.generator
    for row, text in zip(out.tolist(), BATCH):
        ids = gen.encode_prompt(text)
        alone = gen.generate_ids([ids], 24, SamplingParams())[0]
        assert row[len(row) - 24:][:len(alone.tokens)] == alone.tokens


def test_the_forward_pass_gives_transformers_logits(ours, theirs):
    tokenizer, model, _ = ours
    hf_tok, hf_model = theirs
    inputs = tokenizer(BATCH, return_tensors="np", padding=True)
    logits = model(**inputs).logits
    with torch.no_grad():
        want = hf_model(**hf_tok(BATCH, return_tensors="pt", padding=True)).logits.numpy()
    real = inputs["attention_mask"].astype(bool)
    assert isinstance(logits, np.ndarray) and logits.shape == want.shape
    assert np.abs(logits[real] - want[real]).max() < 1e-4


def test_sampled_return_sequences(ours):
    tokenizer, model, _ = ours
    inputs = tokenizer(BATCH, return_tensors="np", padding=True)
    a = model.generate(**inputs, do_sample=True, temperature=0.9, top_k=0, num_return_sequences=3, max_new_tokens=12, seed=7)
    b = model.generate(**inputs, do_sample=True, temperature=0.9, top_k=0, num_return_sequences=3, max_new_tokens=12, seed=7)
    assert a.shape[0] == 6 and np.array_equal(a, b)  # each input 3 times, one after another, as transformers
    width = inputs["input_ids"].shape[1]
    assert all(np.array_equal(a[i, :width], inputs["input_ids"][i // 3]) for i in range(6))
    assert len({tuple(r) for r in a[:3].tolist()}) > 1  # row i samples with seed + i
    with pytest.raises(Exception, match="num_return_sequences > 1 needs do_sample"):
        model.generate(**inputs, num_return_sequences=2)
    with pytest.raises(Exception, match="does not support num_beams"):
        model.generate(**inputs, num_beams=4)


def test_without_torch(tiny_onnx, ours):
    """The snippet with return_tensors="np" in a process where torch cannot be imported: the same ids."""
    _, model, folder = ours
    code = f"""
import sys, json
sys.modules["torch"] = None  # import torch fails
from llama2_onnx import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained({str(folder)!r})
model = AutoModelForCausalLM.from_pretrained({str(folder)!r})
inputs = tokenizer({PROMPT!r}, return_tensors="np")
outputs = model.generate(**inputs, max_length=50)
print(json.dumps(outputs.tolist()))
try:
    tokenizer({PROMPT!r}, return_tensors="pt")
except Exception as e:
    print(e)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    want = model.generate(**tokenizer(PROMPT, return_tensors="np"), max_length=50)
    assert json.loads(lines[0]) == want.tolist()
    assert lines[1] == 'return_tensors="pt" needs torch installed; use return_tensors="np" without it'


def test_tokenizer_conventions(ours, theirs):
    tokenizer, _, _ = ours
    hf_tok, _ = theirs
    plain = tokenizer(BATCH)  # lists, no padding
    assert plain["input_ids"] == hf_tok(BATCH)["input_ids"] and plain.attention_mask == hf_tok(BATCH)["attention_mask"]
    assert tokenizer.encode(PROMPT) == hf_tok.encode(PROMPT)
    assert tokenizer(PROMPT, add_special_tokens=False)["input_ids"] == hf_tok(PROMPT, add_special_tokens=False)["input_ids"]
    assert (tokenizer.bos_token, tokenizer.eos_token) == (hf_tok.bos_token, hf_tok.eos_token)
    with pytest.raises(Exception, match="padding=True"):
        tokenizer(BATCH, return_tensors="np")


def test_sequence_classifier(text_classifier):
    ckpt, out = text_classifier
    texts = ["I loved every minute of it.", "Dull."]
    ours = AutoModelForSequenceClassification.from_pretrained(out, dtype="auto")
    tok = AutoTokenizer.from_pretrained(out)
    logits = ours(**tok(texts, return_tensors="pt", padding=True)).logits
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(ckpt), padding_side="left")
    hf_tok.pad_token = hf_tok.unk_token  # the checkpoint's pad_token_id 0
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(ckpt), dtype=torch.float32,
                                                                         attn_implementation="eager").eval()
    with torch.no_grad():
        want = hf(**hf_tok(texts, return_tensors="pt", padding=True)).logits
    assert isinstance(logits, torch.Tensor) and torch.allclose(logits, want, atol=1e-4)
    assert ours.id2label == {0: "NEGATIVE", 1: "POSITIVE"}


@pytest.mark.slow
def test_the_snippet_on_the_default_model(smollm2_onnx):
    """SmolLM2 (byte-level BPE, ChatML): the snippet's ids are the Generator's greedy ones, and the
    tokenizer's ids are transformers' reading of the same tokenizer.json."""
    from tokenizers import Tokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_onnx)
    model = AutoModelForCausalLM.from_pretrained(smollm2_onnx)
    try:
        inputs = tokenizer("The capital of France is", return_tensors="np")
        outputs = model.generate(**inputs, max_length=24)
        prompt = inputs["input_ids"][0].tolist()
        assert prompt == Tokenizer.from_file(str(smollm2_onnx / "tokenizer.json")).encode(
            "The capital of France is", add_special_tokens=False).ids
        alone = model.generator.generate_ids([prompt], 24 - len(prompt), SamplingParams())[0]
        assert outputs[0].tolist()[:len(prompt) + len(alone.tokens)] == prompt + alone.tokens
        assert "Paris" in tokenizer.decode(outputs[0], skip_special_tokens=True)
    finally:
        model.close()
