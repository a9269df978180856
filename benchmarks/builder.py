"""The genai-builder peer's model: onnxruntime-genai's own builder run on the same checkpoint.

The builder reads a Hugging Face folder (its GGUF input takes float GGUF only). An HF
checkpoint goes in as it is; a GGUF or Meta checkpoint is first written as an HF folder
from our loader's weights (`models.writers.write_hf`) with our folder's tokenizer files,
so the builder sees exactly the weights our export saw.

Built models are cached under ``<cache>/genai-builder/<key>/model`` where the key hashes the
checkpoint's path, size and mtime, the precision, the execution provider and the
onnxruntime-genai version; a second run reuses the build.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from llama2_onnx.errors import UserError

PRECISIONS = ("fp32", "fp16", "int4")
BUILD_FILE = "build.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")


def _fingerprint(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return ";".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def cache_key(checkpoint: Path, precision: str, provider: str) -> str:
    version = importlib.metadata.version("onnxruntime-genai")
    text = f"{_fingerprint(checkpoint)}|{precision}|{provider}|{version}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_hf_copy(checkpoint: Path, model_dir: Path, out: Path) -> Path:
    """An HF folder holding our loader's weights of a GGUF or Meta checkpoint."""
    from llama2_onnx.models import checkpoint as ckpt
    from llama2_onnx.models.writers import write_hf

    loaded = ckpt.load(checkpoint)
    write_hf(loaded.state_dict, loaded.args, out)
    del loaded
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)
    return out


def build(*, checkpoint: str | Path, checkpoint_format: str, model_dir: str | Path, precision: str,
          provider: str, log: Callable[[str], None] = print) -> Path:
    """The builder's model folder for this checkpoint (built now, or found in the cache)."""
    from llama2_onnx.files import cache_dir

    if precision not in PRECISIONS:
        raise UserError(f"--builder-precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    checkpoint, model_dir = Path(checkpoint), Path(model_dir)
    root = cache_dir() / "genai-builder" / cache_key(checkpoint, precision, provider)
    out = root / "model"
    if (out / BUILD_FILE).is_file():
        return out
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    log(f"genai-builder: building a {precision} {provider} model from {checkpoint} into {out} (cached after) ...")
    t = time.perf_counter()
    try:
        hf = checkpoint if checkpoint_format == "hf" else _write_hf_copy(checkpoint, model_dir, root / "hf")
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
               "-p", precision, "-e", provider, "-c", str(root / "cache")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not (out / "genai_config.json").is_file():
            lines = [ln for ln in (done.stderr or done.stdout).strip().splitlines() if ln.strip()]
            raise UserError(f"onnxruntime-genai's builder failed: {lines[-1] if lines else done.returncode}")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    for tmp in ("hf", "cache"):
        shutil.rmtree(root / tmp, ignore_errors=True)
    record = {"precision": precision, "provider": provider, "checkpoint": str(checkpoint),
              "seconds": round(time.perf_counter() - t, 1), "command": " ".join(cmd)}
    (out / BUILD_FILE).write_text(json.dumps(record, indent=2))
    return out
