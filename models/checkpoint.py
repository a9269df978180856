"""Load a Llama checkpoint of any supported format: ``load(path) -> Checkpoint``.

Formats (``FORMATS``: a detection function, a loader and the rotary fix-up for each):

    meta  a folder with params.json + consolidated.NN.pth (1, 2 or 8 model-parallel shards)
    hf    a folder with config.json + model.safetensors, model-0000x-of-0000y.safetensors
          (+ model.safetensors.index.json) or pytorch_model.bin (+ its index)
    gguf  a .gguf file of architecture 'llama' (or a folder holding exactly one)

Whatever the source, the state dict comes out in Meta's names and rotary layout, its
shapes checked against ModelArgs; tied embeddings leave no ``output.weight``. Every bad
input raises one line: a CheckpointError (or the ConfigError of a bad config file) that
names the problem and the fix. Names and layouts are in ``checkpoint_layout``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from llama2_onnx.errors import UserError

from .checkpoint_layout import IGNORED, expected_shapes, hf_to_meta, rope_heads, shard_dim, source_name, to_meta_name
from .config import ConfigError, ModelArgs, load_json
from .gguf_vocab import VocabError, read_vocab


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


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    _check_weights_file(path)
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)  # pre-zip format: no mmap
    except Exception as e:  # a truncated zip, a bad pickle, a non-tensor object: all mean "unreadable"
        raise _corrupt(path, e) from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path} does not hold a dict of tensors: is it a model checkpoint?")
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    _check_weights_file(path)
    try:
        return load_file(path)
    except Exception as e:
        raise _corrupt(path, e) from None


def _rename(tensors: dict[str, torch.Tensor], source: str, where: Path) -> dict[str, torch.Tensor]:
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


# ---- Meta -------------------------------------------------------------------------

def _merge_shards(parts: list[dict[str, torch.Tensor]], files: list[Path]) -> dict[str, torch.Tensor]:
    """Meta's model-parallel shards -> one state dict (norms replicated, the rest concatenated)."""
    if len(parts) == 1:
        return dict(parts[0])
    merged = {}
    for name in parts[0]:
        pieces = [p.get(name) for p in parts]
        for piece, f in zip(pieces, files):
            if piece is None:
                raise CheckpointError(f"{name} is in {files[0].name} but not in {f.name}: the shards are from different checkpoints")
        dim = shard_dim(name)
        merged[name] = pieces[0] if dim is None else torch.cat(pieces, dim=dim)
    return merged


def load_meta(folder: Path) -> Checkpoint:
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not (folder / "params.json").is_file():
        raise CheckpointError(f"{folder} has no params.json: copy it from the same Meta download as the consolidated.NN.pth files")
    if not shards:
        raise CheckpointError(f"{folder} has params.json but no consolidated.NN.pth weight files: download them beside it")
    names = [s.name for s in shards]
    if names != [f"consolidated.{k:02d}.pth" for k in range(len(shards))]:
        raise CheckpointError(f"{folder} has shards {', '.join(names)}, not consolidated.00.pth onwards without gaps: "
                              "a shard is missing, download all of them")
    params = load_json(folder / "params.json")
    parts = [{k: v for k, v in _torch_load(f).items() if not IGNORED["meta"].fullmatch(k)} for f in shards]
    emb = parts[0].get("tok_embeddings.weight")
    if emb is None or emb.dim() != 2:
        raise CheckpointError(f"{shards[0]} has no 2-D tok_embeddings.weight: is it a Llama checkpoint?")
    args = _args_from(folder, ModelArgs.from_params_json, params, vocab_size=emb.shape[0])
    n = len(shards)
    if emb.shape[1] * n != args.dim:
        need = args.dim / emb.shape[1]
        count = f"{int(need)} shards" if need == int(need) else "shards"
        raise CheckpointError(f"{folder} has {n} shard(s) whose tok_embeddings.weight has {emb.shape[1]} columns each, "
                              f"but params.json says dim {args.dim}: shard count and config disagree, download all "
                              f"consolidated.NN.pth files (dim {args.dim} needs {count}) and their params.json")
    base = [folder, folder.parent]
    return Checkpoint(
        args=args, state_dict=_merge_shards(parts, shards), source="meta", path=folder,
        tokenizer_files=next(([d / t] for d in base for t in TOKENIZER_FILES if (d / t).is_file()), []),
        chat_format=_chat_format(None, [folder.name]),
    )


# ---- Hugging Face -----------------------------------------------------------------

# (index file, single file, shard pattern) in order of preference
HF_WEIGHTS = [
    ("model.safetensors.index.json", "model.safetensors", "model-*-of-*.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model-*-of-*.bin"),
]


def _hf_weight_files(folder: Path) -> list[Path]:
    for index, single, pattern in HF_WEIGHTS:
        if (folder / index).is_file():
            weight_map = load_json(folder / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{folder / index} has no weight_map: download it again")
            return [folder / f for f in sorted(set(weight_map.values()))]
        if (folder / single).is_file():
            return [folder / single]
        shards = sorted(folder.glob(pattern))
        if shards:
            total = int(re.search(r"-of-(\d+)", shards[0].name).group(1))
            if len(shards) != total:
                raise CheckpointError(f"{folder} has {len(shards)} of the {total} {pattern} shards: download the rest")
            return shards
    raise CheckpointError(f"{folder} has config.json but no weights: expected model.safetensors, "
                          "model-0000x-of-0000y.safetensors with model.safetensors.index.json, or pytorch_model.bin")


def load_hf(folder: Path) -> Checkpoint:
    cfg = load_json(folder / "config.json")
    args = _args_from(folder, ModelArgs.from_hf_config, cfg)
    state: dict[str, torch.Tensor] = {}
    for f in _hf_weight_files(folder):
        tensors = _read_safetensors(f) if f.suffix == ".safetensors" else _torch_load(f)
        state.update(_rename(tensors, "hf", f))
    if args.tie_embeddings:
        state.pop("output.weight", None)  # a tied lm_head saved anyway is the embedding again
    template = None
    if (folder / "tokenizer_config.json").is_file():
        try:
            template = load_json(folder / "tokenizer_config.json").get("chat_template")
        except ConfigError:
            pass  # the chat format is a nicety; a broken tokenizer config is the tokenizer's problem
    return Checkpoint(
        args=args, state_dict=state, source="hf", path=folder,
        tokenizer_files=[folder / t for t in TOKENIZER_FILES if (folder / t).is_file()],
        chat_format=_chat_format(template if isinstance(template, str) else None,
                                 [folder.name, str(cfg.get("_name_or_path", ""))]),
    )


# ---- GGUF -------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"
# What we dequantize (gguf.quants has these since gguf 0.10); the IQ types are refused.
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
_VOCAB_ARRAYS = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"}


def _gguf_tensor(t) -> torch.Tensor:
    """One GGUF tensor as a torch tensor in numpy/torch dim order (GGUF lists dims fastest first)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # (rows, cols)
    if t.tensor_type in (Q.F32, Q.F16):
        arr = np.array(t.data)  # copy out of the read-only memory map, dtype kept
    else:
        arr = dequantize(t.data, t.tensor_type)  # float32
    return torch.from_numpy(arr.reshape(shape))


def load_gguf(path: Path) -> Checkpoint:
    from gguf import GGUFReader

    _check_weights_file(path)
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise CheckpointError(f"{path} is not a GGUF file (it does not start with 'GGUF'): pass a .gguf model file")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:
        raise _corrupt(path, e) from None
    meta = {k: f.contents() for k, f in reader.fields.items() if k not in _VOCAB_ARRAYS}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path} is a GGUF of architecture {arch!r}; only 'llama' (Llama 2, SmolLM2, ...) is supported")
    if not reader.tensors:
        raise CheckpointError(f"{path} holds no tensors (a vocabulary-only GGUF?): pass a GGUF file with the model weights")
    bad = sorted({t.tensor_type.name for t in reader.tensors} - set(GGUF_TYPES))
    if bad:
        raise CheckpointError(f"{path} uses GGUF type(s) {', '.join(bad)}; supported: {', '.join(GGUF_TYPES)}: "
                              "use a file quantized to one of those (llama.cpp's llama-quantize makes them)")
    state = _rename({t.name: t for t in reader.tensors}, "gguf", path)
    try:
        state = {name: _gguf_tensor(t) for name, t in state.items()}
    except Exception as e:
        raise _corrupt(path, e) from None
    try:
        vocab = read_vocab(reader)
    except VocabError:
        vocab = None
    emb = state.get("tok_embeddings.weight")
    vocab_size = emb.shape[0] if emb is not None else int(meta.get("llama.vocab_size", 0)) or None
    args = _args_from(path, ModelArgs.from_gguf_metadata, meta, vocab_size, tie_embeddings="output.weight" not in state)
    template = (vocab or {}).get("tokenizer.chat_template")
    return Checkpoint(
        args=args, state_dict=state, source="gguf", path=path, gguf_vocab=vocab,
        chat_format=_chat_format(template, [path.name, str(meta.get("general.name", ""))]),
    )


# ---- the registry -----------------------------------------------------------------

@dataclass(frozen=True)
class Format:
    detect: Callable[[Path], Path | None]  # the path the loader takes, or None: not this format
    load: Callable[[Path], Checkpoint]
    rope_to_meta: Callable[[torch.Tensor, int], torch.Tensor] | None  # q/k layout fix; None: Meta's already


def _detect_gguf(path: Path) -> Path | None:
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(4)
        return path if path.suffix == ".gguf" or head == GGUF_MAGIC else None
    if any((path / n).is_file() for n in ("params.json", "config.json")):
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise CheckpointError(f"{path} holds {len(found)} .gguf files: pass the one to load")
    return found[0] if found else None


def _detect_meta(path: Path) -> Path | None:
    folder = path if path.is_dir() else path.parent
    if path.is_file() and not (path.name == "params.json" or re.fullmatch(r"consolidated\.\d+\.pth", path.name)):
        return None
    return folder if (folder / "params.json").is_file() or any(folder.glob("consolidated.*.pth")) else None


def _detect_hf(path: Path) -> Path | None:
    folder = path if path.is_dir() else path.parent
    if path.is_file() and not (path.name == "config.json" or path.suffix in (".safetensors", ".bin")):
        return None
    return folder if (folder / "config.json").is_file() else None


FORMATS: dict[str, Format] = {
    "gguf": Format(_detect_gguf, load_gguf, rope_to_meta=None),  # llama.cpp stores q/k in Meta's layout
    "meta": Format(_detect_meta, load_meta, rope_to_meta=None),
    "hf": Format(_detect_hf, load_hf, rope_to_meta=hf_to_meta),
}


def detect(path: str | Path) -> tuple[str, Path]:
    """(format name, the path its loader takes) for a checkpoint file or folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: pass a checkpoint folder (Meta or Hugging Face) or a .gguf file")
    for name, fmt in FORMATS.items():
        found = fmt.detect(path)
        if found is not None:
            return name, found
    raise CheckpointError(
        f"no checkpoint recognised at {path}: expected a folder with params.json + consolidated.NN.pth (Meta), "
        "a folder with config.json + model.safetensors or pytorch_model.bin (Hugging Face), or a .gguf file")


# ---- validation and the entry point ----------------------------------------------

def _describe(a: ModelArgs) -> str:
    return (f"dim={a.dim}, n_layers={a.n_layers}, n_heads={a.n_heads}, n_kv_heads={a.n_kv_heads}, "
            f"vocab_size={a.vocab_size}, ffn_hidden_dim={a.ffn_hidden_dim}")


def validate(ckpt: Checkpoint) -> None:
    """Every tensor the config implies is there, floating point and of the right shape; no others."""
    expected = expected_shapes(ckpt.args)
    sd = ckpt.state_dict

    def label(name: str) -> str:
        theirs = source_name(name, ckpt.source)
        return name if theirs == name else f"{theirs} ({name})"

    def some(names: list[str]) -> str:
        more = f" and {len(names) - 2} more" if len(names) > 2 else ""
        return ", ".join(map(label, names[:2])) + more

    missing = [n for n in expected if n not in sd]
    if missing:
        raise CheckpointError(f"{ckpt.path} is missing tensor(s) {some(missing)}: "
                              "the checkpoint is incomplete, download it again")
    extra = [n for n in sd if n not in expected]
    if extra:
        raise CheckpointError(f"{ckpt.path} has tensor(s) {some(extra)} that its config "
                              f"({_describe(ckpt.args)}) has no place for: config and weights disagree")
    for name, shape in expected.items():
        t = sd[name]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{ckpt.path}: {label(name)} has shape {list(t.shape)}, expected {list(shape)} "
                                  f"from the config ({_describe(ckpt.args)}): config and weights disagree, "
                                  "use the config that came with these weights")
        if not t.is_floating_point():
            raise CheckpointError(f"{ckpt.path}: {label(name)} has dtype {t.dtype}, expected a float type")


def load(path: str | Path) -> Checkpoint:
    """Load a Meta, Hugging Face or GGUF Llama checkpoint into Meta names and layout, validated."""
    name, found = detect(path)
    fmt = FORMATS[name]
    ckpt = fmt.load(found)
    validate(ckpt)
    if fmt.rope_to_meta is not None:
        for key, t in ckpt.state_dict.items():
            heads = rope_heads(key, ckpt.args)
            if heads is not None:
                ckpt.state_dict[key] = fmt.rope_to_meta(t, heads)
    return ckpt
