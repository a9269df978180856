"""export_model: checkpoint in, verified ONNX model folder out."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llama2_onnx.errors import UserError
from llama2_onnx.models import checkpoint as ckpt
from llama2_onnx.models import gguf_vocab
from llama2_onnx.models.llama import Transformer
from llama2_onnx.runtime import contract
from llama2_onnx.runtime.folder import PRECISIONS, FolderConfig

from . import folder as out_folder
from .precision import Int4Options, quantize_int4
from .progress import Stages
from .trace import DEFAULT_OPSET, trace
from .verify import verify

# int4 is traced in float32, then its MatMul weights are quantized (export/precision.py)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int4": torch.float32}


@dataclass
class ExportResult:
    out: Path
    config: FolderConfig
    seconds: dict[str, float] = field(default_factory=dict)


def build_model(checkpoint: ckpt.Checkpoint, dtype: torch.dtype) -> Transformer:
    """Our decoder holding the checkpoint's weights in dtype (no second copy made at float32)."""
    with torch.device("meta"):
        model = Transformer(checkpoint.args)
    sd = {k: v.to(dtype) for k, v in checkpoint.state_dict.items()}
    if checkpoint.args.tie_embeddings:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if checkpoint.args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def _tokenizer_files(checkpoint: ckpt.Checkpoint, folder: Path, tokenizer: Path | None) -> tuple[str | None, dict]:
    """Put the tokenizer in the folder; return its file name and the special-token texts."""
    if tokenizer is not None:
        if not tokenizer.is_file() or tokenizer.name not in (gguf_vocab.SPM_FILE, gguf_vocab.HF_FILE):
            raise UserError(f"--tokenizer {tokenizer} must be an existing tokenizer.model or tokenizer.json")
        files = [tokenizer]
    elif checkpoint.gguf_vocab is not None:
        name = gguf_vocab.write_tokenizer(checkpoint.gguf_vocab, folder)
        tokens = checkpoint.gguf_vocab["tokenizer.ggml.tokens"]
        a = checkpoint.args
        return name, {"bos_token": tokens[a.bos_id], "eos_token": tokens[a.eos_id]}
    else:
        files = checkpoint.tokenizer_files
    for f in files:
        shutil.copyfile(f, folder / f.name)
    names = [f.name for f in files]
    if gguf_vocab.SPM_FILE in names:
        return gguf_vocab.SPM_FILE, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if gguf_vocab.HF_FILE in names:
        return gguf_vocab.HF_FILE, {}
    return None, {}


def _add_bos(checkpoint: ckpt.Checkpoint, tokenizer: str | None) -> bool:
    """Whether plain prompts start with BOS: the GGUF vocabulary says so; SentencePiece Llama does."""
    if checkpoint.gguf_vocab is not None and "tokenizer.ggml.add_bos_token" in checkpoint.gguf_vocab:
        return bool(checkpoint.gguf_vocab["tokenizer.ggml.add_bos_token"])
    return tokenizer == gguf_vocab.SPM_FILE


def _default_chat_format(checkpoint: ckpt.Checkpoint, tokenizer: str | None) -> str | None:
    if checkpoint.chat_format:
        return checkpoint.chat_format
    return "llama2" if tokenizer == gguf_vocab.SPM_FILE else None


def export_model(
    *, checkpoint: str | Path, out: str | Path, precision: str = "fp32", max_seq_len: int | None = None,
    opset: int = DEFAULT_OPSET, overwrite: bool = False, verify_export: bool = True,
    tokenizer: str | Path | None = None, chat_format: str | None = None, progress: bool = True,
    int4: Int4Options | None = None,
) -> ExportResult:
    """Export a Meta, Hugging Face or GGUF Llama checkpoint to an ONNX model folder at out."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    out = Path(out)
    out_folder.check_out(out, overwrite)  # fail before the slow work
    int4 = (int4 or Int4Options()) if precision == "int4" else None
    names = ["load", "convert", "trace", *(["quantize"] if int4 else []), "save", *(["verify"] if verify_export else [])]
    stages = Stages(names, progress)

    with stages.stage("load"):
        loaded = ckpt.load(checkpoint)
    if max_seq_len is not None:
        if max_seq_len <= 0:
            raise UserError(f"--max-seq-len must be positive, got {max_seq_len}")
        loaded.args.max_seq_len = max_seq_len

    with out_folder.staging(out, overwrite) as tmp:
        with stages.stage("convert"):
            model = build_model(loaded, DTYPES[precision])
        with stages.stage("trace"):
            trace(model, tmp, opset=opset)
        del model
        if int4 is not None:
            with stages.stage("quantize"):
                quantize_int4(tmp, int4)
        with stages.stage("save"):
            tok_name, special = _tokenizer_files(loaded, tmp, Path(tokenizer) if tokenizer else None)
            cfg = FolderConfig(
                model=loaded.args, precision=precision, opset=opset,
                chat_format=chat_format or _default_chat_format(loaded, tok_name),
                quantization=int4.to_dict() if int4 else {},
                tokenizer=tok_name or "", add_bos=_add_bos(loaded, tok_name), source={"path": str(Path(checkpoint).resolve()), "format": loaded.source},
            )
            out_folder.write_configs(tmp, cfg, special)
        if verify_export:
            with stages.stage("verify"):
                reference = build_model(loaded, torch.float32)
                cfg.verify = verify(tmp, reference, precision=precision)
                del reference
            (tmp / contract.CONFIG_FILE).write_text(cfg.to_json())
        out_folder.finish(tmp)
    return ExportResult(out=out, config=cfg, seconds=stages.seconds)
