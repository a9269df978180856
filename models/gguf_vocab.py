"""Tokenizer files from a GGUF vocabulary. Torch-free (needs gguf and protobuf).

- ``tokenizer.ggml.model == "llama"`` (SentencePiece, Llama 2): a SentencePiece
  ``ModelProto`` rebuilt from the tokens, scores and token types. With Meta's trainer
  fields it tokenizes exactly like Meta's ``tokenizer.model`` (and is byte-identical to it).
- ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE, e.g. SmolLM2): a Hugging Face
  ``tokenizer.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llama2_onnx.errors import UserError

SPM_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"

# GGUF token types use SentencePiece's numbering.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp pre-tokenizer names whose digits are split one by one before byte-level BPE.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact"}


class VocabError(UserError, ValueError):
    """The GGUF vocabulary is missing or of a kind we cannot turn into a tokenizer."""


def read_vocab(reader) -> dict[str, Any]:
    """The tokenizer.ggml.* fields of a gguf.GGUFReader as plain Python values."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            out[key] = field.contents()
    if "tokenizer.ggml.tokens" not in out:
        raise VocabError("the GGUF file has no tokenizer.ggml.tokens: no vocabulary to build a tokenizer from")
    return out


def spm_model_proto(vocab: dict[str, Any]) -> bytes:
    """Serialized SentencePiece ModelProto for a 'llama' GGUF vocabulary."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens = vocab["tokenizer.ggml.tokens"]
    scores = vocab.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = vocab.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    m = pb.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece, p.score = piece, score
        if kind != NORMAL:
            p.type = kind
    # Meta's trainer fields, in Meta's order, so the file is byte-identical to theirs.
    t = m.trainer_spec
    t.input.append("/large_experiments/theorem/datasets/MERGED/all.test1.merged")
    t.model_prefix = "spm_model_32k_200M_charcov099995_allowWSO__v2"
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size = len(tokens)
    t.self_test_sample_size = 0
    t.input_format = "text"
    t.character_coverage = 0.99995
    t.input_sentence_size = 200000000
    t.seed_sentencepiece_size = 1000000
    t.shrinking_factor = 0.75
    t.num_threads = 80
    t.num_sub_iterations = 2
    t.max_sentence_length = 4192
    t.shuffle_input_sentence = True
    t.max_sentencepiece_length = 16
    t.split_by_unicode_script = True
    t.split_by_whitespace = True
    t.split_by_number = True
    t.treat_whitespace_as_suffix = False
    t.split_digits = True
    t.allow_whitespace_only_pieces = True
    t.vocabulary_output_piece_score = True
    t.hard_vocab_limit = True
    t.use_all_vocab = False
    t.byte_fallback = True
    t.required_chars = ""
    t.unk_id = int(vocab.get("tokenizer.ggml.unknown_token_id", 0))
    t.bos_id = int(vocab.get("tokenizer.ggml.bos_token_id", 1))
    t.eos_id = int(vocab.get("tokenizer.ggml.eos_token_id", 2))
    t.pad_id = int(vocab.get("tokenizer.ggml.padding_token_id", -1))
    t.unk_surface = " \u2047 "
    t.unk_piece, t.bos_piece, t.eos_piece, t.pad_piece = "<unk>", "<s>", "</s>", "<pad>"
    t.train_extremely_large_corpus = False
    t.enable_differential_privacy = False
    t.differential_privacy_noise_level = 0.0
    t.differential_privacy_clipping_threshold = 0
    n = m.normalizer_spec
    n.name = "identity"
    n.precompiled_charsmap = b""
    n.add_dummy_prefix = bool(vocab.get("tokenizer.ggml.add_space_prefix", True))
    n.remove_extra_whitespaces = False
    n.normalization_rule_tsv = ""
    return m.SerializeToString()


def hf_tokenizer_json(vocab: dict[str, Any]) -> str:
    """tokenizer.json (Hugging Face tokenizers) for a 'gpt2' byte-level BPE GGUF vocabulary."""
    tokens = vocab["tokenizer.ggml.tokens"]
    types = vocab.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    merges = vocab.get("tokenizer.ggml.merges")
    if not merges:
        raise VocabError("the GGUF 'gpt2' vocabulary has no tokenizer.ggml.merges")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    pre = byte_level
    if vocab.get("tokenizer.ggml.pre") in _DIGIT_SPLIT_PRE:
        pre = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    added = [
        {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, (tok, kind) in enumerate(zip(tokens, types)) if kind in (CONTROL, USER_DEFINED)
    ]
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": [m.split(" ", 1) for m in merges],
        },
    }
    return json.dumps(doc, ensure_ascii=False)


def write_tokenizer(vocab: dict[str, Any], out_dir: str | Path) -> str:
    """Write the tokenizer file for this vocabulary into out_dir; return its file name."""
    kind = vocab.get("tokenizer.ggml.model")
    out_dir = Path(out_dir)
    if kind == "llama":
        (out_dir / SPM_FILE).write_bytes(spm_model_proto(vocab))
        return SPM_FILE
    if kind == "gpt2":
        (out_dir / HF_FILE).write_text(hf_tokenizer_json(vocab), encoding="utf-8")
        return HF_FILE
    raise VocabError(f"GGUF tokenizer model {kind!r} is not supported; expected 'llama' (SentencePiece) or 'gpt2' (BPE)")


def spm_model_from_gguf(path: str | Path) -> bytes:
    """The Llama 2 tokenizer.model bytes rebuilt from a llama-spm vocab GGUF file."""
    from gguf import GGUFReader

    vocab = read_vocab(GGUFReader(str(path)))
    if vocab.get("tokenizer.ggml.model") != "llama":
        raise VocabError(f"{path} holds a {vocab.get('tokenizer.ggml.model')!r} vocabulary, not a SentencePiece 'llama' one")
    return spm_model_proto(vocab)
