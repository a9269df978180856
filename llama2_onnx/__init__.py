"""llama2-onnx: export Llama 2 checkpoints to ONNX and run chat on ONNX Runtime.

The parts live in sub-packages: ``llama2_onnx.models`` (config, PyTorch decoder,
checkpoint loaders), ``llama2_onnx.export`` (ONNX export), ``llama2_onnx.runtime``
(ONNX Runtime inference, never imports torch) and ``llama2_onnx.benchmarks``.
"""

__version__ = "0.1.0"
