"""The cache folder and file hashes: a leaf every layer may import (standard library only)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

CACHE_ENV = "LLAMA2_ONNX_CACHE"


def cache_dir() -> Path:
    """The cache folder (created if missing)."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llama2-onnx")
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
