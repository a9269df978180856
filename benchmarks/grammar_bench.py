"""Constrained decoding's cost: decode tok/s with a JSON schema against free text, alternated.

    python -m llama2_onnx.benchmarks.grammar_bench [MODEL] [--rounds 3] [--tokens 64] [--rows 1,8]

Both runs are greedy, `--tokens` new tokens from the same chat prompt (each of `--rows` rows its own
question), on one Generator with as many rows; the constrained run's schema is one long string, so
it lasts as long as the free one. Reported: generated tokens/s over the decode steps (all rows), and
the ratio constrained / free.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from .machine import cpu_model

SCHEMA = {"type": "object", "required": ["story"], "additionalProperties": False,
          "properties": {"story": {"type": "string", "minLength": 2000}}}
ASK = [{"role": "user", "content": "Write a long story about a lighthouse keeper, as JSON."}]


def rate(g, asks: list[list[int]], tokens: int, fmt) -> float:
    from llama2_onnx.runtime import SamplingParams

    start = time.perf_counter()
    results = g.generate_ids(asks, tokens, SamplingParams(), response_format=fmt)
    ttft = max(r.timings.prompt_ms for r in results) / 1000
    return sum(len(r.tokens) for r in results) / (time.perf_counter() - start - ttft)


def main(argv: list[str] | None = None) -> int:
    from llama2_onnx.assets import default_model_dir
    from llama2_onnx.runtime import Generator

    p = argparse.ArgumentParser(prog="grammar_bench", description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rows", default="1,8")
    a = p.parse_args(argv)
    fmt = {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
    print(f"{cpu_model()}, {time.strftime('%Y-%m-%d')}: decode tok/s (all rows), median of {a.rounds}, alternated")
    for rows in [int(x) for x in a.rows.split(",")]:
        g = Generator.from_dir(a.model or default_model_dir(), provider="cpu", max_batch=rows, prefix_cache=False)
        g.model.wait_for_huge_pages()
        asks = [g.chat_ids([{"role": "user", "content": f"Story {k}: {ASK[0]['content']}"}]) for k in range(rows)]
        rate(g, asks, 4, fmt)  # compiles the grammar and the llguidance tokenizer
        rates: dict[str, list[float]] = {"free": [], "json_schema": []}
        for _ in range(a.rounds):
            for kind in rates:
                rates[kind].append(round(rate(g, asks, a.tokens, fmt if kind == "json_schema" else None), 1))
        free, constrained = (float(np.median(rates[k])) for k in ("free", "json_schema"))
        print(f"rows {rows}: free {free:.1f} {rates['free']} | json_schema {constrained:.1f} {rates['json_schema']} | "
              f"ratio {constrained / free:.2f}")
        g.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
