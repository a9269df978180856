"""models/checkpoint.py (+ checkpoint_layout, writers): every format loads to the same weights and logits.

Tiny seeded random models are written in each format by models/writers.py and loaded back;
bad inputs each give one helpful line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from llama2_onnx.models import writers
from llama2_onnx.models.checkpoint import load
from llama2_onnx.models.checkpoint_layout import hf_to_meta, meta_to_hf, source_name
from llama2_onnx.models.config import ModelArgs
from llama2_onnx.models.llama import Transformer

TINY = dict(dim=64, n_layers=2, n_heads=4, vocab_size=128, ffn_hidden_dim=96, rope_theta=50000.0, max_seq_len=256)
ARGS = {
    "gqa": ModelArgs(**TINY, n_kv_heads=2),
    "mha": ModelArgs(**TINY, n_kv_heads=4),
}

# name: (write(state_dict, args, tmp) -> path to load, GGUF type of the matrices or None: lossless)
FORMATS = {
    "meta-mp1": (lambda sd, a, d: writers.write_meta(sd, a, d / "meta", n_shards=1), None),
    "meta-mp2": (lambda sd, a, d: writers.write_meta(sd, a, d / "meta", n_shards=2), None),
    "hf-safetensors": (lambda sd, a, d: writers.write_hf(sd, a, d / "hf"), None),
    "hf-sharded": (lambda sd, a, d: writers.write_hf(sd, a, d / "hf", max_shard_bytes=40_000), None),
    "hf-bin": (lambda sd, a, d: writers.write_hf(sd, a, d / "hf", safetensors=False), None),
    "gguf-f32": (lambda sd, a, d: writers.write_gguf(sd, a, d / "m.gguf", "F32"), None),
    **{f"gguf-{q.lower()}": ((lambda q: lambda sd, a, d: writers.write_gguf(sd, a, d / "m.gguf", q))(q), q)
       for q in ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1")},
}
# Largest weight error of each lossy type as a fraction of the tensor's absmax (about twice half a step).
STEP = {"F16": 1 / 1000, "BF16": 1 / 128, "Q8_0": 1 / 127, "Q4_0": 1 / 8, "Q4_1": 1 / 8}
ARG_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim", "norm_eps", "rope_theta",
              "tie_embeddings")
PROMPT = torch.tensor([[1, 17, 99, 3, 64, 127, 5, 42]])


def build(args: ModelArgs, state_dict: dict[str, torch.Tensor]) -> Transformer:
    model = Transformer(args)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected and set(missing) <= ({"output.weight"} if args.tie_embeddings else set())
    return model.eval()


@torch.no_grad()
def logits_of(model: Transformer) -> torch.Tensor:
    n = PROMPT.shape[1]
    return model(PROMPT, torch.ones(1, n, dtype=torch.long), torch.arange(n)[None], model.empty_cache(1))[0]


def gguf_roundtrip(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """What a GGUF of this type holds for w, dequantized by gguf-py (norms are always F32)."""
    if w.dim() == 1:
        return w
    t = GGMLQuantizationType[qtype]
    return torch.from_numpy(dequantize(quantize(w.numpy(), t), t).astype(np.float32))


@pytest.mark.parametrize("attn", ARGS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_loads_the_same_model(fmt, attn, tmp_path):
    args = ARGS[attn]
    sd = writers.random_state_dict(args, seed=0)
    write, qtype = FORMATS[fmt]
    ckpt = load(write(sd, args, tmp_path))

    assert ckpt.source == fmt.split("-")[0]
    # GGUF stores norm_eps and rope_theta as float32
    assert {f: getattr(ckpt.args, f) for f in ARG_FIELDS} == pytest.approx({f: getattr(args, f) for f in ARG_FIELDS})
    assert ckpt.state_dict.keys() == sd.keys()
    # Lossless formats give the weights back; lossy ones exactly what gguf-py dequantizes,
    # which is within the type's step of the original.
    expected = {k: gguf_roundtrip(w, qtype) for k, w in sd.items()} if qtype else sd
    for name, w in sd.items():
        got = ckpt.state_dict[name].float()
        assert torch.equal(got, expected[name]), name
        if qtype:
            assert (got - w).abs().max() <= w.abs().max() * STEP[qtype], name

    ref, ours = logits_of(build(args, expected)), logits_of(build(ckpt.args, ckpt.state_dict))
    assert ref.std() > 0.5  # non-degenerate
    assert (ours - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("fmt", ["hf-safetensors", "gguf-f32", "gguf-q8_0"])
def test_tied_embeddings(fmt, tmp_path):
    args = ModelArgs(**TINY, n_kv_heads=2, tie_embeddings=True)
    sd = writers.random_state_dict(args, seed=1)
    write, qtype = FORMATS[fmt]
    ckpt = load(write(sd, args, tmp_path))
    assert ckpt.args.tie_embeddings and "output.weight" not in ckpt.state_dict
    expected = {k: gguf_roundtrip(w, qtype) for k, w in sd.items()} if qtype else sd
    ref, ours = logits_of(build(args, expected)), logits_of(build(ckpt.args, ckpt.state_dict))
    assert (ours - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_more_gguf_types_load_as_gguf_py_dequantizes_them(qtype, tmp_path):
    """Types gguf-py cannot quantize: random blocks must come back as gguf-py dequantizes them."""
    args = ModelArgs(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32, ffn_hidden_dim=256)
    src = writers.write_gguf(writers.random_state_dict(args, 0), args, tmp_path / "f32.gguf")
    t = GGMLQuantizationType[qtype]
    block, size = GGML_QUANT_SIZES[t]
    rng = np.random.default_rng(0)
    raw = {}
    for r in GGUFReader(str(src)).tensors:
        if len(r.shape) == 2:
            rows, cols = int(r.shape[1]), int(r.shape[0])
            # bit 6 clear in every byte: any fp16 scale in the block is finite (exponent <= 15)
            raw[r.name] = (rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8) & 0xBF, t)
    ckpt = load(_rewrite_gguf(src, tmp_path / "m.gguf", replace=raw))
    for name, w in ckpt.state_dict.items():
        gguf_name = source_name(name, "gguf")
        if gguf_name in raw:
            expected = dequantize(raw[gguf_name][0], t)
            assert np.isfinite(expected).all() and expected.std() > 0
            np.testing.assert_array_equal(w.numpy(), expected)


def test_rope_layouts_compose_to_identity():
    """GGUF holds q/k in Meta's layout: undoing llama.cpp's reordering then HF's permute is the identity."""
    n, head_dim, cols = 3, 8, 5
    w = np.random.default_rng(0).standard_normal((n * head_dim, cols)).astype(np.float32)
    rows = w.shape[0]
    # DESIGN.md's formula for undoing llama.cpp's reordering (GGUF -> HF layout)
    hf = w.reshape(n, rows // n // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
    assert np.array_equal(hf, meta_to_hf(torch.from_numpy(w), n).numpy())
    assert torch.equal(hf_to_meta(torch.from_numpy(hf), n), torch.from_numpy(w))
    assert not np.array_equal(hf, w)  # the permutation itself is not trivial


def test_meta_shards_are_split_like_meta(tmp_path):
    args = ARGS["gqa"]
    folder = writers.write_meta(writers.random_state_dict(args, 0), args, tmp_path, n_shards=2)
    shard = torch.load(folder / "consolidated.01.pth", weights_only=True)
    assert shard["layers.0.attention.wq.weight"].shape == (32, 64)  # column-parallel: dim 0
    assert shard["layers.0.attention.wk.weight"].shape == (16, 64)
    assert shard["layers.0.feed_forward.w2.weight"].shape == (64, 48)  # row-parallel: dim 1
    assert shard["tok_embeddings.weight"].shape == (128, 32)
    assert shard["norm.weight"].shape == (64,)  # replicated
    assert json.loads((folder / "params.json").read_text())["vocab_size"] == -1


def test_paths_inside_a_checkpoint_and_tokenizer_files(tmp_path):
    args = ARGS["gqa"]
    sd = writers.random_state_dict(args, 0)
    meta = writers.write_meta(sd, args, tmp_path / "llama-2-7b-chat")
    (tmp_path / "tokenizer.model").write_bytes(b"spm")  # Meta's release keeps it in the parent folder
    hf = writers.write_hf(sd, args, tmp_path / "hf")
    (hf / "tokenizer.json").write_text("{}")
    gguf_dir = tmp_path / "g"
    writers.write_gguf(sd, args, gguf_dir / "m.gguf")

    ckpt = load(meta / "params.json")
    assert ckpt.source == "meta" and ckpt.path == meta
    assert ckpt.tokenizer_files == [tmp_path / "tokenizer.model"] and ckpt.chat_format == "llama2"
    ckpt = load(hf / "model.safetensors")
    assert ckpt.source == "hf" and ckpt.tokenizer_files == [hf / "tokenizer.json"] and ckpt.chat_format is None
    ckpt = load(gguf_dir)  # a folder with one .gguf
    assert ckpt.path == gguf_dir / "m.gguf" and ckpt.tokenizer_files == []
    assert ckpt.gguf_vocab["tokenizer.ggml.model"] == "llama" and len(ckpt.gguf_vocab["tokenizer.ggml.tokens"]) == 128


@pytest.mark.parametrize("template, expected", [
    ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}", "chatml"),
    ("{{ bos_token }}[INST] {{ messages[0].content }} [/INST]", "llama2"),
    (None, None),
])
def test_gguf_chat_format(template, expected, tmp_path):
    args = ARGS["gqa"]
    vocab = writers.minimal_vocab(args)
    if template:
        vocab["tokenizer.chat_template"] = template
    path = writers.write_gguf(writers.random_state_dict(args, 0), args, tmp_path / "m.gguf", vocab=vocab)
    assert load(path).chat_format == expected


def _rewrite_gguf(src, dst, drop=(), replace=None):
    """A copy of GGUF src with tensors dropped or replaced by (array, raw type); metadata kept."""
    reader = GGUFReader(str(src))
    w = GGUFWriter(str(dst), "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # written by GGUFWriter itself
        writers.add_gguf_value(w, key, field.contents())
    for t in reader.tensors:
        if t.name in drop:
            continue
        arr, raw = (replace or {}).get(t.name, (np.array(t.data), None))
        w.add_tensor(t.name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
