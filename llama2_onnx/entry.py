"""The top-level convenience entry points: what `from llama2_onnx import ...` gives, where the default
model (llama2_onnx.assets, which exports it on first use) is resolved. The runtime below never
resolves it: it opens the folders it is given and never reaches the exporter."""

from __future__ import annotations

from pathlib import Path


def pipeline(task: str | None = None, model: str | Path | None = None, **kwargs):
    """transformers.pipeline(task, model=...) for our model folders (runtime/pipeline.py); a text
    generation pipeline without model opens the default model."""
    from llama2_onnx.runtime.pipeline import pipeline as runtime_pipeline

    if model is None and task in (None, "text-generation"):
        from llama2_onnx.assets import default_model_dir

        model = default_model_dir()
    return runtime_pipeline(task, model, **kwargs)
