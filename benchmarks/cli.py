"""`llama2-onnx bench`: parse, then call run_benchmark; print the table, write JSON and a plot.

Torch-free at import: torch and the other peers load only inside the worker processes.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from llama2_onnx.errors import UserError
from llama2_onnx.runtime.speculate import DRAFT_TOKENS


def _peer_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def add_arguments(p) -> None:
    from llama2_onnx.runtime.providers import CHOICES

    from .harness import HUGE_PAGES_MODES, IO_BINDING_MODES, PEER_CHOICES, SWEEPABLE

    p.add_argument("model", nargs="?", default=None,
                   help="model folder written by `llama2-onnx export` (default: SmolLM2-135M-Instruct fp32, exported on first use)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to generate, at least 2 (default 128)")
    p.add_argument("--batch", type=int, default=1, help="sequences per batch, same prompt (default 1)")
    p.add_argument("--io-binding", choices=list(IO_BINDING_MODES), default="both",
                   help="run ours with I/O binding on, off or both (default both)")
    p.add_argument("--huge-pages", choices=list(HUGE_PAGES_MODES), default="on",
                   help="run ours with its weights moved into 2 MB pages (Linux CPU), not, or both (default on)")
    p.add_argument("--provider", choices=CHOICES, default="auto", help="execution provider (default auto)")
    p.add_argument("--threads", type=int, default=None, help="threads for every system (default: physical cores)")
    p.add_argument("--repeats", type=int, default=5, help="measured runs per configuration (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted runs first (default 1)")
    p.add_argument("--peers", type=_peer_list, default=[], metavar="LIST",
                   help=f"comma-separated systems to compare against: {', '.join(PEER_CHOICES)} (default none)")
    p.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2",
                   help=f"vary one setting ({', '.join(SWEEPABLE)}); repeatable: the product is run")
    p.add_argument("--checkpoint", default=None,
                   help="the checkpoint the folder was exported from, for the torch/transformers/genai-builder peers "
                        "(default: the path recorded in the folder's config.json)")
    p.add_argument("--builder-precision", choices=["fp32", "fp16", "int4"], default=None,
                   help="precision for the genai-builder peer's model (default: the folder's)")
    p.add_argument("--json", metavar="FILE", default=None, help="write the rows and machine info as JSON ('-' = stdout)")
    p.add_argument("--plot", metavar="FILE", default=None, help="write a PNG plot (needs matplotlib)")
    p.add_argument("--markdown", metavar="FILE", default=None, help="write the table as Markdown ('-' = stdout)")
    p.add_argument("--interleave", choices=["auto", "on", "off"], default="auto",
                   help="load every system at once and alternate their runs round by round (auto: when memory allows)")
    p.add_argument("--noise-limit", type=float, default=0.15,
                   help="rerun a repeat if other processes took more than this share of the CPU meanwhile (default 0.15)")
    p.add_argument("--retries", type=int, default=2, help="reruns allowed per noisy repeat (default 2; 0 = never)")
    p.add_argument("--in-process", action="store_true",
                   help="run every system in this process (faster start; peak memory figures are then not per system)")
    p.add_argument("--startup", choices=["on", "off", "cold"], default="on",
                   help="also time ours from Model.from_dir to the first token in fresh processes: without the start-up "
                        "cache, first start (writes it), second start (CPU; default on); cold: also without the cache "
                        "and from it after dropping the OS page cache (needs root; drops it for the whole machine)")
    p.add_argument("--bandwidth-mb", type=int, default=256, help="size of the memory read test (default 256 MB)")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per system and configuration")
    p.add_argument("--serve", action="store_true",
                   help="benchmark the HTTP server instead: closed loops of --clients concurrent streamed requests, "
                        "continuous batching against one request at a time (see benchmarks/serve_bench.py)")
    p.add_argument("--clients", default="1,4,8", metavar="LIST", help="--serve: concurrent clients (default 1,4,8)")
    p.add_argument("--requests", type=int, default=3, help="--serve: requests per client (default 3)")
    p.add_argument("--speculative", default=None, metavar="ngram|DRAFT_FOLDER",
                   help="benchmark speculative decoding instead: one stream, on against off, on an input-grounded "
                        "and open-ended prompts (decode tok/s, guesses kept, tokens per round; benchmarks/speculative_bench.py)")
    p.add_argument("--draft-tokens", type=int, default=DRAFT_TOKENS, metavar="K",
                   help=f"--speculative: guesses a round at most (default {DRAFT_TOKENS})")


def run(args) -> int:
    from .harness import parse_sweep, run_benchmark
    from .report import format_markdown, format_table, plot, write_json

    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if args.retries < 0 or not 0 <= args.noise_limit <= 1:
        raise UserError(f"--retries must be >= 0 and --noise-limit within 0..1 (got {args.retries}, {args.noise_limit})")
    if args.bandwidth_mb < 1:
        raise UserError(f"--bandwidth-mb must be at least 1, got {args.bandwidth_mb}")
    if args.serve:
        return _run_serve(args)
    if args.speculative is not None:
        return _run_speculative(args)
    model = Path(args.model) if args.model else _default_model()
    # with JSON or Markdown on stdout, the human output goes to stderr
    log_to = sys.stderr if "-" in (args.json, args.markdown) else sys.stdout
    result = run_benchmark(
        model=model, prompt_len=args.prompt_len, new_tokens=args.new_tokens, batch=args.batch,
        io_binding=args.io_binding, huge_pages=args.huge_pages, provider=args.provider, threads=args.threads,
        repeats=args.repeats, warmup=args.warmup, peers=args.peers, sweep=parse_sweep(args.sweep), checkpoint=args.checkpoint,
        builder_precision=args.builder_precision, isolate=not args.in_process, interleave=args.interleave,
        bandwidth_mb=args.bandwidth_mb, timeout_s=args.timeout, noise_limit=args.noise_limit, retries=args.retries,
        startup={"on": True, "off": False}.get(args.startup, args.startup), log=lambda line: print(line, file=log_to, flush=True),
    )
    result["command"] = "llama2-onnx bench " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else None
    print(file=log_to)
    print(format_table(result), file=log_to)
    if args.json:
        write_json(result, args.json)
    if args.markdown:
        text = format_markdown(result) + "\n"
        if args.markdown == "-":
            sys.stdout.write(text)
        else:
            Path(args.markdown).write_text(text)
    if args.plot:
        note = plot(result, args.plot)
        print(note or f"plot written to {args.plot}", file=log_to)
    return 0 if any(r["status"] == "ok" for r in result["rows"]) else 1


def _run_serve(args) -> int:
    import argparse

    from .serve_bench import format_markdown, parse_clients, run_serve_benchmark

    try:
        clients = parse_clients(args.clients)
    except argparse.ArgumentTypeError as e:
        raise UserError(str(e)) from None
    result = run_serve_benchmark(model=Path(args.model) if args.model else None, clients=clients,
                                 modes=["batching", "serial"], requests=args.requests, prompt_len=args.prompt_len,
                                 new_tokens=args.new_tokens, threads=args.threads)
    text = format_markdown(result)
    print(text)
    _write_json(result, args.json)
    if args.markdown and args.markdown != "-":
        Path(args.markdown).write_text(text + "\n")
    return 0


def _run_speculative(args) -> int:
    from .speculative_bench import format_text, run

    if args.draft_tokens < 1:
        raise UserError(f"--draft-tokens must be at least 1, got {args.draft_tokens}")
    draft = None
    if args.speculative != "ngram":
        draft = Path(args.speculative)
        if not draft.is_dir():
            raise UserError(f"--speculative takes ngram or a draft model folder; {args.speculative} is neither")
    model = Path(args.model) if args.model else _default_model()
    result = run(model, draft, max(args.new_tokens, 2), max(args.repeats, 1), draft_tokens=args.draft_tokens)
    print(format_text(result))
    _write_json(result, args.json)
    return 0


def _write_json(result: dict, target: str | None) -> None:
    """--json FILE: the result as JSON ('-': stdout)."""
    import json

    if target:
        data = json.dumps(result, indent=2)
        if target == "-":
            print(data)
        else:
            Path(target).write_text(data + "\n")


def _default_model() -> Path:
    from llama2_onnx.assets import default_model_dir

    return default_model_dir()
