"""Constrained decoding's cost: decode tok/s with a JSON schema against free text, alternated.

    python -m llama2_onnx.benchmarks.grammar_bench [MODEL] [--rounds 3] [--tokens 64]

Both runs are greedy, `--tokens` new tokens from the same chat prompt, on one Generator; the
constrained run's schema is one long string, so it lasts as long as the free one.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from .machine import cpu_model

SCHEMA = {"type": "object", "required": ["story"], "additionalProperties": False,
          "properties": {"story": {"type": "string", "minLength": 2000}}}
ASK = [{"role": "user", "content": "Write a long story about a lighthouse keeper, as JSON."}]


def main(argv: list[str] | None = None) -> int:
    from llama2_onnx.assets import default_model_dir
    from llama2_onnx.runtime import Generator

    p = argparse.ArgumentParser(prog="grammar_bench", description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    a = p.parse_args(argv)
    g = Generator.from_dir(a.model or default_model_dir(), provider="cpu")
    g.model.wait_for_huge_pages()
    fmt = {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
    g.chat(ASK, max_new_tokens=4, response_format=fmt)  # compiles the grammar and the llguidance tokenizer
    rates: dict[str, list[float]] = {"free": [], "json_schema": []}
    for _ in range(a.rounds):
        for kind in rates:
            r = g.chat(ASK, max_new_tokens=a.tokens, response_format=fmt if kind == "json_schema" else None,
                       stop=[] if kind == "json_schema" else ["\n\n\n"])
            rates[kind].append(r.timings.decode_tokens_per_s)
    free, constrained = (float(np.median(rates[k])) for k in ("free", "json_schema"))
    print(f"{cpu_model()}, {time.strftime('%Y-%m-%d')}: decode tok/s, median of {a.rounds} "
          f"(free {rates['free']}, json_schema {rates['json_schema']})")
    print(f"free {free:.1f} | json_schema {constrained:.1f} | ratio {constrained / free:.2f}")
    g.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
