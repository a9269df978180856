"""Open a Llama checkpoint of any supported format and read it a tensor at a time.

    src = open_checkpoint(path)   # headers only: src.args, src.names, src.shape(n), src.dtype(n)
    w = src.read(name)            # one tensor, Meta layout; memory bounded by the largest tensor
    ckpt = load(path)             # every tensor at once: a Checkpoint with a state dict

Formats (``FORMATS``: a detection function, an opener and the rotary fix-up for each):

    meta  a folder with params.json + consolidated.NN.pth (1, 2 or 8 model-parallel shards)
    hf    a folder with config.json + model.safetensors, model-0000x-of-0000y.safetensors
          (+ model.safetensors.index.json) or pytorch_model.bin (+ its index)
    gguf  a .gguf file of architecture 'llama' (or a folder holding exactly one)

Whatever the source, tensors come out in Meta's names and rotary layout, their shapes
checked against ModelArgs when the checkpoint is opened, before any data is read; tied
embeddings leave no ``output.weight``. Every bad input raises one line: a CheckpointError
(or the ConfigError of a bad config file) that names the problem and the fix. Names and
layouts are in ``checkpoint_layout``; the bytes of each file format in ``tensor_files``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .checkpoint_base import (TOKENIZER_FILES, Checkpoint, CheckpointError, LazyCheckpoint, _args_from, _chat_format,
                              _open_weights, _rename)
from .checkpoint_gguf import GGUF_MAGIC, open_gguf
from .checkpoint_layout import IGNORED, expected_shapes, hf_to_meta, shard_dim, source_name
from .config import PROBLEM_TYPES, ConfigError, ModelArgs, hf_labels, load_json
from .tensor_files import TensorRef


# ---- Meta -------------------------------------------------------------------------

def _merge_shards(parts: list[dict[str, TensorRef]], files: list[Path]) -> dict[str, list[TensorRef]]:
    """Meta's model-parallel shards -> each tensor's parts (norms are replicated: shard 0's)."""
    merged = {}
    for name, first in parts[0].items():
        pieces = [p.get(name) for p in parts]
        for piece, f in zip(pieces, files):
            if piece is None:
                raise CheckpointError(f"{name} is in {files[0].name} but not in {f.name}: the shards are from different checkpoints")
            if piece.shape != first.shape:
                raise CheckpointError(f"{name} has shape {list(first.shape)} in {files[0].name} but {list(piece.shape)} "
                                      f"in {f.name}: the shards are from different checkpoints")
        merged[name] = [first] if shard_dim(name) is None or len(parts) == 1 else pieces
    return merged


def open_meta(folder: Path) -> LazyCheckpoint:
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
    parts = [{k: v for k, v in _open_weights(f).items() if not IGNORED["meta"].fullmatch(k)} for f in shards]
    emb = parts[0].get("tok_embeddings.weight")
    if emb is None or len(emb.shape) != 2:
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
    return LazyCheckpoint(
        args=args, pieces=_merge_shards(parts, shards), source="meta", path=folder,
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
            # a file name beside the index, nothing else: no path may lead out of the folder
            strange = [f for f in weight_map.values() if not isinstance(f, str) or Path(f).name != f or f in ("", ".", "..")]
            if strange:
                raise CheckpointError(f"{folder / index} names weight file {str(strange[0])[:80]!r}, which is not a "
                                      "file name in the checkpoint folder: download the index again")
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


def open_hf(folder: Path) -> LazyCheckpoint:
    cfg = load_json(folder / "config.json")
    args = _args_from(folder, ModelArgs.from_hf_config, cfg)
    refs: dict[str, TensorRef] = {}
    for f in _hf_weight_files(folder):
        refs.update(_rename(_open_weights(f), "hf", f))
    if args.tie_embeddings:
        refs.pop("output.weight", None)  # a tied lm_head saved anyway is the embedding again
    problem = cfg.get("problem_type") if args.is_classifier else None
    if problem is not None and problem not in PROBLEM_TYPES:
        raise ConfigError(f"{folder}: problem_type {str(problem)[:60]!r} is not one of {', '.join(PROBLEM_TYPES)}: "
                          "fix it in config.json (the one that came with the weights)")
    template = None
    if (folder / "tokenizer_config.json").is_file():
        try:
            template = load_json(folder / "tokenizer_config.json").get("chat_template")
        except ConfigError:
            pass  # the chat format is a nicety; a broken tokenizer config is the tokenizer's problem
    return LazyCheckpoint(
        args=args, pieces={name: [ref] for name, ref in refs.items()}, source="hf", path=folder,
        tokenizer_files=[folder / t for t in TOKENIZER_FILES if (folder / t).is_file()],
        chat_format=_chat_format(template if isinstance(template, str) else None,
                                 [folder.name, str(cfg.get("_name_or_path", ""))]),
        labels=hf_labels(cfg) if args.is_classifier else [], problem_type=problem,
    )


# ---- the registry -----------------------------------------------------------------

@dataclass(frozen=True)
class Format:
    detect: Callable[[Path], Path | None]  # the path the opener takes, or None: not this format
    open: Callable[[Path], LazyCheckpoint]  # headers read, names in the file's order, not validated
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
    "gguf": Format(_detect_gguf, open_gguf, rope_to_meta=None),  # llama.cpp stores q/k in Meta's layout
    "meta": Format(_detect_meta, open_meta, rope_to_meta=None),
    "hf": Format(_detect_hf, open_hf, rope_to_meta=hf_to_meta),
}


def detect(path: str | Path) -> tuple[str, Path]:
    """(format name, the path its opener takes) for a checkpoint file or folder."""
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


def checkpoint_paths(path: str | Path) -> list[Path]:
    """Where the checkpoint at path lives: the path given, the one its format reads and, for a
    folder, each entry in it (symlinks unresolved: the caller resolves). An export writes none of them."""
    path = Path(path).expanduser()
    _, found = detect(path)
    return [path, found, *(sorted(found.iterdir()) if found.is_dir() else [])]


# ---- validation and the entry point ----------------------------------------------

def _describe(a: ModelArgs) -> str:
    return (f"dim={a.dim}, n_layers={a.n_layers}, n_heads={a.n_heads}, n_kv_heads={a.n_kv_heads}, "
            f"vocab_size={a.vocab_size}, ffn_hidden_dim={a.ffn_hidden_dim}")


def _layers_in(names: list[str]) -> int:
    """How many transformer layers the tensors (Meta names) hold: the highest layer index + 1."""
    found = [int(m.group(1)) for m in map(re.compile(r"layers\.(\d+)\.").match, names) if m]
    return max(found) + 1 if found else 0


def validate(src: LazyCheckpoint) -> None:
    """Every tensor the config implies is there, floating point and of the right shape; no others."""
    # The layer count first, from the file's own names: the table of expected tensors below
    # grows with the config's n_layers, which must not be trusted before it matches the file.
    held = _layers_in(list(src.pieces))
    if src.args.n_layers != held:
        key = {"hf": "num_hidden_layers", "gguf": "llama.block_count"}.get(src.source, "n_layers")
        raise CheckpointError(f"{src.path}: the config says {key} {src.args.n_layers} but the weights hold {held} "
                              "layers: config and weights disagree, use the config that came with these weights")
    expected = expected_shapes(src.args)

    def label(name: str) -> str:
        theirs = source_name(name, src.source)
        return name if theirs == name else f"{theirs} ({name})"

    def some(names: list[str]) -> str:
        more = f" and {len(names) - 2} more" if len(names) > 2 else ""
        return ", ".join(map(label, names[:2])) + more

    if "score.weight" in src.pieces and "score.weight" not in expected and "output.weight" not in src.pieces:
        raise CheckpointError(f"{src.path} holds a classification head ({label('score.weight')}) but its config does not "
                              "name a classifier: a Hugging Face config.json needs \"architectures\": "
                              "[\"LlamaForSequenceClassification\"] and its id2label")
    missing = [n for n in expected if n not in src.pieces]
    if "score.weight" in missing and "output.weight" in src.pieces:
        raise CheckpointError(f"{src.path}: its config names a sequence classifier but the weights hold a language-model "
                              f"head ({label('output.weight')}) and no {label('score.weight')}: config and weights disagree")
    if missing:
        raise CheckpointError(f"{src.path} is missing tensor(s) {some(missing)}: "
                              "the checkpoint is incomplete, download it again")
    extra = [n for n in src.pieces if n not in expected]
    if extra:
        raise CheckpointError(f"{src.path} has tensor(s) {some(extra)} that its config "
                              f"({_describe(src.args)}) has no place for: config and weights disagree")
    for name, shape in expected.items():
        if src.shape(name) != shape:
            raise CheckpointError(f"{src.path}: {label(name)} has shape {list(src.shape(name))}, expected {list(shape)} "
                                  f"from the config ({_describe(src.args)}): config and weights disagree, "
                                  "use the config that came with these weights")
        if not src.dtype(name).is_floating_point:
            raise CheckpointError(f"{src.path}: {label(name)} has dtype {src.dtype(name)}, expected a float type")


def open_checkpoint(path: str | Path) -> LazyCheckpoint:
    """Open a Meta, Hugging Face or GGUF Llama checkpoint for reading a tensor at a time, validated.

    Reads the headers only; a bad checkpoint fails here, before any tensor data is read.
    """
    name, found = detect(path)
    fmt = FORMATS[name]
    src = fmt.open(found)
    validate(src)
    ordered = {n: src.pieces[n] for n in expected_shapes(src.args)}
    return dataclasses.replace(src, pieces=ordered, rope_to_meta=fmt.rope_to_meta)


def load(path: str | Path) -> Checkpoint:
    """Load a Meta, Hugging Face or GGUF Llama checkpoint into Meta names and layout, validated."""
    with open_checkpoint(path) as src:
        return Checkpoint(
            args=src.args, state_dict={n: src.read(n) for n in src.names}, source=src.source, path=src.path,
            tokenizer_files=src.tokenizer_files, gguf_vocab=src.gguf_vocab, chat_format=src.chat_format,
            labels=src.labels, problem_type=src.problem_type,
        )
