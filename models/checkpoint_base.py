"""What every checkpoint format's opener shares: the Checkpoint and LazyCheckpoint types, the one
error type, and reading a weight file's tensors under Meta's names (models/checkpoint.py opens
Meta and Hugging Face folders, models/checkpoint_gguf.py GGUF files)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from llama2_onnx.errors import UserError

from . import tensor_files
from .checkpoint_layout import IGNORED, rope_heads, shard_dim, to_meta_name
from .config import ConfigError, ModelArgs
from .tensor_files import TensorFileError, TensorRef


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, incomplete, corrupt or of a kind we cannot load."""


@dataclass
class Checkpoint:
    args: ModelArgs
    state_dict: dict[str, torch.Tensor]  # Meta names, Meta rotary layout, float32 or the stored float dtype
    source: str  # "meta" | "hf" | "gguf"
    path: Path
    tokenizer_files: list[Path] = field(default_factory=list)  # tokenizer.model / tokenizer.json beside the weights
    gguf_vocab: dict[str, Any] | None = None  # GGUF tokenizer.* fields, for gguf_vocab.write_tokenizer
    chat_format: str | None = None  # "llama2" | "chatml" | None (unknown)
    labels: list[str] = field(default_factory=list)  # a classifier's labels by id (HF id2label)
    problem_type: str | None = None  # a classifier's HF problem_type, if its config names one


@dataclass
class LazyCheckpoint:
    """A checkpoint's headers, its tensors read one at a time: ``read`` keeps nothing, so reading
    them all in turn needs memory for about one (two for Meta's shards, which are concatenated)."""

    args: ModelArgs
    pieces: dict[str, list[TensorRef]]  # Meta name -> where its bytes are, one part per model-parallel shard
    source: str  # "meta" | "hf" | "gguf"
    path: Path
    tokenizer_files: list[Path] = field(default_factory=list)
    gguf_vocab: dict[str, Any] | None = None
    chat_format: str | None = None
    rope_to_meta: Callable[[torch.Tensor, int], torch.Tensor] | None = None  # q/k layout fix applied by read
    labels: list[str] = field(default_factory=list)  # a classifier's labels by id (args.num_labels of them)
    problem_type: str | None = None  # a classifier's HF problem_type (regression, single/multi_label_classification)

    @property
    def names(self) -> list[str]:
        """Meta names: tok_embeddings, layers.0.* ... layers.N-1.*, norm, output (absent when tied)."""
        return list(self.pieces)

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape in Meta's layout, shards merged."""
        parts = self.pieces[name]
        shape = list(parts[0].shape)
        if len(parts) > 1:
            dim = shard_dim(name)
            shape[dim] = sum(p.shape[dim] for p in parts)
        return tuple(shape)

    def dtype(self, name: str) -> torch.dtype:
        """The dtype ``read`` returns: the stored float type (float32 for GGUF quant types)."""
        return self.pieces[name][0].dtype

    def read(self, name: str) -> torch.Tensor:
        """The tensor `name` in Meta's layout, read from the file(s) now."""
        try:
            parts = [tensor_files.read(p) for p in self.pieces[name]]
        except TensorFileError as e:
            raise _corrupt(e.path, e) from None
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=shard_dim(name))
        del parts
        heads = rope_heads(name, self.args)
        if self.rope_to_meta is not None and heads is not None:
            t = self.rope_to_meta(t, heads)
        return t

    def close(self) -> None:
        """Forget the tensor table (and a legacy .pth file's tensors, which are held whole)."""
        self.pieces = {}

    def __enter__(self) -> LazyCheckpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---- reading weight files ---------------------------------------------------------

LFS_HEADER = b"version https://git-lfs.github.com/spec/v1"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def _first_line(e: BaseException) -> str:
    """A library's error message cut to its first line, and to its first sentence when long."""
    text = (str(e).strip() or type(e).__name__).splitlines()[0]
    if len(text) > 160 and ". " in text:
        text = text[: text.index(". ")]
    return text if len(text) <= 200 else text[:200] + "..."


def _args_from(where: Path, make: Callable[..., ModelArgs], *a: Any, **kw: Any) -> ModelArgs:
    """ModelArgs from a config, a ConfigError naming the file it came from."""
    try:
        return make(*a, **kw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_weights_file(path: Path) -> None:
    """Refuse a missing file or a Git LFS pointer (a small text file) where weights should be."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: download the complete checkpoint")
    if path.stat().st_size < 1024:
        with open(path, "rb") as f:
            if f.read(len(LFS_HEADER)) == LFS_HEADER:
                raise CheckpointError(f"{path} is a Git LFS pointer, not the weights: run `git lfs pull` in {path.parent}")


def _corrupt(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(f"cannot read {path} ({_first_line(e)}): the file is truncated or corrupt, download it again")


def _open_weights(path: Path) -> dict[str, TensorRef]:
    """The tensors of one .safetensors or torch (.pth/.bin) file, by the file's own names."""
    _check_weights_file(path)
    try:
        refs = tensor_files.open_safetensors(path) if path.suffix == ".safetensors" else tensor_files.open_torch(path)
    except TensorFileError as e:
        raise _corrupt(path, e) from None
    if not isinstance(refs, dict) or not all(isinstance(v, TensorRef) for v in refs.values()):
        raise CheckpointError(f"{path} does not hold a dict of tensors: is it a model checkpoint?")
    return refs


def _rename(tensors: dict[str, TensorRef], source: str, where: Path) -> dict[str, TensorRef]:
    """Source names -> Meta names, dropping known non-weight buffers, refusing strangers."""
    out = {}
    for name, t in tensors.items():
        if IGNORED[source].fullmatch(name):
            continue
        meta = to_meta_name(name, source)
        if meta is None:
            raise CheckpointError(f"{where} holds tensor {name!r}, which is no Llama weight: is this a Llama checkpoint?")
        out[meta] = t
    return out


def _chat_format(template: str | None, names: list[str]) -> str | None:
    """From a chat template if there is one, else from a Llama 2 chat model's name."""
    if template:
        if "<|im_start|>" in template:
            return "chatml"
        if "[INST]" in template:
            return "llama2"
    if any(re.search(r"llama[-_ ]?(v)?2.*chat", n, re.IGNORECASE) for n in names if n):
        return "llama2"
    return None
