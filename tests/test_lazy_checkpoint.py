"""models/checkpoint.py's open_checkpoint and models/tensor_files.py: one tensor at a time, in bounded memory.

Each format is written by the libraries' own writers (models/writers.py: safetensors,
torch.save, gguf-py) and read back tensor by tensor; the reference is what was written.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from llama2_onnx.benchmarks import make_checkpoint
from llama2_onnx.models import checkpoint, tensor_files, writers
from llama2_onnx.models.checkpoint import CheckpointError, open_checkpoint
from llama2_onnx.models.checkpoint_layout import expected_shapes
from llama2_onnx.models.config import ModelArgs

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, ffn_hidden_dim=96)


def _gguf_expected(qtype: str):
    """What a GGUF of matrices in qtype holds for w, as gguf-py gives it back (norms are F32)."""
    def expect(w: torch.Tensor) -> torch.Tensor:
        if w.dim() == 1 or qtype == "F32":
            return w
        if qtype == "F16":
            return torch.from_numpy(w.numpy().astype(np.float16))
        t = GGMLQuantizationType[qtype]
        return torch.from_numpy(dequantize(quantize(w.numpy(), t), t))
    return expect


# name: (stored dtype, write(state_dict, args, tmp) -> path, expected(w) -> the tensor read gives)
CASES = {
    "meta-mp1-fp16": (torch.float16, lambda sd, a, d: writers.write_meta(sd, a, d, n_shards=1), None),
    "meta-mp2-bf16": (torch.bfloat16, lambda sd, a, d: writers.write_meta(sd, a, d, n_shards=2), None),
    "meta-mp2-fp32": (torch.float32, lambda sd, a, d: writers.write_meta(sd, a, d, n_shards=2), None),
    "hf-safetensors-bf16": (torch.bfloat16, lambda sd, a, d: writers.write_hf(sd, a, d), None),
    "hf-safetensors-fp32": (torch.float32, lambda sd, a, d: writers.write_hf(sd, a, d), None),
    "hf-sharded-fp16": (torch.float16, lambda sd, a, d: writers.write_hf(sd, a, d, max_shard_bytes=20_000), None),
    "hf-bin-fp16": (torch.float16, lambda sd, a, d: writers.write_hf(sd, a, d, safetensors=False), None),
    **{f"gguf-{q.lower()}": (torch.float32, (lambda q: lambda sd, a, d: writers.write_gguf(sd, a, d / "m.gguf", q))(q),
                             _gguf_expected(q)) for q in ("F32", "F16", "Q8_0")},
}


@pytest.mark.parametrize("case", CASES)
def test_read_gives_back_what_was_written(case, tmp_path):
    dtype, write, expect = CASES[case]
    sd = writers.random_state_dict(ARGS, seed=0, dtype=dtype)
    with open_checkpoint(write(sd, ARGS, tmp_path)) as src:
        assert src.names == list(expected_shapes(ARGS))
        for name in src.names:
            got, want = src.read(name), (expect(sd[name]) if expect else sd[name])
            assert got.dtype == want.dtype == src.dtype(name), name
            assert tuple(got.shape) == src.shape(name) and torch.equal(got, want), name


def test_open_reads_no_tensor_data(tmp_path, monkeypatch):
    folder = writers.write_meta(writers.random_state_dict(ARGS, 0), ARGS, tmp_path, n_shards=2)

    def refuse(ref):
        raise AssertionError("open read tensor data")

    monkeypatch.setattr(tensor_files, "read", refuse)
    src = open_checkpoint(folder)
    assert src.shape("layers.0.feed_forward.w2.weight") == (64, 96) and src.dtype("norm.weight") == torch.float32


def test_data_cut_short_after_open_fails_at_read(tmp_path):
    folder = writers.write_hf(writers.random_state_dict(ARGS, 0), ARGS, tmp_path)
    src = open_checkpoint(folder)
    src.read("output.weight")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt, download it again"):
        for name in src.names:
            src.read(name)


def test_torch_files_with_views_shared_storage_and_the_legacy_format(tmp_path):
    """A .bin whose q/k/v are slices of one fused storage and whose matrices are transposed views."""
    sd = writers.random_state_dict(ARGS, 0)
    folder = writers.write_hf(sd, ARGS, tmp_path / "hf", safetensors=False)
    hf = torch.load(folder / "pytorch_model.bin", weights_only=True)
    for i in range(ARGS.n_layers):
        names = [f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkv"]
        fused = torch.cat([hf[n] for n in names])
        for n, part in zip(names, fused.split([hf[n].shape[0] for n in names])):
            hf[n] = part  # a view at an offset into the fused storage
        down = f"model.layers.{i}.mlp.down_proj.weight"
        hf[down] = hf[down].t().contiguous().t()  # strides (1, rows)
    torch.save(hf, folder / "pytorch_model.bin")
    legacy = writers.write_meta(sd, ARGS, tmp_path / "meta")
    shard = torch.load(legacy / "consolidated.00.pth", weights_only=True)
    torch.save(shard, legacy / "consolidated.00.pth", _use_new_zipfile_serialization=False)

    for path in (folder, legacy):
        with open_checkpoint(path) as src:
            assert all(torch.equal(src.read(n), sd[n]) for n in src.names), path


def test_written_files_read_back_by_their_libraries(tmp_path):
    """tensor_files' streaming writers against safetensors and torch.load (mmap too)."""
    from safetensors.torch import load_file

    specs = {"a": ((300, 7), torch.bfloat16), "b": ((5,), torch.float16), "c": ((64, 33), torch.float32)}
    tensors = {n: torch.randn(shape).to(dtype) for n, (shape, dtype) in specs.items()}
    tensor_files.write_safetensors(tmp_path / "w.safetensors", specs, tensors.__getitem__, {"format": "pt"})
    tensor_files.write_torch_zip(tmp_path / "w.pth", specs, tensors.__getitem__)
    for loaded in (load_file(tmp_path / "w.safetensors"), torch.load(tmp_path / "w.pth", weights_only=True),
                   torch.load(tmp_path / "w.pth", weights_only=True, mmap=True)):
        assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[n], t) for n, t in tensors.items())
    refs = tensor_files.open_torch(tmp_path / "w.pth")
    assert all(r.offset % tensor_files.ALIGN == 0 for r in refs.values())


# ---- memory ------------------------------------------------------------------------------

WIDE = dict(dim=512, n_heads=8, vocab_size=1000, ffn_hidden_dim=1408)  # a layer: 3.2M parameters
LAYER_BYTES = 4 * (4 * 512 * 512 + 3 * 512 * 1408)  # float32
# One process reads each checkpoint in turn, every tensor one at a time, and prints its peak
# resident memory (VmHWM, which counts touched pages of mapped files too), reset between them.
READ_ALL = """
import sys
from llama2_onnx.models.checkpoint import open_checkpoint

for path in sys.argv[1:]:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := the current resident size
    with open_checkpoint(path) as src:
        for name in src.names:
            t = src.read(name)
            del t
    print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def _peaks_while_reading(paths: list[Path]) -> list[int]:
    done = subprocess.run([sys.executable, "-c", READ_ALL, *map(str, paths)], capture_output=True, text=True)
    if "clear_refs" in done.stderr:
        pytest.skip("cannot reset VmHWM here")
    assert done.returncode == 0, done.stderr
    return [int(line) for line in done.stdout.split()]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="VmHWM is Linux's")
def test_reading_every_tensor_needs_memory_for_about_one(tmp_path):
    """2 and 12 layers of the same width: the deeper checkpoint must not need more memory to read."""
    big = ModelArgs(**WIDE, n_layers=12)
    sd = writers.random_state_dict(big, 0)
    paths = []
    for fmt in ("hf-safetensors-fp32", "meta-mp2-fp32", "gguf-q8_0"):
        for args in (ModelArgs(**WIDE, n_layers=2), big):
            paths.append(CASES[fmt][1](sd, args, tmp_path / f"{fmt}-{args.n_layers}"))
    peaks = _peaks_while_reading(paths)
    for k, fmt in enumerate(("hf-safetensors-fp32", "meta-mp2-fp32", "gguf-q8_0")):
        two, twelve = peaks[2 * k: 2 * k + 2]
        print(f"{fmt}: peak RSS {two / 2**20:.1f} MiB (2 layers), {twelve / 2**20:.1f} MiB (12 layers)")
        assert twelve - two < 2 * LAYER_BYTES, (fmt, two, twelve)  # holding it all would add 10 layers


# ---- make_checkpoint's big random checkpoints ------------------------------------------

@pytest.mark.parametrize("fmt, dtype, shards", [("meta", "bf16", 2), ("hf", "fp32", None)])
def test_make_checkpoint_streams_a_loadable_checkpoint(fmt, dtype, shards, tmp_path):
    argv = [str(tmp_path), "--size", "tiny", "--layers", "3", "--format", fmt, "--dtype", dtype, "--no-tokenizer"]
    assert make_checkpoint.main(argv + (["--shards", str(shards)] if shards else [])) == 0
    ckpt = checkpoint.load(tmp_path)
    assert ckpt.source == fmt and ckpt.args.n_layers == 3
    w = ckpt.state_dict["layers.2.feed_forward.w2.weight"].float()
    assert 0.5 < w.std() * 96 ** 0.5 < 2 and abs(ckpt.state_dict["norm.weight"].float().mean() - 1) < 0.05
    assert not torch.equal(ckpt.state_dict["layers.0.attention.wq.weight"], ckpt.state_dict["layers.1.attention.wq.weight"])
    if shards:
        parts = [torch.load(tmp_path / f"consolidated.{k:02d}.pth", weights_only=True) for k in range(shards)]
        assert torch.equal(parts[0]["norm.weight"], parts[1]["norm.weight"])  # replicated, as in Meta's files


def test_llama2_sizes():
    for size, billions in {"7b": 6.74, "13b": 13.0, "70b": 69.0}.items():
        assert abs(make_checkpoint.parameter_count(make_checkpoint.SIZES[size]) / 1e9 - billions) < 0.1, size
    assert make_checkpoint.SIZES["70b"]["n_kv_heads"] == 8 and ModelArgs(**make_checkpoint.SIZES["70b"]).ffn_hidden_dim == 28672
