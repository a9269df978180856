"""Write a Meta-layout state dict + ModelArgs as a checkpoint of each format, and make random ones.

Used by the tests (every format must load back to the same weights) and by benchmark
scripts that need checkpoints of a given size without downloading one.

    write_meta(state_dict, args, out_dir, n_shards=1)            params.json + consolidated.NN.pth
    write_hf(state_dict, args, out_dir, max_shard_bytes=None)    config.json + safetensors (or .bin)
    write_gguf(state_dict, args, path, qtype="F32")              one .gguf file, llama metadata + vocab
    random_state_dict(args, seed)                                seeded weights with sane scales

A classifier (``args.num_labels``, Hugging Face's LlamaForSequenceClassification) has ``score.weight``
in place of ``output.weight`` (random_state_dict makes it); write_hf and write_gguf take its labels.

The state dict is in Meta's names and rotary layout, as ``checkpoint.load`` returns it;
with ``args.tie_embeddings`` an ``output.weight`` in it is ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint_layout import expected_shapes, meta_to_hf, rope_heads, shard_dim, source_name
from .config import GGUF_LABELS, HF_CLASSIFIER, ModelArgs, default_labels, meta_ffn_hidden_dim


def _weights(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """The tensors the format stores, in the order of expected_shapes."""
    return {name: state_dict[name] for name in expected_shapes(args)}


def random_state_dict(args: ModelArgs, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded random weights (Meta names) that give non-degenerate logits.

    Matrices are normal with std 1/sqrt(fan_in), so every projection keeps activations
    at unit scale and logits spread over a few units; norms are 1 + small noise.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_shapes(args).items():
        if len(shape) == 1:
            w = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            w = torch.randn(shape, generator=g) / shape[1] ** 0.5
        out[name] = w.to(dtype)
    return out


# ---- Meta -------------------------------------------------------------------------

def _meta_ffn_params(args: ModelArgs) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that make Meta's rule give args.ffn_hidden_dim.

    The args' own pair when it does; otherwise multiple_of = the width and a multiplier
    that lands just under it, which Meta's round-up then brings to exactly the width.
    """
    if meta_ffn_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier) == args.ffn_hidden_dim:
        return args.multiple_of, args.ffn_dim_multiplier
    base = int(2 * (4 * args.dim) / 3)
    multiple_of, multiplier = args.ffn_hidden_dim, args.ffn_hidden_dim / base
    assert meta_ffn_hidden_dim(args.dim, multiple_of, multiplier) == args.ffn_hidden_dim
    return multiple_of, multiplier


def meta_params(args: ModelArgs) -> dict[str, Any]:
    """params.json of a Meta checkpoint."""
    multiple_of, multiplier = _meta_ffn_params(args)
    return {
        "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
        "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier, "norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta, "vocab_size": -1,  # as in Meta's Llama 2 release
    }


def meta_rope_freqs(args: ModelArgs) -> torch.Tensor:
    """The rotary frequencies Meta's files also carry ("rope.freqs"); loaders must ignore them."""
    return 1.0 / args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim)


def write_meta(state_dict: dict[str, torch.Tensor], args: ModelArgs, out_dir: str | Path, n_shards: int = 1) -> Path:
    """params.json + consolidated.NN.pth, split into n_shards like Meta's model parallelism."""
    if args.tie_embeddings:
        raise ValueError("Meta's format has no tied embeddings")
    if args.is_classifier:
        raise ValueError("Meta's format has no classifiers")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(meta_params(args), indent=2))
    weights = _weights(state_dict, args)
    rope_freqs = meta_rope_freqs(args)
    for k in range(n_shards):
        shard = {}
        for name, t in weights.items():
            dim = shard_dim(name)
            # clone: torch.save writes a view's whole storage
            shard[name] = (t if dim is None else t.chunk(n_shards, dim=dim)[k]).clone()
        shard["rope.freqs"] = rope_freqs.clone()
        torch.save(shard, out / f"consolidated.{k:02d}.pth")
    return out


# ---- Hugging Face -----------------------------------------------------------------

def hf_config(args: ModelArgs, dtype: torch.dtype, labels: list[str] | None = None) -> dict[str, Any]:
    """config.json of a transformers LlamaForCausalLM, or LlamaForSequenceClassification with its
    labels (default LABEL_i) when args.num_labels is set."""
    classifier = {}
    if args.is_classifier:
        labels = labels or default_labels(args.num_labels)
        if len(labels) != args.num_labels:
            raise ValueError(f"{len(labels)} labels for num_labels {args.num_labels}")
        classifier = {"id2label": {str(i): x for i, x in enumerate(labels)}, "label2id": {x: i for i, x in enumerate(labels)}}
    return {
        "architectures": [HF_CLASSIFIER if args.is_classifier else "LlamaForCausalLM"], **classifier,
        "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_embeddings,
        "bos_token_id": args.bos_id, "eos_token_id": args.eos_id, "pad_token_id": args.pad_id,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def pack_shards(sizes: dict[str, int], max_bytes: int | None) -> list[list[str]]:
    """Names grouped in order into shards of at most max_bytes (one tensor may exceed it alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if max_bytes is not None and shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def write_hf(state_dict: dict[str, torch.Tensor], args: ModelArgs, out_dir: str | Path,
             max_shard_bytes: int | None = None, safetensors: bool = True, labels: list[str] | None = None) -> Path:
    """config.json + model.safetensors (or pytorch_model.bin with safetensors=False).

    With max_shard_bytes: model-0000x-of-0000y.safetensors and model.safetensors.index.json
    (pytorch_model-0000x-of-0000y.bin and its index for .bin). q/k get HF's permute.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf: dict[str, torch.Tensor] = {}
    for name, t in _weights(state_dict, args).items():
        heads = rope_heads(name, args)
        hf[source_name(name, "hf")] = (meta_to_hf(t, heads) if heads else t).contiguous()
    dtype = next(iter(hf.values())).dtype
    (out / "config.json").write_text(json.dumps(hf_config(args, dtype, labels), indent=2))
    stem, ext = ("model", "safetensors") if safetensors else ("pytorch_model", "bin")
    groups = pack_shards({k: v.numel() * v.element_size() for k, v in hf.items()}, max_shard_bytes)
    files = [f"{stem}.{ext}"] if len(groups) == 1 else [f"{stem}-{k + 1:05d}-of-{len(groups):05d}.{ext}" for k in range(len(groups))]
    for file, names in zip(files, groups):
        part = {n: hf[n].clone() for n in names}
        if safetensors:
            from safetensors.torch import save_file

            save_file(part, out / file, metadata={"format": "pt"})
        else:
            torch.save(part, out / file)
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in hf.values())},
                 "weight_map": {n: f for f, names in zip(files, groups) for n in names}}
        (out / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))
    return out


# ---- GGUF -------------------------------------------------------------------------

def minimal_vocab(args: ModelArgs) -> dict[str, Any]:
    """A SentencePiece-style ('llama') GGUF vocabulary of args.vocab_size made-up pieces."""
    unk, control, normal = 2, 3, 1  # GGUF token types (SentencePiece numbering)
    tokens = ["<unk>", "<s>", "</s>"] + [f"tok{i}" for i in range(3, args.vocab_size)]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens[: args.vocab_size],
        "tokenizer.ggml.scores": [0.0, 0.0, 0.0] + [-float(i) for i in range(3, args.vocab_size)],
        "tokenizer.ggml.token_type": ([unk, control, control] + [normal] * args.vocab_size)[: args.vocab_size],
        "tokenizer.ggml.bos_token_id": args.bos_id,
        "tokenizer.ggml.eos_token_id": args.eos_id,
        "tokenizer.ggml.unknown_token_id": 0,
    }


def add_gguf_value(writer, key: str, value: Any) -> None:
    """Write one metadata value with the GGUF type its Python type implies."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))


GGUF_QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # those gguf.quants can quantize


def write_gguf(state_dict: dict[str, torch.Tensor], args: ModelArgs, path: str | Path, qtype: str = "F32",
               vocab: dict[str, Any] | None = None, labels: list[str] | None = None) -> Path:
    """One GGUF file (architecture 'llama'): matrices in qtype (one of GGUF_QTYPES), norms in F32.

    vocab: GGUF tokenizer.* fields (as ``gguf_vocab.read_vocab`` returns them); default
    ``minimal_vocab(args)``. q/k are written as they are: llama.cpp's layout is Meta's
    (see checkpoint_layout).
    """
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType
    from gguf.quants import quantize

    if qtype not in GGUF_QTYPES:
        raise ValueError(f"qtype {qtype!r} is not one of {', '.join(GGUF_QTYPES)}")
    qt = GGMLQuantizationType[qtype]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(str(path), "llama")
    w.add_name("random llama")
    w.add_block_count(args.n_layers)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.ffn_hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_dimension_count(args.head_dim)
    w.add_vocab_size(args.vocab_size)
    w.add_file_type(LlamaFileType.ALL_F32 if qtype == "F32" else LlamaFileType[f"MOSTLY_{qtype}"])
    for key, value in (vocab if vocab is not None else minimal_vocab(args)).items():
        add_gguf_value(w, key, value)
    if args.is_classifier:  # llama.cpp's classifier key; the head is cls.output.weight
        w.add_array(GGUF_LABELS, labels or default_labels(args.num_labels))
    for name, t in _weights(state_dict, args).items():
        arr = t.detach().float().numpy()
        if arr.ndim == 1 or qt == GGMLQuantizationType.F32:  # norms stay F32, as llama.cpp writes them
            w.add_tensor(source_name(name, "gguf"), arr)
        elif qt == GGMLQuantizationType.F16:
            w.add_tensor(source_name(name, "gguf"), arr.astype(np.float16))
        else:  # bytes, [rows, blocks per row * block bytes]
            w.add_tensor(source_name(name, "gguf"), quantize(arr, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
