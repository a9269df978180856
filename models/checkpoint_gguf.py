"""Open a GGUF file of architecture 'llama' (ggml's own quantized types read as they are; the
vocabulary kept for the tokenizer files): models/checkpoint.py's `gguf` format."""

from __future__ import annotations

from pathlib import Path

from . import tensor_files
from .checkpoint_base import CheckpointError, LazyCheckpoint, _args_from, _chat_format, _check_weights_file, _corrupt, _rename
from .config import GGUF_LABELS, ModelArgs, default_labels
from .gguf_vocab import VocabError, read_vocab
from .tensor_files import TensorFileError


# ---- GGUF -------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"
# What we dequantize (gguf.quants has these since gguf 0.10); the IQ types are refused.
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_VOCAB_ARRAYS = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}


def open_gguf(path: Path) -> LazyCheckpoint:
    from gguf import GGUFReader

    _check_weights_file(path)
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise CheckpointError(f"{path} is not a GGUF file (it does not start with 'GGUF'): pass a .gguf model file")
    try:
        reader = GGUFReader(str(path))  # maps the file; only the metadata pages are touched
    except Exception as e:
        raise _corrupt(path, e) from None
    try:
        meta = {k: f.contents() for k, f in reader.fields.items() if k not in _VOCAB_ARRAYS}
        vocab = read_vocab(reader)
    except VocabError:
        vocab = None
    except UnicodeDecodeError as e:  # the reader decodes strings only when asked for them
        raise _corrupt(path, e) from None
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path} is a GGUF of architecture {repr(arch)[:60]}; only 'llama' (Llama 2, SmolLM2, ...) is supported")
    if reader.byte_order != "I":
        raise CheckpointError(f"{path} is a big-endian GGUF: convert it on a little-endian machine with llama.cpp")
    if not reader.tensors:
        raise CheckpointError(f"{path} holds no tensors (a vocabulary-only GGUF?): pass a GGUF file with the model weights")
    bad = sorted({t.tensor_type.name for t in reader.tensors} - set(GGUF_TYPES))
    if bad:
        raise CheckpointError(f"{path} uses GGUF type(s) {', '.join(bad)}; supported: {', '.join(GGUF_TYPES)}: "
                              "use a file quantized to one of those (llama.cpp's llama-quantize makes them)")
    try:
        refs = _rename(tensor_files.gguf_tensors(reader, path), "gguf", path)
    except TensorFileError as e:
        raise _corrupt(path, e) from None
    emb, score = refs.get("tok_embeddings.weight"), refs.get("score.weight")
    vocab_size = emb.shape[0] if emb is not None else meta.get("llama.vocab_size")
    num_labels = score.shape[0] if score is not None and len(score.shape) == 2 else None  # llama.cpp's cls.output
    args = _args_from(path, ModelArgs.from_gguf_metadata, meta, vocab_size, tie_embeddings="output.weight" not in refs,
                      num_labels=num_labels)
    labels = meta.get(GGUF_LABELS) if num_labels else None
    if num_labels and not (isinstance(labels, list) and len(labels) == num_labels and all(isinstance(x, str) for x in labels)):
        labels = default_labels(num_labels)
    tokens = (vocab or {}).get("tokenizer.ggml.tokens")
    ids = {"bos": args.bos_id, "eos": args.eos_id, "padding": args.pad_id}
    outside = [k for k, i in ids.items() if tokens is not None and i is not None and i >= len(tokens)]
    if outside:  # the embedding may have padding rows; the vocabulary must name these tokens
        raise CheckpointError(f"{path}: tokenizer.ggml.{outside[0]}_token_id {ids[outside[0]]} is past its vocabulary "
                              f"of {len(tokens)} tokens: the file is damaged, convert the model again with llama.cpp")
    template = (vocab or {}).get("tokenizer.chat_template")
    return LazyCheckpoint(
        args=args, pieces={name: [ref] for name, ref in refs.items()}, source="gguf", path=path, gguf_vocab=vocab,
        chat_format=_chat_format(template, [path.name, str(meta.get("general.name", ""))]), labels=labels or [],
    )
