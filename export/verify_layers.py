"""Check an assembled graph one layer at a time: for models too large to hold twice in memory.

For each layer i a one-layer graph (export/graph.py with whole=False: input `hidden`, output
`hidden_out`) is written from the checkpoint's tensors in the folder's graph kind and
precision, run by ONNX Runtime on seeded random hidden states (TOKENS tokens, positions 0..,
empty cache), then freed; PyTorch computes the same block (models/llama.py's modules) in float32,
one sub-module's weights at a time. Memory: one layer's weights, whatever the depth.

The embedding (a Gather) and the head (one MatMul) are not re-run here: the wiring around the
layers is the same code the full-model check covers on models that fit (tests/test_streaming.py).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch

from llama2_onnx.models.checkpoint_layout import parameter_count
from llama2_onnx.models.config import ModelArgs
from llama2_onnx.models.llama import Attention, FeedForward, RMSNorm, attention_bias, rotary_cos_sin
from llama2_onnx.runtime import contract
from llama2_onnx.runtime.folder import FolderConfig
from llama2_onnx.runtime.providers import available_memory

from .graph import HIDDEN, HIDDEN_OUT, write_graph
from .precision import Int4Options, quantize_int4
from .verify import FP32_TOLERANCE, VerificationError

TOKENS = 8


def fits_in_memory(args: ModelArgs, folder: Path) -> bool:
    """Whether the full-model check fits: PyTorch float32 weights plus the ONNX Runtime session."""
    onnx_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    free = available_memory() or 0
    return 4 * parameter_count(args) + 2 * onnx_bytes + (1 << 30) < 0.8 * free


def _onnx_layer(source, cfg: FolderConfig, i: int, hidden: np.ndarray) -> list[np.ndarray]:
    a = dataclasses.replace(cfg.model, n_layers=1)
    read = lambda name: source.read(name.replace("layers.0.", f"layers.{i}.", 1))
    int4 = Int4Options.from_dict(cfg.quantization) if cfg.precision == "int4" else None
    hqq = int4 is not None and int4.algorithm == "hqq"
    quant = int4.quant(cfg.model.n_layers).for_layer(i) if int4 and not hqq else None
    with tempfile.TemporaryDirectory(prefix="llama2-onnx-layer-") as tmp:
        write_graph(a, read, Path(tmp), graph=cfg.graph, precision="fp32" if hqq else cfg.precision, quant=quant, whole=False)
        if hqq:
            quantize_int4(Path(tmp), int4)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(Path(tmp) / contract.MODEL_FILE), opts, providers=["CPUExecutionProvider"])
        kv_dtype = np.dtype(cfg.kv_dtype)
        empty = np.zeros((1, a.n_kv_heads, 0, a.head_dim), kv_dtype)
        feeds = {HIDDEN: hidden.astype(kv_dtype), contract.ATTENTION_MASK: np.ones((1, TOKENS), np.int64),
                 contract.PAST_KEY % 0: empty, contract.PAST_VALUE % 0: empty}
        if cfg.graph == contract.GRAPH_PORTABLE:
            feeds[contract.POSITION_IDS] = np.arange(TOKENS, dtype=np.int64)[None]
        out = session.run([HIDDEN_OUT, contract.PRESENT_KEY % 0, contract.PRESENT_VALUE % 0], feeds)
        del session
    return [o.astype(np.float32) for o in out]


@torch.no_grad()
def _torch_layer(source, a: ModelArgs, i: int, hidden: np.ndarray) -> list[np.ndarray]:
    """models/llama.TransformerBlock's forward, one sub-module's float32 weights in memory at a time."""
    def load(module: torch.nn.Module, prefix: str) -> torch.nn.Module:
        names = module.state_dict().keys()
        module.load_state_dict({n: source.read(f"layers.{i}.{prefix}.{n}").float() for n in names}, assign=True)
        return module

    with torch.device("meta"):
        parts = {"attention_norm": RMSNorm(a.dim, a.norm_eps), "attention": Attention(a),
                 "ffn_norm": RMSNorm(a.dim, a.norm_eps), "feed_forward": FeedForward(a.dim, a.ffn_hidden_dim)}
    x = torch.from_numpy(hidden)
    cos, sin = rotary_cos_sin(torch.arange(TOKENS)[None], a.head_dim, a.rope_theta)
    mask = attention_bias(torch.ones(1, TOKENS, dtype=torch.long), TOKENS)
    empty = torch.zeros(1, a.n_kv_heads, 0, a.head_dim)
    normed = load(parts.pop("attention_norm"), "attention_norm")(x)
    attn, (k, v) = load(parts.pop("attention"), "attention")(normed, cos, sin, mask, (empty, empty))
    h = x + attn
    h = h + load(parts.pop("feed_forward"), "feed_forward")(load(parts.pop("ffn_norm"), "ffn_norm")(h))
    return [h.numpy(), k.numpy(), v.numpy()]


def verify_layers(source, cfg: FolderConfig, on_layer: Callable[[int], None] | None = None) -> dict:
    """Compare every layer of the folder's graph kind and precision with PyTorch; raise for a bad fp32 one."""
    a = cfg.model
    rng = np.random.default_rng(0)
    worst, worst_layer = 0.0, 0
    for i in range(a.n_layers):
        hidden = rng.standard_normal((1, TOKENS, a.dim), dtype=np.float32)
        got = _onnx_layer(source, cfg, i, hidden)
        ref = _torch_layer(source, a, i, hidden)
        diff = max(float(np.abs(g - r).max()) for g, r in zip(got, ref))
        if diff > worst or i == 0:
            worst, worst_layer = diff, i
        if cfg.precision == "fp32" and not diff <= FP32_TOLERANCE:
            raise VerificationError(f"verification failed: layer {i} differs from PyTorch by {diff:.3g} "
                                    f"(more than {FP32_TOLERANCE:g}) in an fp32 export; please report this with the checkpoint's config")
        if on_layer is not None:
            on_layer(i)
    return {"mode": "layers", "layers": a.n_layers, "tokens": TOKENS, "max_abs_diff": worst, "worst_layer": worst_layer,
            "reference": "pytorch float32, one layer at a time"}
