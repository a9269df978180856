"""The model folder: its config.json (what the graph is) and manifest.json (what the files are).

    OUT/
      model.onnx, model.onnx.data   the graph and its weights
      config.json                   FolderConfig below
      genai_config.json             for onnxruntime-genai
      tokenizer.model | tokenizer.json (+ tokenizer_config.json)
      manifest.json                 {"files": {name: {"size": n, "sha256": hex}}}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llama2_onnx.models.config import ConfigError, ModelArgs, load_json

from . import contract
from .external_data import check_external_data
# the manifest's names, here too: callers know the folder's errors and checks by this module
from .manifest import ModelFolderError, check_manifest, plain_file_name, read_manifest, write_manifest  # noqa: F401
from .tokenizer import HF_CONFIG_FILE, HF_FILE, SPM_FILE

PRECISIONS = ("fp32", "fp16", "int4")

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
    task: str = contract.TASK_GENERATION  # or a sequence classifier's "text-classification" (model.num_labels set)
    labels: list[str] = field(default_factory=list)  # a classifier's labels by id, model.num_labels of them
    problem_type: str | None = None  # a classifier's transformers problem_type, when its checkpoint names one

    @property
    def kv_dtype(self) -> str:
        return "float16" if self.precision == "fp16" else "float32"

    def to_json(self) -> str:
        d = asdict(self)
        n, task = self.model.n_layers, self.task
        d["io"] = {"inputs": contract.input_names(n, self.graph, task), "outputs": contract.output_names(n, task)}
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
        classifier = cfg.task == contract.TASK_CLASSIFICATION
        if cfg.task not in contract.TASKS or classifier != cfg.model.is_classifier or (
                classifier and (not isinstance(cfg.labels, list) or len(cfg.labels) != cfg.model.num_labels
                                or not all(isinstance(x, str) for x in cfg.labels))):
            raise ModelFolderError(f"{folder / contract.CONFIG_FILE}: task {str(cfg.task)[:40]!r}, model num_labels "
                                   f"{cfg.model.num_labels} and labels do not agree; export the model again")
        return cfg


# files the runtime reads when they are present (runtime.tokenizer.load_tokenizer): each must be listed
TOKENIZER_FILES = (SPM_FILE, HF_FILE, HF_CONFIG_FILE)


def check_folder(folder: Path, *, hashes: bool | None = None) -> FolderConfig:
    """Everything to check before a session opens the folder: the manifest (check_manifest), then
    config.json, then that the manifest names every file the model reads (model.onnx, its external
    data, config.json, the tokenizer) and that every external-data location is a listed file inside
    the folder (runtime.external_data). Returns the config."""
    folder = Path(folder)
    files = check_manifest(folder, hashes=hashes)
    config = FolderConfig.read(folder)
    if config.tokenizer and not plain_file_name(config.tokenizer):
        raise ModelFolderError(f"{folder / contract.CONFIG_FILE} names tokenizer {config.tokenizer!r}, not a file of the folder; export again")
    needed = {config.tokenizer} if config.tokenizer else set()
    needed |= {n for n in TOKENIZER_FILES if (folder / n).exists()}
    for name in sorted(needed - set(files)):
        raise ModelFolderError(f"{folder / contract.MANIFEST_FILE} does not list {name}, which the model reads: "
                               "the manifest must name every file the model needs; export it again")
    check_external_data(folder, files, contract.MODEL_FILE)
    return config
