"""Speculative decoding (runtime/speculate.py): greedy output equal to plain decoding token for token on
both graph kinds and the default model, with n-gram and draft-model guesses that are often kept and
often refused; sampled output distributed as plain sampling (chi-square); the cache cut back to what
was kept; the options on the CLI and the server's /metrics."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from llama2_onnx.runtime import Generator, SamplingParams
from llama2_onnx.runtime import speculate
from llama2_onnx.runtime.speculate import ModelDrafter, NgramDrafter, Speculator

GREEDY = SamplingParams()
# prompts on which the tiny random model falls into loops it leaves now and then (n-gram guesses
# often kept, often refused), and one on which it does not
REPEATS = "1 2 3 1 2 3 1 2 3 1 2"
LOOPS = "a a a a a a a a"
FREE = "The weather in the mountains today is"
NOISE = 0.3  # the draft model's weights: the target's plus this much noise (of each tensor's spread)


def _draft(tiny_args, tokenizer_model, tmp_path_factory, noise: float):
    """A draft model folder with the tiny model's tokenizer: its weights plus noise (of each tensor's spread)."""
    import torch

    from llama2_onnx.export.api import export_model
    from llama2_onnx.models import writers

    state = writers.random_state_dict(tiny_args, seed=0)  # the target's (conftest's tiny_hf_checkpoint)
    gen = torch.Generator().manual_seed(1)
    state = {k: v + noise * v.std() * torch.randn(v.shape, generator=gen) for k, v in state.items()}
    ckpt = tmp_path_factory.mktemp("tiny-draft")
    writers.write_hf(state, tiny_args, ckpt)
    shutil.copyfile(tokenizer_model, ckpt / "tokenizer.model")
    out = tmp_path_factory.mktemp("tiny-draft-onnx") / "ort"
    export_model(checkpoint=ckpt, out=out, graph="ort", progress=False)
    return out


@pytest.fixture(scope="module")
def draft_folder(tiny_args, llama_tokenizer_model, tmp_path_factory):
    """A draft that agrees with the target often, not always (greedy guesses kept and refused)."""
    return _draft(tiny_args, llama_tokenizer_model, tmp_path_factory, NOISE)


@pytest.fixture
def always(monkeypatch):
    """Speculate every round, whatever it costs: the tiny model's guesses must be exercised, not judged."""
    monkeypatch.setattr(speculate, "MARGIN", 0.0)


def _run(gen: Generator, prompt: str, n: int, params=GREEDY, seed=None):
    ids = gen.encode_prompt(prompt)
    return ids, gen.generate_ids([ids], n, params, seed=seed)[0]


@pytest.mark.parametrize("graph", ["portable", "ort"])
@pytest.mark.parametrize("how", ["ngram", "draft", "self"])
def test_greedy_equals_plain_decoding(graph, how, always, tiny_onnx, tiny_onnx_ort, draft_folder):
    folder = tiny_onnx_ort if graph == "ort" else tiny_onnx
    kind = {"ngram": "ngram", "draft": str(draft_folder), "self": str(folder)}[how]
    plain = Generator.from_dir(folder, provider="cpu")
    spec = Generator.from_dir(folder, provider="cpu", speculative=kind, draft_tokens=5)
    try:
        for prompt in (REPEATS, LOOPS, FREE):
            ids, want = _run(plain, prompt, 128 - len(plain.encode_prompt(prompt)) - 1)
            _, got = _run(spec, prompt, len(want.tokens))
            assert got.tokens == want.tokens and got.text == want.text and got.finish_reason == want.finish_reason
            # the row holds the prompt and every token but the last (fed next): no refused guess left in it
            slots = spec.engine.slots
            rows = [slots.held(r).tolist() for r in range(slots.n_slots)]
            assert ids + got.tokens[:-1] in rows
        s = spec.engine.stats()
        assert s["spec_rounds"] > 0 and s["spec_accepted"] > 0
        if how != "self":
            assert s["spec_accepted"] < s["spec_drafted"]  # refusals happened and were rolled back
        else:
            assert s["spec_accepted"] == s["spec_drafted"]  # the model's own guesses are always kept
    finally:
        plain.close()
        spec.close()


@pytest.mark.slow
def test_default_model_greedy_equal_and_faster_rounds(smollm2_onnx):
    plain = Generator.from_dir(smollm2_onnx)
    spec = Generator.from_dir(smollm2_onnx, speculative="ngram")
    text = ("Llamas are domesticated South American camelids, widely used as meat and pack animals by Andean "
            "cultures since the pre-Columbian era. They are social animals and live with others as a herd.")
    try:
        for content in (f"Repeat this text exactly:\n\n{text}", "Write a short poem about the sea."):
            ids = plain.chat_ids([{"role": "user", "content": content}])
            want = plain.generate_ids([ids], 96, GREEDY)[0]
            got = spec.generate_ids([ids], 96, GREEDY)[0]
            assert got.tokens == want.tokens
        s = spec.engine.stats()
        assert s["spec_tokens"] > s["spec_rounds"]  # more than one token per round where guesses held
    finally:
        plain.close()
        spec.close()


class ArgmaxDrafter(ModelDrafter):
    """Certain guesses (q None, as an n-gram's): the target's own most likely tokens, which sampling keeps
    often and refuses often (the residual is then drawn from)."""

    params = GREEDY

    def draft(self, seq, k):
        as_drafted = SimpleNamespace(req=SimpleNamespace(prompt=seq.req.prompt, params=self.params), tokens=seq.tokens,
                                     seen=seq.seen, adjusted=seq.adjusted, rng=seq.rng)
        tokens, q = super().draft(as_drafted, k)
        return tokens, None if self.params.greedy else q


class FlatDrafter(ArgmaxDrafter):
    """Guesses drawn from the target's two likeliest tokens: q is not p (two of its six), and many are refused."""

    params = SamplingParams(temperature=1.5, top_k=2)


@pytest.mark.parametrize("how", ["certain", "draft"])
def test_sampled_output_follows_plain_sampling(how, always, tiny_onnx_ort):
    """Tokens 2 to 5 of 600 sampled answers (top_k 6, temperature 1.5): the same distribution with and
    without speculation (chi-square, p > 0.001), while rounds of up to 4 guesses keep and refuse them
    (chains of kept guesses included)."""
    from scipy.stats import chi2_contingency

    params = SamplingParams(temperature=1.5, top_k=6)
    plain = Generator.from_dir(tiny_onnx_ort, provider="cpu")
    spec = Generator.from_dir(tiny_onnx_ort, provider="cpu")
    try:
        ids = plain.encode_prompt(FREE)
        drafter = (ArgmaxDrafter if how == "certain" else FlatDrafter)(
            plain.model, plain.engine.context, plain.model.config.model.vocab_size)
        spec.engine.speculator = Speculator(drafter, 4)
        samples = {}
        for name, gen, base in (("plain", plain, 0), ("spec", spec, 10_000)):
            rows = [gen.generate_ids([ids], 6, params, seed=base + s)[0].tokens for s in range(600)]
            samples[name] = rows
        s = spec.engine.stats()
        assert s["spec_rounds"] > 0 and 0 < s["spec_accepted"] < s["spec_drafted"]
        assert s["spec_drafted"] > s["spec_rounds"]  # rounds of several guesses: later ones checked after kept ones
        for pos in (1, 2, 3, 4):
            cats = sorted({r[pos] for rows in samples.values() for r in rows})
            table = np.array([[sum(r[pos] == c for r in rows) for c in cats] for rows in samples.values()])
            table = table[:, table.sum(axis=0) >= 10]  # rare categories would make the test unreliable
            assert chi2_contingency(table).pvalue > 1e-3, table
    finally:
        plain.close()
        spec.close()


def test_a_paused_stream_waits_after_one_round(always, tiny_onnx_ort):
    """A pulled stream whose reader stops reading: at most one round past what was read, then nothing."""
    g = Generator.from_dir(tiny_onnx_ort, provider="cpu", speculative="ngram", draft_tokens=4)
    try:
        stream = g.stream_ids(g.encode_prompt(LOOPS), max_new_tokens=100)
        pieces = iter(stream)
        read = [next(pieces) for _ in range(8)]
        time.sleep(0.3)
        n = g.engine.stats()["generated_tokens"]
        time.sleep(0.3)
        assert g.engine.stats()["generated_tokens"] == n < len(read) + 4 + 1 + 4  # stopped, a round ahead at most
        assert g.engine.stats()["spec_rounds"] > 0
        stream.cancel()
    finally:
        g.close()


def test_ngram_guesses_go_around_a_loop():
    seq = SimpleNamespace(req=SimpleNamespace(prompt=(5, 7, 8, 7, 8)), tokens=[7])
    assert NgramDrafter().draft(seq, 5) == ([8, 7, 8, 7, 8], None)  # "7 8" repeats: guessed on around
    seq = SimpleNamespace(req=SimpleNamespace(prompt=(1, 2, 3, 9, 1, 2)), tokens=[3])
    assert NgramDrafter().draft(seq, 3) == ([9, 1, 2], None)
    assert NgramDrafter().draft(SimpleNamespace(req=SimpleNamespace(prompt=(1, 2, 3)), tokens=[4]), 3) == ([], None)


def test_a_sequence_with_a_grammar_or_penalties_decodes_plainly(always, tiny_onnx_ort):
    spec = Generator.from_dir(tiny_onnx_ort, provider="cpu", speculative="ngram")
    try:
        r = spec.generate(REPEATS, max_new_tokens=10, response_format={"type": "json_object"})
        assert r.text.lstrip().startswith("{") and spec.engine.stats()["spec_rounds"] == 0
    finally:
        spec.close()


def test_adaptive_off_where_guesses_fail():
    """A sequence whose guesses are refused stops speculating for 16 plain steps, then 32 after a failed
    return; a round that keeps its guesses brings the short pause back."""
    spec = Speculator(NgramDrafter(), 8)
    spec.plain_s = 0.02

    class Seq:
        spec = None

    seq = Seq()
    assert spec.plan(seq, 8) > 0  # the prior: worth a try

    def fail_until_off() -> int:
        rounds = 0
        while spec.plan(seq, 8) > 0:
            spec.record(seq, 8, 0, 0.03)  # nothing kept, each round 1.5 plain steps
            rounds += 1
        return rounds

    assert 0 < fail_until_off() < 5
    for pause in (16, 32):
        for _ in range(pause):
            assert spec.plan(seq, 8) == 0
            spec.plain(seq, 0.02)
        assert spec.plan(seq, 8) > 0 and fail_until_off() < 5  # tries again from the prior, fails again
    for _ in range(64):
        spec.plain(seq, 0.02)
    for _ in range(6):
        spec.record(seq, 8, 8, 0.03)  # everything kept
    assert spec.plan(seq, 8) == 8 and seq.spec.backoff == 16


def _cli(*argv):
    code = "import sys; from llama2_onnx.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)


def test_cli_options(tiny_onnx_ort, tmp_path):
    base = ("generate", str(tiny_onnx_ort), "--prompt", REPEATS, "--max-new-tokens", "40", "--provider", "cpu")
    plain, spec = _cli(*base), _cli(*base, "--speculative", "ngram", "--draft-tokens", "4")
    assert plain.returncode == 0 and spec.returncode == 0 and plain.stdout == spec.stdout
    for bad, why in ((("--speculative", str(tmp_path / "nowhere")), "--speculative takes ngram or a draft model folder"),
                     (("--speculative", "ngram", "--draft-tokens", "0"), "--draft-tokens must be at least 1")):
        done = _cli(*base, *bad)
        assert done.returncode == 2 and why in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_draft_with_another_tokenizer_is_refused(tiny_onnx_ort, smollm2_onnx):
    from llama2_onnx.errors import UserError

    with pytest.raises(UserError, match="another tokenizer"):
        Generator.from_dir(tiny_onnx_ort, provider="cpu", speculative=str(smollm2_onnx))


def test_metrics_report_acceptance(tiny_onnx_ort, always):
    pytest.importorskip("fastapi")
    from serve_live import serving

    with serving(tiny_onnx_ort, {"metrics": True}, model_id="m", speculative="ngram") as (url, _):
        r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": REPEATS, "max_tokens": 40,
                                                      "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        text = httpx.get(url + "/metrics", timeout=10).text
    assert "llama2_onnx_speculative_acceptance_ratio " in text and "llama2_onnx_speculative_tokens_per_round " in text
