"""The checkpoint's generation_config.json: carried into the exported folder, and the sampling defaults of
the Python API, `generate`/`chat`, the server's routes and /v1/models (the page's settings), pipeline and
AutoModel; explicit arguments win. Without one, the server's chat route gets Meta's Llama 2 chat values."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import pytest

from llama2_onnx.export.api import export_model
from llama2_onnx.runtime import Generator
from llama2_onnx.runtime.generation_config import GenerationConfig

# Llama-2-7b-chat's own file with other values (its own 0.6 / 0.9 are also the fallback chat values,
# which would hide a file that is not read)
LLAMA2_CHAT = {"bos_token_id": 1, "do_sample": True, "eos_token_id": 2, "pad_token_id": 0, "temperature": 0.7,
               "max_length": 4096, "top_p": 0.8, "transformers_version": "4.32.0.dev0"}
# what those defaults are, spelled out (transformers' top_k 50 where the file names none)
EXPLICIT = dict(temperature=0.7, top_p=0.8, top_k=50)
DIALOG = [{"role": "user", "content": "Tell me a story about a fox."}]


def _cli(*argv, stdin: str | None = None):
    code = "import sys; from llama2_onnx.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, input=stdin, timeout=300)


@pytest.fixture(scope="module")
def chat_folder(tiny_hf_checkpoint, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("tiny-gencfg")
    for f in tiny_hf_checkpoint.iterdir():
        shutil.copyfile(f, ckpt / f.name)
    (ckpt / "generation_config.json").write_text(json.dumps(LLAMA2_CHAT))
    out = tmp_path_factory.mktemp("tiny-gencfg-onnx") / "ort"
    export_model(checkpoint=ckpt, out=out, graph="ort", progress=False)
    return out


def test_carried_into_the_folder_and_its_manifest(chat_folder):
    saved = json.loads((chat_folder / "generation_config.json").read_text())
    assert saved == {k: v for k, v in LLAMA2_CHAT.items() if k != "transformers_version"}
    assert "generation_config.json" in json.loads((chat_folder / "manifest.json").read_text())["files"]


def test_the_python_api_samples_as_the_file_says(chat_folder):
    gen = Generator.from_dir(chat_folder)
    try:
        default = gen.chat(DIALOG, max_new_tokens=12, seed=3)
        assert default.tokens == gen.chat(DIALOG, max_new_tokens=12, seed=3, **EXPLICIT).tokens
        assert gen.generate("Once upon a time", max_new_tokens=12, seed=4).tokens == \
            gen.generate("Once upon a time", max_new_tokens=12, seed=4, **EXPLICIT).tokens
        greedy = gen.chat(DIALOG, max_new_tokens=12, temperature=0)  # explicit wins: greedy
        assert greedy.tokens == gen.chat(DIALOG, max_new_tokens=12, temperature=0, seed=99).tokens
        assert {tuple(gen.chat(DIALOG, max_new_tokens=12, seed=s).tokens) for s in range(4)} != {tuple(greedy.tokens)}
    finally:
        gen.close()


def test_pipeline_and_automodel_read_it(chat_folder):
    from llama2_onnx import AutoModelForCausalLM, AutoTokenizer
    from llama2_onnx.runtime.pipeline import TextGenerationPipeline

    model = AutoModelForCausalLM.from_pretrained(chat_folder)
    try:
        assert model.generation_config.do_sample and model.generation_config.temperature == 0.7
        inputs = AutoTokenizer.from_pretrained(chat_folder)("Once upon a time", return_tensors="np")
        a = model.generate(**inputs, max_new_tokens=10, seed=5)
        assert (a == model.generate(**inputs, max_new_tokens=10, seed=5, do_sample=True, **EXPLICIT)).all()
        assert (model.generate(**inputs, max_new_tokens=10, do_sample=False) ==
                model.generate(**inputs, max_new_tokens=10, do_sample=False, seed=9)).all()
        pipe = TextGenerationPipeline(model.generator)
        assert pipe("Once upon a time", max_new_tokens=10, seed=5) == \
            pipe("Once upon a time", max_new_tokens=10, seed=5, do_sample=True, **EXPLICIT)
    finally:
        model.close()


def test_the_cli_chat_uses_it(chat_folder):
    given = _cli("chat", str(chat_folder), "--max-new-tokens", "10", "--seed", "3", stdin="Tell me a story about a fox.\n")
    spelled = _cli("chat", str(chat_folder), "--max-new-tokens", "10", "--seed", "3", "--temperature", "0.7",
                   "--top-p", "0.8", "--top-k", "50", stdin="Tell me a story about a fox.\n")
    assert given.returncode == 0 and spelled.returncode == 0, given.stderr + spelled.stderr
    assert given.stdout == spelled.stdout


def test_the_server_and_its_page_settings(chat_folder, tiny_onnx_ort):
    pytest.importorskip("fastapi")
    from serve_live import serving

    def ask(url, **kw):
        body = {"model": "m", "messages": DIALOG, "max_tokens": 10, "seed": 5, **kw}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    with serving(chat_folder, model_id="m") as (url, _):
        card = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]
        assert card["chat_defaults"] == {"temperature": 0.7, "top_p": 0.8, "max_tokens": None}
        assert ask(url) == ask(url, temperature=0.7, top_p=0.8)  # the OpenAI route: the file's values, no top_k
    with serving(tiny_onnx_ort, model_id="m") as (url, _):  # no generation_config.json: Meta's chat values
        card = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]
        assert card["chat_defaults"] == {"temperature": 0.6, "top_p": 0.9, "max_tokens": None}
        assert ask(url) == ask(url, temperature=0.6, top_p=0.9)


@pytest.mark.parametrize("content,why", [
    ("{not json", "is not readable JSON"),
    (json.dumps({"temperature": "hot"}), "temperature = 'hot' is not valid"),
    (json.dumps({"top_p": 0}), "top_p = 0 is not valid"),
    (json.dumps([1, 2]), "must hold a JSON object"),
])
def test_a_bad_file_stops_the_export_in_one_line(tiny_hf_checkpoint, tmp_path, content, why):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_hf_checkpoint, ckpt)
    (ckpt / "generation_config.json").write_text(content)
    out = tmp_path / "out"
    done = _cli("export", str(ckpt), str(out), "--no-verify")
    assert done.returncode == 2 and why in done.stderr and "fix or remove it" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()


def test_parse_keeps_what_it_uses():
    gc = GenerationConfig.parse({**LLAMA2_CHAT, "num_beams": 1, "top_k": None}, "x")
    assert gc.sampling == {"temperature": 0.7, "top_p": 0.8} and gc.top_k == 50 and gc.eos_token_id == 2
    assert GenerationConfig().do_sample is False and GenerationConfig().max_length == 20
