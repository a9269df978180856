"""llama2-onnx: export Llama 2 checkpoints to ONNX and run chat on ONNX Runtime.

The parts live in sub-packages: ``llama2_onnx.models`` (config, PyTorch decoder,
checkpoint loaders), ``llama2_onnx.export`` (ONNX export), ``llama2_onnx.runtime``
(ONNX Runtime inference, never imports torch) and ``llama2_onnx.benchmarks``.

``from llama2_onnx import pipeline`` is the Hugging Face one-liner (llama2_onnx/entry.py over
runtime/pipeline.py; the default model without model=); ``from llama2_onnx import AutoTokenizer,
AutoModelForCausalLM, AutoModelForSequenceClassification`` are transformers' Auto classes over a
model folder (runtime/hf_auto.py, without torch). Each is imported on first use so that
``import llama2_onnx`` stays light.
"""

__version__ = "0.1.0"

HF_AUTO = ("AutoTokenizer", "AutoModelForCausalLM", "AutoModelForSequenceClassification")


def __getattr__(name: str):
    if name == "pipeline":
        from llama2_onnx.entry import pipeline

        return pipeline
    if name in HF_AUTO:
        from llama2_onnx.runtime import hf_auto

        return getattr(hf_auto, name)
    raise AttributeError(f"module 'llama2_onnx' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "pipeline", *HF_AUTO])
