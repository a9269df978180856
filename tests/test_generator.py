"""Generation on a tiny exported model, against our PyTorch decoder."""

import subprocess
import sys

import numpy as np
import pytest

from llama2_onnx.errors import UserError
from llama2_onnx.models.llama import greedy
from llama2_onnx.runtime import Generator, SamplingParams

PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away, there lived", "Hi"]


@pytest.fixture(scope="module", params=[("portable", True), ("portable", False), ("ort", True), ("ort", False)],
                ids=["io_binding", "numpy", "fused-io_binding", "fused-numpy"])
def gen(request, tiny_onnx, tiny_onnx_ort):
    graph, io_binding = request.param
    return Generator.from_dir(tiny_onnx if graph == "portable" else tiny_onnx_ort, provider="cpu", io_binding=io_binding)


def test_greedy_equals_pytorch(gen, tiny_torch_model):
    for prompt in PROMPTS:
        ids = gen.encode_prompt(prompt)
        result = gen.generate(prompt, max_new_tokens=20)
        want = greedy(tiny_torch_model, ids, 20)
        cut = next((i for i, t in enumerate(want) if t in gen.args.eos_ids), len(want))
        assert result.tokens == want[:cut]


@pytest.mark.parametrize("graph", ["portable", "ort"])
def test_io_binding_on_and_off_identical(graph, tiny_onnx, tiny_onnx_ort):
    folder = tiny_onnx if graph == "portable" else tiny_onnx_ort
    bound = Generator.from_dir(folder, io_binding=True)
    plain = Generator.from_dir(folder, io_binding=False)
    kw = dict(max_new_tokens=24, temperature=0.8, top_p=0.9, seed=7)
    assert bound.generate(PROMPTS[1], **kw).tokens == plain.generate(PROMPTS[1], **kw).tokens


def test_fused_cache_grows_past_its_capacity(tiny_onnx_ort, tiny_torch_model):
    """A step beyond the shared buffer's capacity moves the cache to a larger one, tokens unchanged."""
    from llama2_onnx.runtime.session import Model

    model = Model.from_dir(tiny_onnx_ort)
    ids = np.array([Generator.from_dir(tiny_onnx_ort).encode_prompt(PROMPTS[1])])
    cache = model.new_cache(np.ones_like(ids), capacity=ids.shape[1] + 2)
    logits, got = model.step(ids, np.ones_like(ids), cache), []
    for _ in range(12):
        got.append(int(logits[0].argmax()))
        logits = model.step(np.array([[got[-1]]]), np.ones((1, 1), np.int64), cache)
    assert cache.capacity > ids.shape[1] + 2
    assert got == greedy(tiny_torch_model, ids[0].tolist(), 12)


def test_batch_equals_single_runs(gen):
    batch = gen.generate(PROMPTS, max_new_tokens=16)
    singles = [gen.generate(p, max_new_tokens=16) for p in PROMPTS]
    assert [r.tokens for r in batch] == [r.tokens for r in singles]
    assert [r.text for r in batch] == [r.text for r in singles]


def test_result_fields_and_length_finish(gen):
    r = gen.generate(PROMPTS[0], max_new_tokens=5)
    assert r.finish_reason == "length" and len(r.tokens) == 5
    assert r.text == gen.tokenizer.decode(r.tokens)
    assert r.timings.prompt_ms > 0 and len(r.timings.token_ms) == 4
    d = r.to_dict()
    assert set(d) == {"text", "tokens", "finish_reason", "prompt_tokens", "timings"}


def test_stream_equals_generate(gen):
    stream = gen.stream(PROMPTS[1], max_new_tokens=20)
    pieces = list(stream)
    assert "".join(pieces) == stream.result.text == gen.generate(PROMPTS[1], max_new_tokens=20).text


def test_stop_string(gen):
    full = gen.generate(PROMPTS[1], max_new_tokens=20)
    assert len(full.text) > 6
    stop = full.text[3:6]
    r = gen.generate(PROMPTS[1], max_new_tokens=20, stop=[stop])
    assert r.finish_reason == "stop" and r.text == full.text[: full.text.find(stop)]
    stream = gen.stream(PROMPTS[1], max_new_tokens=20, stop=[stop])
    assert "".join(stream) == r.text


def test_context_limit(gen):
    ctx = gen.args.max_seq_len
    ids = gen.encode_prompt("hello " * (ctx - 10))[: ctx - 3]
    results = gen.generate_ids([ids], 50, SamplingParams())
    assert results[0].finish_reason == "length" and len(ids) + len(results[0].tokens) <= ctx
    with pytest.raises(UserError, match="context"):
        gen.generate("hello " * ctx, max_new_tokens=4)


@pytest.mark.parametrize("kw, word", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_sampling_values(gen, kw, word):
    with pytest.raises(ValueError if word != "max_new_tokens" else UserError, match=word):
        gen.generate(PROMPTS[0], **kw)


def test_empty_prompt(gen):
    with pytest.raises(UserError, match="empty"):
        gen.generate("   ")


def _cli(*argv, stdin=None, no_torch=False):
    pre = "import sys; sys.modules['torch'] = None; " if no_torch else "import sys; "
    code = pre + "from llama2_onnx.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, input=stdin)


def test_generate_cli_json_without_torch(tiny_onnx):
    import json

    done = _cli("generate", str(tiny_onnx), "--prompt", "Hello", "--max-new-tokens", "6", "--json", no_torch=True)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["finish_reason"] in ("length", "eos") and len(out["tokens"]) <= 6
    assert set(out["timings"]) >= {"prompt_ms", "per_token_ms"}


@pytest.mark.parametrize("argv, needle", [
    (["generate", "/no/such/folder", "--prompt", "x"], "does not exist"),
    (["generate", "{tiny}", "--prompt", "x", "--provider", "cuda"], "onnxruntime-gpu"),
    (["generate", "{tiny}", "--prompt", "x", "--temperature", "-1"], "temperature"),
    (["generate", "{tiny}", "--prompt", ""], "empty"),
])
def test_cli_bad_input(tiny_onnx, argv, needle):
    done = _cli(*[a.replace("{tiny}", str(tiny_onnx)) for a in argv])
    assert done.returncode == 2 and needle in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_altered_file_is_named(tiny_onnx, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(tiny_onnx, copy)
    with open(copy / "model.onnx.data", "ab") as f:
        f.write(b"\0")
    done = _cli("generate", str(copy), "--prompt", "x")
    assert done.returncode == 2 and "model.onnx.data" in done.stderr
    (copy / "model.onnx").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n")
    done = _cli("generate", str(copy), "--prompt", "x")
    assert done.returncode == 2 and "LFS" in done.stderr
