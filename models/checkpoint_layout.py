"""How each checkpoint format names and lays out a Llama's tensors: the one mapping table.

Shared by the loaders (``models/checkpoint.py``) and the writers (``models/writers.py``).

- Names: Meta's names are ours; the Hugging Face and GGUF names appear only in ``TENSOR_NAMES``.
- Shards: Meta's model-parallel shards split each matrix along ``SHARD_DIM``.
- Rotary layout: Meta rotates dimension pairs (2i, 2i+1) of each head. Hugging Face
  checkpoints are permuted so that pairs are (i, i + head_dim/2) (``meta_to_hf``).
  llama.cpp's converter applies the inverse permutation to Hugging Face q/k weights, so a
  GGUF file holds q/k in Meta's layout again: undoing llama.cpp's reordering
  (``meta_to_hf``) and then HF's (``hf_to_meta``) composes to the identity, which
  tests/test_checkpoint.py checks numerically. GGUF tensors therefore load as they are.
"""

from __future__ import annotations

import math
import re

import torch

from .config import ModelArgs

SOURCES = ("meta", "hf", "gguf")

# Meta name                              Hugging Face name                                GGUF name
TENSOR_NAMES: list[tuple[str, str, str]] = [
    ("tok_embeddings.weight",              "model.embed_tokens.weight",                     "token_embd.weight"),
    ("layers.{i}.attention.wq.weight",     "model.layers.{i}.self_attn.q_proj.weight",      "blk.{i}.attn_q.weight"),
    ("layers.{i}.attention.wk.weight",     "model.layers.{i}.self_attn.k_proj.weight",      "blk.{i}.attn_k.weight"),
    ("layers.{i}.attention.wv.weight",     "model.layers.{i}.self_attn.v_proj.weight",      "blk.{i}.attn_v.weight"),
    ("layers.{i}.attention.wo.weight",     "model.layers.{i}.self_attn.o_proj.weight",      "blk.{i}.attn_output.weight"),
    ("layers.{i}.feed_forward.w1.weight",  "model.layers.{i}.mlp.gate_proj.weight",         "blk.{i}.ffn_gate.weight"),
    ("layers.{i}.feed_forward.w2.weight",  "model.layers.{i}.mlp.down_proj.weight",         "blk.{i}.ffn_down.weight"),
    ("layers.{i}.feed_forward.w3.weight",  "model.layers.{i}.mlp.up_proj.weight",           "blk.{i}.ffn_up.weight"),
    ("layers.{i}.attention_norm.weight",   "model.layers.{i}.input_layernorm.weight",       "blk.{i}.attn_norm.weight"),
    ("layers.{i}.ffn_norm.weight",         "model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    ("norm.weight",                        "model.norm.weight",                             "output_norm.weight"),
    ("output.weight",                      "lm_head.weight",                                "output.weight"),
    # a sequence classifier's head (LlamaForSequenceClassification) in place of output: [num_labels, dim]
    ("score.weight",                       "score.weight",                                  "cls.output.weight"),
]

# Buffers some checkpoints carry that are not weights (recomputed by our decoder).
IGNORED = {
    "meta": re.compile(r"rope\.freqs"),
    "hf": re.compile(r".*rotary_emb\.inv_freq"),
    "gguf": re.compile(r"rope_freqs\.weight"),
}

# Meta's model parallelism: column-parallel layers are split on dim 0 (output features),
# row-parallel layers and the embedding on dim 1; norms (absent here) are replicated.
SHARD_DIM = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w2": 1, "w3": 0, "output": 0, "score": 0}

# The ModelArgs field giving the head count by which q and k are permuted for rotary.
ROPE_HEADS = {"wq": "n_heads", "wk": "n_kv_heads"}


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


_COLUMN = {s: k for k, s in enumerate(SOURCES)}
_PATTERNS = {s: [(_pattern(row[_COLUMN[s]]), row) for row in TENSOR_NAMES] for s in SOURCES}


def to_meta_name(name: str, source: str) -> str | None:
    """Meta's name for a tensor named `name` in `source`; None when it is no Llama weight."""
    for pattern, row in _PATTERNS[source]:
        m = pattern.match(name)
        if m:
            return row[0].replace("{i}", m.group(1)) if m.groups() else row[0]
    return None


def source_name(meta_name: str, source: str) -> str:
    """The name `source` gives Meta's tensor `meta_name`."""
    for pattern, row in _PATTERNS["meta"]:
        m = pattern.match(meta_name)
        if m:
            return row[_COLUMN[source]].replace("{i}", m.group(1)) if m.groups() else row[_COLUMN[source]]
    raise KeyError(meta_name)


def _module(meta_name: str) -> str:
    """'layers.3.attention.wq.weight' -> 'wq'; 'tok_embeddings.weight' -> 'tok_embeddings'."""
    parts = meta_name.split(".")
    return parts[-2] if len(parts) > 1 else parts[0]


def shard_dim(meta_name: str) -> int | None:
    """The dim Meta splits this tensor along across model-parallel shards; None: replicated."""
    return SHARD_DIM.get(_module(meta_name))


def rope_heads(meta_name: str, args: ModelArgs) -> int | None:
    """Head count for the rotary permutation of q/k; None for every other tensor."""
    field = ROPE_HEADS.get(_module(meta_name))
    return getattr(args, field) if field else None


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every weight of the model in Meta names with its shape; no output.weight when tied; a
    classifier's score.weight in place of output.weight."""
    kv_dim = args.n_kv_heads * args.head_dim
    per_layer = {
        "attention.wq.weight": (args.n_heads * args.head_dim, args.dim),
        "attention.wk.weight": (kv_dim, args.dim),
        "attention.wv.weight": (kv_dim, args.dim),
        "attention.wo.weight": (args.dim, args.n_heads * args.head_dim),
        "feed_forward.w1.weight": (args.ffn_hidden_dim, args.dim),
        "feed_forward.w2.weight": (args.dim, args.ffn_hidden_dim),
        "feed_forward.w3.weight": (args.ffn_hidden_dim, args.dim),
        "attention_norm.weight": (args.dim,),
        "ffn_norm.weight": (args.dim,),
    }
    shapes = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        shapes.update({f"layers.{i}.{k}": v for k, v in per_layer.items()})
    shapes["norm.weight"] = (args.dim,)
    if args.is_classifier:
        shapes["score.weight"] = (args.num_labels, args.dim)
    elif not args.tie_embeddings:
        shapes["output.weight"] = (args.vocab_size, args.dim)
    return shapes


def parameter_count(args: ModelArgs) -> int:
    return sum(math.prod(shape) for shape in expected_shapes(args).values())


def meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's permute (convert_llama_weights_to_hf.py): rotary pairs (2i, 2i+1) -> (i, i + hd/2).

    Also llama.cpp's reordering undone (GGUF -> HF): the same formula.
    """
    rows, cols = w.shape  # (n_heads * head_dim, dim)
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``meta_to_hf`` (and llama.cpp's own permute of HF q/k weights)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)
