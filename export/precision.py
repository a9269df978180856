"""Weight-only int4: every MatMul with a constant weight becomes a com.microsoft MatMulNBits.

The default algorithm is HQQ (half-quadratic: scales and zero points fitted to each block
rather than read off its min and max). Measured on SmolLM2-135M-Instruct, whose GGUF is
itself Q4_1, over the 315-token verification passage: fp32 perplexity 28.85; HQQ block 32
28.83; round-to-nearest (symmetric or not, block 16 or 32) 34.8-36.8. Round-to-nearest
re-quantizes an already 4-bit grid with the wrong offsets; HQQ recovers the grid.

The output head is quantized too (on a CPU it is the largest single read per token:
vocab x dim); a tied embedding is untied first so that the head is a constant MatMul
weight while the embedding table stays float32 for the Gather (one row read per token).
Norms, rotary and attention math stay float32.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx

from llama2_onnx.errors import UserError
from llama2_onnx.runtime import contract

BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
ALGORITHMS = ("hqq", "rtn")


@dataclass(frozen=True)
class Int4Options:
    block_size: int = 32  # weights per scale
    accuracy_level: int = 4  # 4: int8 activations, the VNNI/AMX path on x86 CPUs
    algorithm: str = "hqq"  # hqq (asymmetric, fitted) or rtn (round to nearest, symmetric)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise UserError(f"--int4-algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if self.block_size not in BLOCK_SIZES:
            raise UserError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block_size}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise UserError(f"--accuracy-level must be 0-4, got {self.accuracy_level}")

    def to_dict(self) -> dict:
        return {"bits": 4, "block_size": self.block_size, "accuracy_level": self.accuracy_level,
                "algorithm": self.algorithm, "op": "MatMulNBits", "head": "int4", "embedding": "float32"}


def quantize_int4(folder: Path, options: Int4Options) -> int:
    """Rewrite folder/model.onnx (+ data) in place with int4 weights; returns MatMuls quantized."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mq

    path, data = folder / contract.MODEL_FILE, folder / contract.DATA_FILE
    model = onnx.load_model(str(path), load_external_data=True)
    algo = mq.HQQWeightOnlyQuantConfig(block_size=options.block_size, bits=4) if options.algorithm == "hqq" else None
    quantizer = mq.MatMulNBitsQuantizer(model, bits=4, block_size=options.block_size,
                                        is_symmetric=options.algorithm == "rtn",
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
