"""Arguments shared by `generate` and `chat`, and opening the model they name (or the default)."""

from __future__ import annotations

from pathlib import Path

from .prefix_cache import HOST_GB
from .providers import CHOICES
from .speculate import DRAFT_TOKENS


def add_model_arguments(p) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="model folder written by `llama2-onnx export` (default: SmolLM2-135M-Instruct, exported on first use)")
    p.add_argument("--provider", choices=CHOICES, default="auto", help="execution provider (default auto: CUDA, DirectML, then CPU)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    p.add_argument("--no-io-binding", action="store_true", help="feed NumPy arrays instead of keeping the KV cache on the device")
    p.add_argument("--no-huge-pages", action="store_true",
                   help="leave the weights in 4 KB pages (default on Linux CPUs: moved into 2 MB pages after loading, ~5%% faster decoding)")
    p.add_argument("--check-hashes", action="store_true", default=None,
                   help="verify every file's sha256 against the manifest (done anyway on a folder's first load)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="read every prompt whole (default: a prompt that begins as an earlier one, such as the "
                        "next turn of a chat, reuses the KV cache of that beginning)")
    p.add_argument("--speculative", default=None, metavar="ngram|DRAFT_FOLDER",
                   help="speculative decoding for a stream decoding alone: ngram (prompt lookup) or a smaller model "
                        "folder with the same tokenizer; the same output, faster where guesses hold (default off)")
    p.add_argument("--draft-tokens", type=int, default=DRAFT_TOKENS, metavar="K",
                   help=f"with --speculative: guesses a round at most, fewer where they fail (default {DRAFT_TOKENS})")
    p.add_argument("--prefix-cache-gb", type=float, default=HOST_GB, metavar="GB",
                   help=f"host memory for cached prefixes that lost their row of the KV cache (default {HOST_GB:g})")


def add_sampling_arguments(p, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"default {max_new_tokens}")
    # left out: the model folder's generation_config.json (sampled where it says do_sample), else greedy
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: the model folder's generation_config.json, else greedy)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1] (default: the folder's, else 1)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens; 0 = off (default: the folder's, else 0)")
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats (default: the folder's, else 1)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop when this text is produced (repeatable)")


def sampling_kwargs(args) -> dict:
    """The generate/chat keyword arguments of the sampling options, checked before any model is opened."""
    from .generator import stop_strings
    from .sampler import SamplingParams, make_rng

    make_rng(args.seed)
    given = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty)
    SamplingParams(**{k: v for k, v in given.items() if v is not None})  # the values given are checked here
    stop_strings(args.stop)
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)


def model_folder(args) -> Path:
    """The MODEL argument's folder, or the default model's (exported on first use)."""
    return Path(args.model) if args.model else default_model()


def open_generator(args):
    from .generator import Generator

    if args.threads is not None and args.threads < 1:
        from llama2_onnx.errors import UserError

        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if not args.prefix_cache_gb >= 0:
        from llama2_onnx.errors import UserError

        raise UserError(f"--prefix-cache-gb must be >= 0, got {args.prefix_cache_gb}")
    check_speculative(args)
    return Generator.from_dir(model_folder(args), provider=args.provider, threads=args.threads,
                              io_binding=not args.no_io_binding, check_hashes=args.check_hashes,
                              huge_pages=not args.no_huge_pages, max_batch=getattr(args, "max_batch", None),
                              prefix_cache=not args.no_prefix_cache, prefix_cache_gb=args.prefix_cache_gb,
                              speculative=args.speculative, draft_tokens=args.draft_tokens)


def check_speculative(args) -> None:
    """--speculative and --draft-tokens, before any model is opened."""
    from llama2_onnx.errors import UserError

    if args.draft_tokens < 1:
        raise UserError(f"--draft-tokens must be at least 1, got {args.draft_tokens}")
    if args.speculative not in (None, "ngram") and not Path(args.speculative).is_dir():
        raise UserError(f"--speculative takes ngram or a draft model folder; {args.speculative} is neither")


def default_model() -> Path:
    """The default model's folder (exported on first use); in the desktop app, the one next to it first."""
    from llama2_onnx import frozen
    from llama2_onnx.assets import default_model_dir

    return frozen.bundled_model() or default_model_dir()
