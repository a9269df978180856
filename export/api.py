"""export_model: checkpoint in, verified ONNX model folder out.

Two ways to the graph, the same I/O contract and numerics (tests/test_streaming.py):

    assemble (default)  export/graph.py writes the graph node by node, reading one tensor at a
                        time from the checkpoint (models.checkpoint.open_checkpoint): memory is
                        one layer's weights, whatever the model's size; both graph kinds, every
                        precision
    trace               torch.onnx.export of models/llama.py holding the whole model (portable
                        graph, fp32 and fp16): the reference the assembled graph is tested against
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llama2_onnx.errors import UserError
from llama2_onnx.models import checkpoint as ckpt
from llama2_onnx.models import gguf_vocab
from llama2_onnx.models.config import MAX_SEQ_LEN
from llama2_onnx.models.llama import Transformer
from llama2_onnx.runtime import contract, generation_config
from llama2_onnx.runtime.folder import PRECISIONS, FolderConfig
from llama2_onnx.runtime.generation_config import GenerationConfig

from . import folder as out_folder
from . import staging
from .graph import write_graph
from .precision import Int4Options, quantize_int4
from .progress import Stages
from .trace import DEFAULT_OPSET, MIN_OPSET, trace
from .verify import verify
from .verify_classifier import verify_classifier
from .verify_layers import fits_in_memory, verify_layers

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


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
    tied = checkpoint.args.tie_embeddings and not checkpoint.args.is_classifier  # a classifier has no vocabulary head
    if tied:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if tied:
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


def checkpoint_generation_config(checkpoint: Path) -> GenerationConfig:
    """The generation_config.json in a checkpoint folder (Hugging Face's; a Meta folder may hold one
    too), checked; an empty one for a file (GGUF) or a folder without it."""
    return GenerationConfig.read(checkpoint) if checkpoint.is_dir() else GenerationConfig()


def _add_bos(checkpoint: ckpt.Checkpoint, tokenizer: str | None) -> bool:
    """Whether plain prompts start with BOS: the GGUF vocabulary says so; SentencePiece Llama does."""
    if checkpoint.gguf_vocab is not None and "tokenizer.ggml.add_bos_token" in checkpoint.gguf_vocab:
        return bool(checkpoint.gguf_vocab["tokenizer.ggml.add_bos_token"])
    return tokenizer == gguf_vocab.SPM_FILE


def _default_chat_format(checkpoint: ckpt.Checkpoint, tokenizer: str | None) -> str | None:
    if checkpoint.chat_format:
        return checkpoint.chat_format
    return "llama2" if tokenizer == gguf_vocab.SPM_FILE else None


def torch_model(source: ckpt.LazyCheckpoint, dtype: torch.dtype) -> Transformer:
    """Our PyTorch decoder in dtype from an opened checkpoint, each tensor converted as it is read."""
    state = {n: source.read(n).to(dtype) for n in source.names}
    return build_model(ckpt.Checkpoint(args=source.args, state_dict=state, source=source.source, path=source.path), dtype)


def _quantization(int4: Int4Options | None, args) -> dict:
    """config.json's "quantization": the int4 recipe; a classifier's score head stays float32 (export/graph.py)."""
    if int4 is None:
        return {}
    d = int4.to_dict(args.n_layers)
    return {**d, "head": "float32 score"} if args.is_classifier else d


def _check_options(precision: str, graph: str, trace_graph: bool, opset: int, int4: Int4Options | None) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if graph not in contract.GRAPHS:
        raise UserError(f"--graph must be one of {', '.join(contract.GRAPHS)}, got {graph!r}")
    if not MIN_OPSET <= opset <= DEFAULT_OPSET:
        raise UserError(f"--opset must be between {MIN_OPSET} and {DEFAULT_OPSET}, got {opset}")
    if trace_graph and (graph != contract.GRAPH_PORTABLE or precision not in DTYPES):
        raise UserError("--trace writes the portable graph in fp32 or fp16; drop --trace for --graph ort or int4")


def export_model(
    *, checkpoint: str | Path, out: str | Path, precision: str = "fp32", graph: str = contract.GRAPH_PORTABLE,
    trace_graph: bool = False, max_seq_len: int | None = None, opset: int = DEFAULT_OPSET, overwrite: bool = False,
    verify_export: bool = True, tokenizer: str | Path | None = None, chat_format: str | None = None,
    progress: bool = True, int4: Int4Options | None = None,
) -> ExportResult:
    """Export a Meta, Hugging Face or GGUF Llama checkpoint to an ONNX model folder at out."""
    int4 = (int4 or Int4Options()) if precision == "int4" else None
    _check_options(precision, graph, trace_graph, opset, int4)
    out = Path(out)
    if max_seq_len is not None and not 1 <= max_seq_len <= MAX_SEQ_LEN:
        raise UserError(f"--max-seq-len must be from 1 to {MAX_SEQ_LEN}, got {max_seq_len}")
    protect = ckpt.checkpoint_paths(checkpoint)
    staging.check_out(out, overwrite, protect)  # fail before the slow work
    generation = checkpoint_generation_config(Path(checkpoint))
    hqq = int4 is not None and int4.algorithm == "hqq"  # fitted in a pass over the float32 graph
    names = ["load", "trace" if trace_graph else "write", *(["quantize"] if hqq else []), "save",
             *(["verify"] if verify_export else [])]
    stages = Stages(names, progress)

    with stages.stage("load"):
        source = ckpt.open_checkpoint(checkpoint)  # headers only: tensors are read when written
    with source:
        args = source.args
        if trace_graph and args.is_classifier:
            raise UserError("--trace writes causal language models only; drop --trace to export a sequence classifier")
        if max_seq_len is not None:
            args.max_seq_len = max_seq_len

        with staging.staging(out, overwrite, protect) as tmp:
            data_sha = None  # hashed by the manifest, unless the assembler hashed it while writing
            if trace_graph:
                with stages.stage("trace"):
                    model = torch_model(source, DTYPES[precision])
                    trace(model, tmp, opset=opset)
                    del model
            else:
                quant = int4.quant(args.n_layers) if int4 and not hqq else None
                with stages.stage("write", total=args.n_layers) as step:
                    data_sha = write_graph(args, source.read, tmp, graph=graph, precision="fp32" if hqq else precision,
                                quant=quant, opset=opset, on_layer=lambda i: step())
            if hqq:
                with stages.stage("quantize"):
                    quantize_int4(tmp, int4)
            with stages.stage("save"):
                tok_name, special = _tokenizer_files(source, tmp, Path(tokenizer) if tokenizer else None)
                if generation.given and not args.is_classifier:  # the checkpoint's sampling defaults, checked
                    (tmp / generation_config.FILE).write_text(generation.to_json())
                cfg = FolderConfig(
                    model=args, precision=precision, graph=graph, opset=opset,
                    chat_format=chat_format or _default_chat_format(source, tok_name),
                    quantization=_quantization(int4, args), tokenizer=tok_name or "", add_bos=_add_bos(source, tok_name),
                    source={"path": str(Path(checkpoint).resolve()), "format": source.source},
                    task=contract.TASK_CLASSIFICATION if args.is_classifier else contract.TASK_GENERATION,
                    labels=source.labels, problem_type=source.problem_type,
                )
                out_folder.write_configs(tmp, cfg, special)
            if verify_export:
                full = fits_in_memory(args, tmp)
                with stages.stage("verify", total=None if full else args.n_layers) as step:
                    if full:
                        reference = torch_model(source, torch.float32)
                        cfg.verify = (verify_classifier if args.is_classifier else verify)(tmp, reference)
                        del reference
                    else:
                        cfg.verify = verify_layers(source, cfg, on_layer=lambda i: step())
                (tmp / contract.CONFIG_FILE).write_text(cfg.to_json())
            out_folder.finish(tmp, {contract.DATA_FILE: data_sha} if data_sha and not hqq else None)
    return ExportResult(out=out, config=cfg, seconds=stages.seconds)
