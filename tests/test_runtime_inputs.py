"""Bad input to the runtime's Python API: seeds, stop strings, text that is not valid Unicode, and
special tokens' spellings inside chat messages (escaped: encoded as text, never as the token)."""

from __future__ import annotations

import pytest

from llama2_onnx.errors import UserError
from llama2_onnx.runtime.chat_format import DialogError, format_dialog
from llama2_onnx.runtime.generator import Generator, stop_strings
from llama2_onnx.runtime.sampler import MAX_SEED, SamplingError, make_rng
from llama2_onnx.runtime.tokenizer import HFTokenizer, SentencePieceTokenizer, well_formed


@pytest.fixture(scope="module")
def gen(tiny_onnx):
    return Generator.from_dir(tiny_onnx, huge_pages=False)


@pytest.fixture(scope="module")
def smol_tok(smollm2_gguf, tmp_path_factory):
    import gguf

    from llama2_onnx.models import gguf_vocab

    folder = tmp_path_factory.mktemp("smollm2-inputs")
    gguf_vocab.write_tokenizer(gguf_vocab.read_vocab(gguf.GGUFReader(str(smollm2_gguf))), folder)
    return HFTokenizer(folder / "tokenizer.json", bos_id=1, eos_id=2)


@pytest.fixture(scope="module")
def llama_tok(llama_tokenizer_model):
    return SentencePieceTokenizer(llama_tokenizer_model)


# ---- seeds ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 1.5, "3", True])
def test_bad_seed(gen, seed):
    with pytest.raises(SamplingError, match="seed must be an integer from 0"):
        make_rng(seed)
    with pytest.raises(UserError, match="seed"):
        gen.generate("Hello", max_new_tokens=2, temperature=1.0, seed=seed)


@pytest.mark.parametrize("seed", [None, 0, MAX_SEED])
def test_good_seed(seed):
    make_rng(seed).random()


# ---- stop strings ----------------------------------------------------------------------------------


def test_a_string_is_one_stop_string(gen):
    text = gen.generate("Hello", max_new_tokens=24).text
    # a 3-character stop whose first character occurs earlier: as characters it would cut there
    k = next(k for k in range(1, len(text) - 2) if text.find(text[k]) < k and text.find(text[k:k + 3]) == k)
    stop = text[k:k + 3]
    result = gen.generate("Hello", max_new_tokens=24, stop=stop)
    assert result.finish_reason == "stop" and result.text == text[:k]
    assert gen.generate("Hello", max_new_tokens=24, stop=[stop]).text == text[:k]
    assert "".join(gen.stream("Hello", max_new_tokens=24, stop=stop)) == text[:k]


@pytest.mark.parametrize("stop", ["", [""], ["ok", 3], [None]])
def test_bad_stop_strings(gen, stop):
    with pytest.raises(UserError, match="stop strings"):
        gen.generate("Hello", max_new_tokens=2, stop=stop)


def test_stop_strings():
    assert stop_strings("abc") == ["abc"] and stop_strings(("a", "b")) == ["a", "b"] and stop_strings(None) == []


# ---- text that is not Unicode ----------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [("a\udcffb", "a\ufffdb"), ("\ud800", "\ufffd"), ("\ud83e\udd99", "\U0001f999"),
                                        ("plain", "plain")])
def test_well_formed(text, want):
    assert well_formed(text) == want


def test_lone_surrogates_encode(gen, smol_tok, llama_tok):
    """What Python makes of bytes that are not UTF-8 (argv, surrogateescape stdin) is encoded as U+FFFD."""
    for tok in (smol_tok, llama_tok):
        assert tok.encode("a\udcffb", False, False) == tok.encode("a\ufffdb", False, False)
    assert gen.generate("Hello \udcff", max_new_tokens=2).tokens


# ---- special tokens in chat messages -----------------------------------------------------------------


def _specials(tok, ids):
    special = {i for text, i in tok._special.items()} if isinstance(tok, HFTokenizer) else {0, 1, 2}
    return [i for i in ids if i in special]


def test_chatml_escapes_every_special_token(smol_tok):
    plain = format_dialog([{"role": "user", "content": "a  b"}], smol_tok, "chatml")
    for text in smol_tok._special:
        dialog = [{"role": "user", "content": f"a {text} b"}]
        if text in ("<|im_start|>", "<|im_end|>"):  # the turn tags stay refused
            with pytest.raises(DialogError, match="special tags"):
                format_dialog(dialog, smol_tok, "chatml")
            continue
        ids = format_dialog(dialog, smol_tok, "chatml")
        assert _specials(smol_tok, ids) == _specials(smol_tok, plain), text
        assert f"a {text} b" in smol_tok.decode(ids)


def test_plain_prompts_keep_the_tokenizers_rule(smol_tok):
    assert smol_tok.encode("<|endoftext|>", False, False) == [0]
    assert 0 not in smol_tok.encode("<|endoftext|>", False, False, parse_special=False)


@pytest.mark.parametrize("text", ["<s>", "</s>", "<unk>"])
def test_llama2_control_tokens_are_never_parsed(llama_tok, text):
    """SentencePiece does not read control pieces from text: BOS/EOS only where the format puts them."""
    plain = format_dialog([{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"},
                           {"role": "user", "content": "d"}], llama_tok, "llama2")
    ids = format_dialog([{"role": "user", "content": f"a {text} b"}, {"role": "assistant", "content": text},
                         {"role": "user", "content": text}], llama_tok, "llama2")
    assert _specials(llama_tok, ids) == _specials(llama_tok, plain) == [1, 2, 1]
    assert llama_tok.encode(text, False, False) == llama_tok.encode(text, False, False, parse_special=False)
