import hashlib

import pytest
import sentencepiece as spm

from llama2_onnx.models import gguf_vocab

# Meta's tokenizer.model: our rebuild from the vocab GGUF is byte-identical.
META_TOKENIZER_SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"


@pytest.fixture(scope="module")
def sp(llama_tokenizer_model):
    return spm.SentencePieceProcessor(model_file=str(llama_tokenizer_model))


def test_rebuilt_llama_tokenizer_is_metas(llama_tokenizer_model):
    data = llama_tokenizer_model.read_bytes()
    assert len(data) == 499_723
    assert hashlib.sha256(data).hexdigest() == META_TOKENIZER_SHA256


@pytest.mark.parametrize(
    "text, ids",
    [
        ("Hello world", [15043, 3186]),
        ("Hello world! The meaning of life is", [15043, 3186, 29991, 450, 6593, 310, 2834, 338]),
    ],
)
def test_llama_tokenizer_known_ids(sp, text, ids):
    assert sp.vocab_size() == 32000
    assert (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id()) == (1, 2, 0, -1)
    assert sp.encode(text) == ids
    assert sp.decode(ids) == text


def test_bpe_vocab_becomes_tokenizer_json(smollm2_gguf, tmp_path):
    from gguf import GGUFReader
    from tokenizers import Tokenizer

    vocab = gguf_vocab.read_vocab(GGUFReader(str(smollm2_gguf)))
    assert gguf_vocab.write_tokenizer(vocab, tmp_path) == "tokenizer.json"
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == 49152
    ids = tok.encode("<|im_start|>user\nWhat is 12 plus 3?<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2  # ChatML specials are single tokens
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nWhat is 12 plus 3?<|im_end|>"
    pieces = [tok.id_to_token(i) for i in tok.encode("12").ids]
    assert pieces == ["1", "2"]  # SmolLM2 splits digits one by one


def test_unsupported_vocab_kind(tmp_path):
    with pytest.raises(gguf_vocab.VocabError, match="not supported"):
        gguf_vocab.write_tokenizer({"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a"]}, tmp_path)
