"""Trace our PyTorch decoder to ONNX (torch.onnx.export, dynamo) with the portable I/O contract.

Input:  a models.llama.Transformer in the target dtype (float32 or float16).
Output: OUT_DIR/model.onnx + OUT_DIR/model.onnx.data (every weight as external data).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch

from llama2_onnx.models.llama import Transformer
from llama2_onnx.runtime import contract

DEFAULT_OPSET = 23
MIN_OPSET = 18


class _Flat(torch.nn.Module):
    """Flat tensors in and out, in the order of the contract's names."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past: list[torch.Tensor]):
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, presents = self.model(input_ids, attention_mask, position_ids, pairs)
        return logits, [t for kv in presents for t in kv]


def _sample_inputs(model: Transformer, dtype: torch.dtype):
    # Sizes >= 2 everywhere, so torch.export keeps each dynamic dim symbolic
    # (it specialises sizes 0 and 1); the graph still runs with past length 0.
    a = model.args
    batch, seq, past = 2, 3, 4
    ids = torch.randint(0, a.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq)[None].expand(batch, seq).contiguous()
    kv = [torch.zeros(batch, a.n_kv_heads, past, a.head_dim, dtype=dtype) for _ in range(2 * a.n_layers)]
    return ids, mask, pos, kv


def _dynamic_shapes(n_layers: int):
    from torch.export import Dim

    batch, seq = Dim(contract.BATCH), Dim(contract.SEQ)
    past, total = Dim(contract.PAST), Dim(contract.TOTAL)
    return {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past": [{0: batch, 2: past} for _ in range(2 * n_layers)],
    }


def trace(model: Transformer, out_dir: Path, *, opset: int = DEFAULT_OPSET) -> Path:
    """Export model (already in its target dtype) to out_dir/model.onnx; returns that path."""
    if not MIN_OPSET <= opset <= DEFAULT_OPSET:
        raise ValueError(f"opset must be between {MIN_OPSET} and {DEFAULT_OPSET}, got {opset}")
    dtype = model.tok_embeddings.weight.dtype
    n_layers = model.args.n_layers
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(
            _Flat(model.eval()), _sample_inputs(model, dtype), dynamo=True, opset_version=opset,
            input_names=contract.input_names(n_layers), output_names=contract.output_names(n_layers),
            dynamic_shapes=_dynamic_shapes(n_layers), optimize=True, verify=False, report=False,
        )
    path = out_dir / contract.MODEL_FILE
    # ONNXProgram.save streams the weights into model.onnx.data; only the small graph
    # file is then reloaded (without its data) to be tidied.
    program.save(str(path), external_data=True)
    del program
    proto = onnx.load_model(str(path), load_external_data=False)
    _tidy(proto)
    onnx.save_model(proto, str(path))
    return path


def _tidy(proto: onnx.ModelProto) -> None:
    """Name the present length as the contract does and drop per-node tracing metadata
    (stack traces with local paths: bulk without use)."""
    for value in proto.graph.output:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param and contract.PAST in dim.dim_param and contract.SEQ in dim.dim_param:
                dim.dim_param = contract.TOTAL
    for node in proto.graph.node:
        del node.metadata_props[:]
    del proto.metadata_props[:]
    proto.producer_name = "llama2-onnx"


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints its progress and warns about optional packages: keep our output clean."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
