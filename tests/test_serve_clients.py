"""Clients no one here wrote, against the server on the default model: Simon Willison's `llm` CLI
with `-o json_object 1`, and lm-evaluation-harness's `local-completions` in its default tokenized
mode (token-id prompts, echo, logprobs) on a small local multiple-choice task, whose loglikelihoods
must equal our runtime's own (Model.step over the same ids) within 1e-4."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")

from serve_live import serving  # noqa: E402

from llama2_onnx.assets import default_model_dir  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "smollm2"
QUESTIONS = [("What is the capital of France?", ["Paris", "London", "Rome"], 0),
             ("How many legs does a spider have?", ["six", "eight", "ten"], 1),
             ("Which planet is known as the red planet?", ["Venus", "Jupiter", "Mars"], 2)]


@pytest.fixture(scope="module")
def url():
    with serving(default_model_dir(), max_batch=2, model_id=MODEL) as (u, _):
        yield u


def test_llm_cli_json_object(url, tmp_path):
    llm = Path(sys.executable).with_name("llm")
    if not llm.exists():
        pytest.skip("the llm CLI is not installed (the dev extra installs it)")
    (tmp_path / "extra-openai-models.yaml").write_text(f'- model_id: smol\n  model_name: {MODEL}\n  api_base: "{url}/v1"\n')
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path), "OPENAI_API_KEY": "none"}
    r = subprocess.run([str(llm), "-m", "smol", "-o", "json_object", "1", "-o", "temperature", "0",
                        "-o", "max_tokens", "80", "--no-log",
                        "Return a JSON object with one key, city, naming the capital of France."],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert isinstance(json.loads(r.stdout), dict)


def test_lm_eval_local_completions_tokenized(url, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from llama2_onnx.runtime.logprobs import log_softmax
    from llama2_onnx.runtime.session import Model
    from llama2_onnx.runtime.tokenizer import load_tokenizer

    folder = default_model_dir()
    tok_dir = tmp_path / "tokenizer"  # transformers' AutoTokenizer over the folder's own tokenizer.json
    tok_dir.mkdir()
    shutil.copy(folder / "tokenizer.json", tok_dir)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    task = tmp_path / "task"
    task.mkdir()
    (task / "data.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                             for q, c, a in QUESTIONS))
    (task / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {task / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    args = (f"model={MODEL},base_url={url}/v1/completions,tokenizer_backend=huggingface,tokenizer={tok_dir},"
            "tokenized_requests=True,num_concurrent=1,max_retries=1")
    res = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["tiny_mc"],
                                  task_manager=TaskManager(include_path=str(task)), log_samples=True)
    samples = res["samples"]["tiny_mc"]
    assert len(samples) == len(QUESTIONS)

    # our runtime over the ids lm-eval sent: the context's, then the continuation's (its encode_pair rule)
    model = Model.from_dir(folder, provider="cpu")
    tok = load_tokenizer(folder, bos_id=model.config.model.bos_id, eos_id=model.config.model.eos_id)
    checked = 0
    for sample in samples:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            whole = tok.encode(context + continuation, bos=False, eos=False)
            ctx = tok.encode(context, bos=False, eos=False)
            ids = np.array([whole], np.int64)
            logits = model.step(ids, np.ones_like(ids), model.new_cache(np.ones_like(ids)), all_logits=True)[0]
            logp = log_softmax(logits)
            want = sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))
            assert resp[0][0] == pytest.approx(want, abs=1e-4)
            checked += 1
    assert checked == 9
