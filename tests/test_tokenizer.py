"""runtime/tokenizer.py on the real vocabularies: Meta's Llama 2 tokenizer.model (SentencePiece)
and SmolLM2's byte-level BPE tokenizer.json, both rebuilt from GGUF files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from llama2_onnx.errors import UserError
from llama2_onnx.runtime.tokenizer import (HFTokenizer, SentencePieceTokenizer, StreamDecoder, TokenizerError,
                                           load_tokenizer)

TEXTS = [
    "Hello world",
    "Café naïve façade",
    "你好，世界。日本語のテキスト",
    "🦙🚀👍🏽 family: 👨‍👩‍👧",
    "  two  spaces\tand\ttabs\n\nnewlines   ",
    "mixed: naïve 🦙 日本 \n  ok €100",
]


@pytest.fixture(scope="module")
def smollm2_tokenizer_dir(smollm2_gguf, tmp_path_factory):
    import gguf

    from llama2_onnx.models import gguf_vocab

    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    gguf_vocab.write_tokenizer(gguf_vocab.read_vocab(gguf.GGUFReader(str(smollm2_gguf))), folder)
    return folder


@pytest.fixture(scope="module")
def spm_tok(llama_tokenizer_model):
    return SentencePieceTokenizer(llama_tokenizer_model)


@pytest.fixture(scope="module")
def hf_tok(smollm2_tokenizer_dir):
    return HFTokenizer(smollm2_tokenizer_dir / "tokenizer.json", bos_id=1, eos_id=2)


@pytest.fixture(params=["spm", "hf"])
def tok(request):
    return request.getfixturevalue(f"{request.param}_tok")


def stream(tokenizer, ids) -> list[str]:
    dec = StreamDecoder(tokenizer)
    return [dec.push(i) for i in ids] + [dec.flush()]


# ---- the interface ---------------------------------------------------------------------------


def test_sentencepiece_known_ids(spm_tok):
    assert (spm_tok.bos_id, spm_tok.eos_id, spm_tok.vocab_size) == (1, 2, 32000)
    assert spm_tok.encode("Hello world", bos=False, eos=False) == [15043, 3186]
    assert spm_tok.encode("Hello world", bos=True, eos=False) == [1, 15043, 3186]
    assert spm_tok.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]
    assert spm_tok.decode([1, 15043, 3186, 2]) == "Hello world"  # control tokens are dropped
    assert spm_tok.id_to_piece(15043) == "▁Hello"


def test_hf_ids(hf_tok):
    assert (hf_tok.bos_id, hf_tok.eos_id, hf_tok.vocab_size) == (1, 2, 49152)
    ids = hf_tok.encode("Hello world", bos=False, eos=False)
    assert hf_tok.encode("Hello world", bos=True, eos=True) == [1] + ids + [2]
    assert hf_tok.decode([1] + ids + [2]) == "Hello world"  # special tokens are skipped
    assert [hf_tok.id_to_piece(i) for i in ids] == ["Hello", "Ġworld"]


@pytest.mark.parametrize(
    "name, text, want",
    [
        ("spm", "<s>", 1), ("spm", "</s>", 2), ("spm", "<unk>", 0), ("spm", "<|im_start|>", None),
        ("spm", "▁Hello", None), ("spm", "hello", None),
        ("hf", "<|im_start|>", 1), ("hf", "<|im_end|>", 2), ("hf", "<|endoftext|>", 0),
        ("hf", "Hello", None), ("hf", "[INST]", None),
    ],
)
def test_special_id(request, name, text, want):
    assert request.getfixturevalue(f"{name}_tok").special_id(text) == want


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == text
    assert tok.decode(np.array(ids, dtype=np.int64)) == text  # NumPy ids work too


# ---- streaming -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("start", [0, 1, 3])  # a stream may start anywhere (generated tokens only)
def test_stream_equals_decode(tok, text, start):
    ids = tok.encode(text, bos=True, eos=False)[start:]
    pieces, full = stream(tok, ids), tok.decode(ids)
    assert "".join(pieces) == full
    emitted = ""
    for piece in pieces:  # every piece extends a prefix of the full decode: no stray U+FFFD
        emitted += piece
        assert full.startswith(emitted)
    if "\ufffd" not in full:  # (starting inside an emoji, decode itself shows U+FFFD)
        assert not any("\ufffd" in piece for piece in pieces)


def test_stream_holds_back_split_characters(spm_tok):
    ids = spm_tok.encode("🦙", bos=False, eos=False)  # "▁" then four byte pieces <0xF0><0x9F><0xA6><0x99>
    assert [spm_tok.id_to_piece(i) for i in ids[1:]] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    assert stream(spm_tok, ids) == ["", "", "", "", "🦙", ""]


def test_stream_random_ids(tok):
    """Arbitrary id sequences (invalid byte runs included): the stream still equals decode."""
    rng = np.random.default_rng(0)
    text_ids = tok.encode("".join(TEXTS), bos=False, eos=False)
    for _ in range(30):
        # mix real ids (bytes, CJK, spaces) with random ones
        ids = rng.choice(text_ids, size=40).tolist() + rng.integers(0, tok.vocab_size, size=10).tolist()
        ids = rng.permutation(ids).tolist()
        assert "".join(stream(tok, ids)) == tok.decode(ids)


def test_stream_flush_emits_an_unfinished_character(spm_tok):
    ids = spm_tok.encode("ok 🦙", bos=False, eos=False)[:-2]  # cut inside the emoji
    pieces = stream(spm_tok, ids)
    assert "".join(pieces[:-1]) == "ok "
    assert "".join(pieces) == spm_tok.decode(ids) and pieces[-1].startswith("\ufffd")


class CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call gets."""

    def __init__(self, inner):
        self.inner, self.sizes = inner, []

    def decode(self, ids):
        ids = list(ids)
        self.sizes.append(len(ids))
        return self.inner.decode(ids)


def test_stream_decodes_a_short_window(tok):
    text = " ".join(TEXTS) * 40
    ids = tok.encode(text, bos=False, eos=False)
    assert len(ids) > 1000
    counting = CountingTokenizer(tok)
    assert "".join(stream(counting, ids)) == tok.decode(ids)
    assert max(counting.sizes) <= 12  # the window, not the whole output: O(1) per token


# ---- loading ----------------------------------------------------------------------------------


def test_load_prefers_sentencepiece(tmp_path, llama_tokenizer_model, smollm2_tokenizer_dir):
    shutil.copy(smollm2_tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    assert isinstance(load_tokenizer(tmp_path, bos_id=1, eos_id=2), HFTokenizer)
    shutil.copy(llama_tokenizer_model, tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer) and tok.encode("Hello world", True, False) == [1, 15043, 3186]
    assert isinstance(load_tokenizer(tmp_path / "tokenizer.json", bos_id=1, eos_id=2), HFTokenizer)  # a file works too


def test_load_hf_ids_from_tokenizer_config(tmp_path, smollm2_tokenizer_dir):
    shutil.copy(smollm2_tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(TokenizerError, match="bos_id and eos_id"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert load_tokenizer(tmp_path, eos_id=0).eos_id == 0  # what the caller passes wins


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda d: None, "no tokenizer"),
        (lambda d: (d / "tokenizer.model").write_bytes(b"not a model"), "not a SentencePiece model"),
        (lambda d: (d / "tokenizer.json").write_text("{"), "not a Hugging Face tokenizer.json"),
    ],
)
def test_load_errors(tmp_path, setup, match):
    setup(tmp_path)
    with pytest.raises(TokenizerError, match=match) as info:
        load_tokenizer(tmp_path, bos_id=1, eos_id=2)
    assert isinstance(info.value, UserError)


def test_hf_rejects_ids_outside_the_vocabulary(smollm2_tokenizer_dir):
    with pytest.raises(TokenizerError, match="eos_id"):
        HFTokenizer(smollm2_tokenizer_dir / "tokenizer.json", bos_id=1, eos_id=10**6)
