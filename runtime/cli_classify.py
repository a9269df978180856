"""`llama2-onnx classify`: label texts with an exported sequence classifier."""

from __future__ import annotations

import json

from llama2_onnx.errors import UserError

from .providers import CHOICES


def add_arguments(p) -> None:
    p.add_argument("model", help="a classifier's model folder (a LlamaForSequenceClassification checkpoint exported "
                                 "with `llama2-onnx export`)")
    p.add_argument("--text", action="append", required=True, help="a text to classify (repeatable)")
    p.add_argument("--top-k", type=int, default=1, help="labels to print per text, best first (default 1; 0: all)")
    p.add_argument("--truncate", action="store_true", help="cut texts longer than the model's context instead of refusing them")
    p.add_argument("--batch-size", type=int, default=8, help="texts per run (default 8)")
    p.add_argument("--provider", choices=CHOICES, default="auto", help="execution provider (default auto: CUDA, DirectML, then CPU)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    p.add_argument("--check-hashes", action="store_true", default=None,
                   help="verify every file's sha256 against the manifest (done anyway on a folder's first load)")
    p.add_argument("--json", action="store_true",
                   help='print one JSON list: per text {"text", "label", "score", "scores": {label: score}}')


def run(args) -> int:
    from .classifier import Classifier

    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be 0 (all labels) or more, got {args.top_k}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    clf = Classifier.from_dir(args.model, batch_size=args.batch_size, provider=args.provider, threads=args.threads,
                              check_hashes=args.check_hashes, huge_pages=False)
    results = clf.classify(args.text, truncation=args.truncate)
    if args.json:
        print(json.dumps([{"text": t, **r} for t, r in zip(args.text, results)], ensure_ascii=False))
        return 0
    for text, r in zip(args.text, results):
        ranked = sorted(r["scores"].items(), key=lambda kv: -kv[1])[: args.top_k or None]
        shown = text if len(text) <= 60 else text[:57] + "..."
        print("  ".join(f"{label} {score:.4f}" for label, score in ranked) + f"  {shown!r}")
    return 0
