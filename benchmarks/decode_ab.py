"""Decode steps of several models in one process, alternating: the same minute, the same memory
bus, so their ratio is not the host's noise between two runs.

    python -m llama2_onnx.benchmarks.decode_ab FOLDER [FOLDER ...] [--genai DIR] [--prompt-len 128]
                                              [--steps 64] [--rounds 8] [--threads 2]

Each round runs every system once: a prompt pass (not timed), then `--steps` greedy decode steps
(timed). FOLDERs are our model folders (Model.step, I/O binding); `--genai DIR` adds
onnxruntime-genai on a folder with a genai_config.json (the genai-builder peer's folder is under
~/.cache/llama2-onnx/genai-builder/*/model). Prints each system's median ms per step and its
speed against the first system.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

import numpy as np

from llama2_onnx.errors import UserError


def ours(folder: str, ids: np.ndarray, steps: int, threads: int) -> Callable[[], float]:
    from llama2_onnx.runtime.session import Model

    model = Model.from_dir(folder, provider="cpu", threads=threads)
    model.wait_for_huge_pages()
    mask, one = np.ones_like(ids), np.ones((1, 1), np.int64)

    def run() -> float:
        cache = model.new_cache(mask, capacity=ids.shape[1] + steps + 1)
        last = model.step(ids, mask, cache)
        t = time.perf_counter()
        for _ in range(steps):
            last = model.step(np.array([[int(last.argmax())]]), one, cache)
        return (time.perf_counter() - t) / steps * 1e3
    return run


def genai(folder: str, ids: np.ndarray, steps: int, threads: int) -> Callable[[], float]:
    import onnxruntime_genai as og

    config = og.Config(folder)
    config.clear_providers()
    opts = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": opts}}}))
    model = og.Model(config)
    total = ids.shape[1] + steps + 1

    def run() -> float:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=1)
        gen = og.Generator(model, params)
        gen.append_tokens(ids.astype(np.int32))
        gen.generate_next_token()  # the first token, from the prompt pass
        t = time.perf_counter()
        for _ in range(steps):
            gen.generate_next_token()
        return (time.perf_counter() - t) / steps * 1e3
    return run


def main(argv: list[str] | None = None) -> int:
    from llama2_onnx.runtime.providers import physical_cores

    p = argparse.ArgumentParser(prog="python -m llama2_onnx.benchmarks.decode_ab", description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="our model folders")
    p.add_argument("--genai", help="also onnxruntime-genai on this folder (with genai_config.json)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    args = p.parse_args(argv)
    if min(args.prompt_len, args.steps, args.rounds) < 1 or (args.threads is not None and args.threads < 1):
        p.error("--prompt-len, --steps, --rounds and --threads must be at least 1")
    threads = args.threads or physical_cores()
    ids = np.random.default_rng(0).integers(100, 10000, (1, args.prompt_len))
    try:
        systems = {f: ours(f, ids, args.steps, threads) for f in args.folders}
        if args.genai:
            systems[f"genai {args.genai}"] = genai(args.genai, ids, args.steps, threads)
    except UserError as e:
        print(f"decode_ab: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"decode_ab: error: {e.name or e} is not installed (--genai needs onnxruntime-genai: make setup)", file=sys.stderr)
        return 2
    except Exception as e:  # onnxruntime-genai's errors on a folder that is not its own
        print(f"decode_ab: error: {args.genai}: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    times: dict[str, list[float]] = {name: [] for name in systems}
    for _ in range(args.rounds):
        for name, run in systems.items():
            times[name].append(run())
    first = float(np.median(next(iter(times.values()))))
    for name, ms in times.items():
        med = float(np.median(ms))
        print(f"{med:7.2f} ms/step  {first / med:5.2f}x the first  [{min(ms):.2f}-{max(ms):.2f}]  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
