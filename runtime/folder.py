"""The model folder: its config.json (what the graph is) and manifest.json (what the files are).

    OUT/
      model.onnx, model.onnx.data   the graph and its weights
      config.json                   FolderConfig below
      genai_config.json             for onnxruntime-genai
      tokenizer.model | tokenizer.json (+ tokenizer_config.json)
      manifest.json                 {"files": {name: {"size": n, "sha256": hex}}}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llama2_onnx.assets import sha256_of as sha256_file
from llama2_onnx.errors import UserError
from llama2_onnx.models.config import ConfigError, ModelArgs, load_json

from . import contract

PRECISIONS = ("fp32", "fp16", "int4")
LFS_HEADER = b"version https://git-lfs.github.com/spec/v1"


class ModelFolderError(UserError):
    """A model folder is missing, incomplete or altered."""


@dataclass
class FolderConfig:
    model: ModelArgs
    precision: str = "fp32"
    graph: str = contract.GRAPH_PORTABLE
    format_version: int = contract.FORMAT_VERSION
    opset: int = 23
    chat_format: str | None = None  # a key of runtime.chat_format.CHAT_FORMATS
    tokenizer: str = "tokenizer.model"
    add_bos: bool = True  # prepend BOS to plain prompts (Llama 2 yes; SmolLM2 no)
    quantization: dict[str, Any] = field(default_factory=dict)  # int4: bits, block_size, accuracy_level
    source: dict[str, Any] = field(default_factory=dict)  # checkpoint path and format
    verify: dict[str, Any] = field(default_factory=dict)  # export.verify's figures

    @property
    def kv_dtype(self) -> str:
        return "float16" if self.precision == "fp16" else "float32"

    def to_json(self) -> str:
        d = asdict(self)
        d["io"] = {"inputs": contract.input_names(self.model.n_layers, self.graph), "outputs": contract.output_names(self.model.n_layers)}
        return json.dumps(d, indent=2)

    @classmethod
    def read(cls, folder: Path) -> "FolderConfig":
        d = load_json(folder / contract.CONFIG_FILE)
        d.pop("io", None)
        version = d.get("format_version")
        if version != contract.FORMAT_VERSION:
            raise ModelFolderError(f"{folder} has model format version {version}; this llama2-onnx reads "
                                   f"version {contract.FORMAT_VERSION}: export the model again")
        try:
            d["model"] = ModelArgs.from_dict(d["model"])
            cfg = cls(**d)
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{folder / contract.CONFIG_FILE} is malformed ({e})") from None
        if cfg.precision not in PRECISIONS or cfg.graph not in contract.GRAPHS:
            raise ModelFolderError(f"{folder}: unsupported precision {cfg.precision!r} or graph kind {cfg.graph!r}")
        return cfg


def write_manifest(folder: Path, known: dict[str, str] | None = None) -> dict[str, Any]:
    """Record size and sha256 of every file in folder (manifest.json itself excepted); known:
    sha256 already computed by the writer of a file, by name."""
    known = known or {}
    files = {
        p.name: {"size": p.stat().st_size, "sha256": known.get(p.name) or sha256_file(p)}
        for p in sorted(folder.iterdir()) if p.is_file() and p.name != contract.MANIFEST_FILE
    }
    manifest = {"files": files}
    (folder / contract.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


def _stamp_path(folder: Path) -> Path:
    from llama2_onnx.assets import cache_dir

    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24]
    return cache_dir() / "verified" / f"{key}.json"


def _file_states(folder: Path, names) -> dict[str, list[int]]:
    stats = {n: (folder / n).stat() for n in names}
    return {n: [st.st_size, st.st_mtime_ns] for n, st in stats.items()}


def check_manifest(folder: Path, *, hashes: bool | None = None) -> None:
    """Raise ModelFolderError naming the first file that is missing, a Git LFS pointer,
    or of the wrong size, or (hashes=True, or None on the first load of this folder) of the
    wrong sha256. A folder that passed the hash check is remembered, by file sizes and
    modification times, in the cache folder, so later loads only check sizes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist; export one with `llama2-onnx export CHECKPOINT {folder}`")
    manifest_path = folder / contract.MANIFEST_FILE
    if not manifest_path.is_file():
        raise ModelFolderError(f"{folder} has no {contract.MANIFEST_FILE}: it is not a complete llama2-onnx model folder; export it again")
    files = load_json(manifest_path).get("files", {})
    stamp = _stamp_path(folder)
    if hashes is None:
        try:
            hashes = json.loads(stamp.read_text()) != _file_states(folder, files)
        except (OSError, ValueError):
            hashes = True
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            raise ModelFolderError(f"{path} is missing; copy the whole model folder or export it again")
        size = path.stat().st_size
        if size != meta["size"]:
            if size < 1024 and path.read_bytes().startswith(LFS_HEADER):
                raise ModelFolderError(f"{path} is a Git LFS pointer, not the file itself; run `git lfs pull` in that repository")
            raise ModelFolderError(f"{path} is {size} bytes, the manifest says {meta['size']}: the file is truncated or altered; export again")
        if hashes and sha256_file(path) != meta["sha256"]:
            raise ModelFolderError(f"{path} does not match its sha256 in the manifest: the file is corrupt or altered; export again")
    if hashes:
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.write_text(json.dumps(_file_states(folder, files)))
        except OSError:  # a read-only cache only costs a re-check next time
            pass
