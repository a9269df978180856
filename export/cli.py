"""`llama2-onnx export`: parse, then call export_model. Imports torch only when run."""

from __future__ import annotations

import json


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="a Meta folder (params.json + consolidated.NN.pth), a Hugging Face folder "
                                      "(config.json + safetensors), or a .gguf file")
    p.add_argument("out", help="the model folder to write")
    p.add_argument("--precision", choices=["fp32", "fp16", "int4"], default="fp32",
                   help="fp32 (default); fp16 (weights and KV cache; norms, rotary and softmax stay float32); "
                        "int4 (weight-only MatMulNBits, float32 activations and KV cache)")
    p.add_argument("--graph", choices=["portable", "ort"], default="portable",
                   help="portable (default): plain ONNX ops, runs in any ONNX runtime; ort: ONNX Runtime's fused "
                        "kernels (GroupQueryAttention with a shared KV buffer, packed QKV, SkipSimplifiedLayerNorm), "
                        "the fastest on ONNX Runtime and onnxruntime-genai")
    p.add_argument("--trace", action="store_true",
                   help="trace models/llama.py with torch.onnx instead of assembling the graph layer by layer "
                        "(portable graph, fp32/fp16; holds the whole model in memory)")
    p.add_argument("--block-size", type=int, default=32, help="int4: weights per scale, 16-256 (default 32)")
    p.add_argument("--accuracy-level", type=int, default=4,
                   help="int4: MatMulNBits compute type, 0-4 (default 4: int8 activations, fastest on x86)")
    p.add_argument("--int4-algorithm", choices=["rtn", "mse", "hqq"], default="rtn",
                   help="int4: rtn rounds to nearest (default); mse searches each block's scale for the least "
                        "error (slower export); hqq fits float zero points (best quality, slow on ONNX Runtime CPU)")
    p.add_argument("--int4-recipe", choices=["quality", "speed"], default="quality",
                   help="int4: quality (default) keeps the output head, every feed_forward.w2 and the first and "
                        "last layers at 8 bits; speed makes them 4-bit too (faster, perplexity further from fp32)")
    p.add_argument("--max-seq-len", type=int, default=None, help="context length to record (default: the checkpoint's)")
    p.add_argument("--opset", type=int, default=23, help="ONNX opset, 18-23 (default 23)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model or tokenizer.json to use when none is beside the weights")
    p.add_argument("--chat-format", choices=["llama2", "chatml"], default=None,
                   help="chat format to record (default: from the checkpoint; llama2 for a SentencePiece vocabulary)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX-vs-PyTorch check")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args) -> int:
    from llama2_onnx.runtime import contract

    from .api import export_model  # torch is imported here, not at --help
    from .precision import Int4Options

    result = export_model(
        checkpoint=args.checkpoint, out=args.out, precision=args.precision, graph=args.graph,
        trace_graph=args.trace, max_seq_len=args.max_seq_len,
        opset=args.opset, overwrite=args.overwrite, verify_export=not args.no_verify,
        tokenizer=args.tokenizer, chat_format=args.chat_format, progress=not args.quiet,
        int4=Int4Options(args.block_size, args.accuracy_level, args.int4_algorithm, args.int4_recipe) if args.precision == "int4" else None,
    )
    v = result.config.verify
    if args.json:
        print(json.dumps({"out": str(result.out), "precision": args.precision, "seconds": result.seconds, "verify": v}))
        return 0
    print(f"wrote {result.out} ({args.precision})")
    if v.get("mode") == "layers":
        print(f"verify: {v['layers']} layers one at a time, max |diff| from PyTorch {v['max_abs_diff']:.2e} "
              f"(layer {v['worst_layer']}); the whole model did not fit in memory twice")
    elif v.get("task") == contract.TASK_CLASSIFICATION:
        print(f"verify: max |logit diff| {v['max_abs_logit_diff']:.2e}, label agreement {v['label_agreement']:.1%} "
              f"over {v['sentences']} sentences (PyTorch fp32)")
    elif v:
        print(f"verify: max |logit diff| {v['max_abs_logit_diff']:.2e}, top-1 agreement {v['top1_agreement']:.1%}, "
              f"greedy {v['greedy_agreement']}/{v['greedy_tokens']} tokens, perplexity {v['perplexity']:.3f} "
              f"(PyTorch fp32 {v['reference_perplexity']:.3f}) over {v['prompt_tokens']} tokens")
    return 0
