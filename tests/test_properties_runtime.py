"""Property-based tests (hypothesis) for the runtime pieces that take outside input: the manifest
reader, the sampler, the tokenizers and the chat formats. Each answers any input with a valid
result or a one-line UserError, never another exception. Bounded: a few seconds in all."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from llama2_onnx.errors import UserError
from llama2_onnx.runtime.chat_format import CHAT_FORMATS, DialogError, format_dialog
from llama2_onnx.runtime.folder import ModelFolderError, read_manifest
from llama2_onnx.runtime.sampler import SamplingParams, sample
from llama2_onnx.runtime.tokenizer import HFTokenizer, SentencePieceTokenizer

FAST = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def one_line(e: BaseException) -> None:
    assert isinstance(e, UserError) and str(e) and "\n" not in str(e), repr(e)


# ---- manifest.json ----------------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=8)
names = st.sampled_from(["model.onnx", "config.json", "model.onnx.data", "../x", "a/b", "", ".", "manifest.json", "a\nb"]) | st.text(max_size=12)
entries = st.fixed_dictionaries({"size": st.integers(-2, 2**40) | st.booleans() | st.text(max_size=3),
                                 "sha256": st.sampled_from(["0" * 64, "A" * 64, "g" * 64, "0" * 63]) | st.text(max_size=64)},
                                optional={"extra": json_values})
manifests = (json_values | st.fixed_dictionaries({"files": st.dictionaries(names, entries | json_values, max_size=4)})
             | st.fixed_dictionaries({"files": st.dictionaries(names, entries, max_size=4)}))


@FAST
@given(manifest=manifests)
def test_manifest_any_json(manifest):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "manifest.json").write_text(json.dumps(manifest))
        try:
            listed = read_manifest(Path(tmp))
        except ModelFolderError as e:
            one_line(e)
            return
    assert {"model.onnx", "config.json"} <= set(listed)
    for name, meta in listed.items():
        assert "/" not in name and name not in (".", "..") and isinstance(meta.size, int) and len(meta.sha256) == 64


@FAST
@given(raw=st.binary(max_size=64))
def test_manifest_any_bytes(raw):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "manifest.json").write_bytes(raw)
        with pytest.raises(ModelFolderError) as e:  # no byte string of this size is a whole manifest
            read_manifest(Path(tmp))
        one_line(e.value)


# ---- the sampler ---------------------------------------------------------------------------------------

any_float = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-3, 3) | st.booleans() | st.none()


@FAST
@given(logits=hnp.arrays(st.sampled_from([np.float32, np.float64, np.float16]), hnp.array_shapes(min_dims=2, max_dims=2, max_side=6),
                         elements=st.floats(allow_nan=True, allow_infinity=True, width=16)),
       temperature=any_float | st.floats(0, 5), top_p=any_float | st.floats(0, 1), top_k=st.integers(-1, 8) | any_float,
       penalty=any_float | st.floats(0.5, 2), history=st.booleans(), seed=st.integers(0, 2**32))
def test_sampler_any_logits_and_parameters(logits, temperature, top_p, top_k, penalty, history, seed):
    try:
        params = SamplingParams(temperature, top_p, top_k, penalty)
        prev = [list(range(min(3, logits.shape[1])))] * logits.shape[0] if history else None
        tokens = sample(logits, params, np.random.default_rng(seed), prev_tokens=prev)
    except UserError as e:
        one_line(e)
        return
    assert tokens.shape == (logits.shape[0],) and tokens.dtype == np.int64
    assert ((0 <= tokens) & (tokens < logits.shape[1])).all()


# ---- the tokenizers -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spm_tok(llama_tokenizer_model):
    return SentencePieceTokenizer(llama_tokenizer_model)


@pytest.fixture(scope="module")
def hf_tok(smollm2_gguf, tmp_path_factory):
    import gguf

    from llama2_onnx.models import gguf_vocab

    folder = tmp_path_factory.mktemp("smollm2-properties")
    gguf_vocab.write_tokenizer(gguf_vocab.read_vocab(gguf.GGUFReader(str(smollm2_gguf))), folder)
    return HFTokenizer(folder / "tokenizer.json", bos_id=1, eos_id=2)


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in bs]
    return {**{b: chr(b) for b in bs}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


@FAST
@given(text=st.text(max_size=40))
def test_sentencepiece_round_trips_any_text(spm_tok, text):
    """Llama 2's model (identity normalizer, byte fallback) gives back any text exactly,
    leading and repeated spaces included; parse_special changes nothing."""
    ids = spm_tok.encode(text, bos=False, eos=False)
    assert all(0 <= i < spm_tok.vocab_size for i in ids)
    assert spm_tok.decode(ids) == text
    assert spm_tok.encode(text, bos=False, eos=False, parse_special=False) == ids


@FAST
@given(text=st.text(max_size=40) | st.text(st.characters(codec="utf-8"), max_size=40).map(lambda s: s + "<|endoftext|>"))
def test_byte_level_bpe_round_trips_what_its_bytes_allow(hf_tok, text):
    """SmolLM2's vocabulary has no byte fallback and lacks the tokens of 21 bytes (\\x04, \\x06, ...,
    0xF1-0xFF): text made only of bytes it has comes back exactly when special-token spellings are
    read as text; any other text still encodes to ids of the vocabulary, without error."""
    ids = hf_tok.encode(text, bos=False, eos=False, parse_special=False)
    assert all(0 <= i < hf_tok.vocab_size for i in ids)
    assert not set(ids) & set(hf_tok._special.values())
    alphabet = _byte_alphabet()
    if all(hf_tok.tok.token_to_id(alphabet[b]) is not None for b in text.encode("utf-8")):
        assert hf_tok.decode(ids) == text
    hf_tok.decode(hf_tok.encode(text, bos=True, eos=True))  # the tokenizer's own rule: no error either


# ---- the chat formats ---------------------------------------------------------------------------------

contents = st.text(max_size=20) | st.sampled_from(["[INST]", "<<SYS>>", "<|im_start|>", "<|endoftext|>", "<s>", " ", ""])
messages = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", ""]), "content": contents})
dialogs = st.lists(messages | json_values, max_size=5) | json_values


@FAST
@given(dialog=dialogs, style=st.sampled_from([*sorted(CHAT_FORMATS), "nope"]), which=st.sampled_from(["spm", "hf"]))
def test_chat_formats_encode_or_refuse(spm_tok, hf_tok, dialog, style, which):
    tok = spm_tok if which == "spm" else hf_tok
    try:
        ids = format_dialog(dialog, tok, style)
    except DialogError as e:
        one_line(e)
        return
    assert ids and all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
