"""Weight-only int4: every MatMul with a constant weight becomes a com.microsoft MatMulNBits.

Measured on SmolLM2-135M-Instruct (its GGUF is itself Q4_1) over the 315-token
verification passage, fp32 perplexity 28.85, one decode step at past length 128, 2 threads:

    algorithm                          perplexity   decode step
    fp32 (no int4)                     28.85        27 ms
    rtn asymmetric, block 32, acc 4    35.1         36 ms    <- default: the fast kernel
    rtn symmetric, block 32, acc 0     35.1         52 ms
    k-quant, block 32                  35.0         39 ms
    hqq, block 32                      28.83        440 ms   (float zero points: slow kernel)
    8-bit rtn, block 32                28.5         47 ms

Re-quantizing an already 4-bit grid with integer zero points shifts each block; HQQ's
fitted float zero points recover the grid but ONNX Runtime 1.32 has no fast CPU kernel for
them. On this small model the portable graph's per-node overhead, not weight bytes, sets
the pace: int4 pays off with the fused graph and larger models.

The output head stays float32 (tied to the embedding when the checkpoint ties them): an
int4 head cost SmolLM2 most of its greedy agreement. Norms, rotary, attention math and the
KV cache stay float32.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx

from llama2_onnx.errors import UserError
from llama2_onnx.runtime import contract

BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
ALGORITHMS = ("hqq", "mse", "rtn")
RECIPES = ("quality", "speed")


@dataclass(frozen=True)
class Int4Options:
    block_size: int = 32  # weights per scale
    accuracy_level: int = 4  # 4: int8 activations, the VNNI/AMX path on x86 CPUs
    algorithm: str = "rtn"  # rtn (round to nearest, asymmetric), mse (searched scales) or hqq (float zero points)
    # quality: 8 bits for the head, every w2 and the first and last layers; speed: 4 bits everywhere
    recipe: str = "quality"

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise UserError(f"--int4-algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if self.block_size not in BLOCK_SIZES:
            raise UserError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block_size}")
        if self.recipe not in RECIPES:
            raise UserError(f"--int4-recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise UserError(f"--accuracy-level must be 0-4, got {self.accuracy_level}")

    def to_dict(self, n_layers: int) -> dict:
        """What config.json records under "quantization" (from_dict reads the options back)."""
        d = {"bits": 4, "block_size": self.block_size, "accuracy_level": self.accuracy_level,
             "algorithm": self.algorithm, "recipe": self.recipe, "op": "MatMulNBits", "head": "float32",
             "embedding": "float32"}
        if self.algorithm != "hqq":
            q = self.quant(n_layers)
            d.update(head=f"{q.head_bits}-bit MatMulNBits", wide_bits=q.wide_bits, wide_block_size=q.wide_block_size,
                     wide_weights=list(q.wide_weights), wide_layers=list(q.wide_layers))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Int4Options":
        return cls(d["block_size"], d["accuracy_level"], d["algorithm"], d.get("recipe", "quality"))

    def quant(self, n_layers: int):
        """The assembled graph's recipe (export/graph.py Quant): not for hqq, which rewrites a float32 graph."""
        from .graph import Quant

        common = dict(block_size=self.block_size, accuracy_level=self.accuracy_level, search=self.algorithm == "mse")
        if self.recipe == "speed":
            return Quant(**common, head_bits=4, wide_weights=())
        return Quant(**common, wide_layers=(0, n_layers - 1))


def _head_matmul(graph: onnx.GraphProto) -> str:
    """The name of the MatMul that makes the logits (through any Identity or Cast after it)."""
    producer = {out: n for n in graph.node for out in n.output}
    node = producer[contract.LOGITS]
    while node.op_type in ("Identity", "Cast"):
        node = producer[node.input[0]]
    return node.name


def quantize_int4(folder: Path, options: Int4Options) -> int:
    """Rewrite folder/model.onnx (+ data) in place with int4 weights; returns MatMuls quantized."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    logging.getLogger(mq.__name__).setLevel(logging.WARNING)  # it logs every node at INFO

    path, data = folder / contract.MODEL_FILE, folder / contract.DATA_FILE
    model = onnx.load_model(str(path), load_external_data=True)
    algo = mq.HQQWeightOnlyQuantConfig(block_size=options.block_size, bits=4) if options.algorithm == "hqq" else None
    head = [_head_matmul(model.graph)]
    quantizer = mq.MatMulNBitsQuantizer(model, bits=4, block_size=options.block_size, nodes_to_exclude=head,
                                        is_symmetric=False,
                                        accuracy_level=options.accuracy_level, algo_config=algo)
    with warnings.catch_warnings():  # the quantizer's own torch warnings are not the user's business
        warnings.simplefilter("ignore")
        quantizer.process()
    quantized = quantizer.model.model
    count = sum(n.op_type == "MatMulNBits" for n in quantized.graph.node)
    del model
    data.unlink()
    onnx.save_model(quantized, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=contract.DATA_FILE, size_threshold=1024)
    return count
