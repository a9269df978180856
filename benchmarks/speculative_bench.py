"""Speculative decoding against plain decoding, one stream at a time (the desktop case), in one run.

    python -m llama2_onnx.benchmarks.speculative_bench [MODEL] [--draft FOLDER | --draft-layers 8]
                                                       [--new-tokens 256] [--rounds 2] [--json]

Two kinds of task, greedy: an input-grounded one (rewrite a given ~500-token text, as editing and
summarising do: the answer reuses the input's spans) and open-ended prompts (nothing to copy). Each
runs with speculation off, with prompt lookup (`ngram`) and, where a draft folder is given or built,
with a draft model, the modes alternated round by round in one process. Reported: decode tok/s
(after the first token) per mode and its ratio to plain decoding, the guesses kept / drafted and
tokens per round, and whether every answer equals plain decoding's token for token.

--draft-layers N builds a stand-in draft from the default model itself: its first N layers with its
embeddings, final norm and head (no smaller SmolLM2 with its vocabulary is on PyPI here), exported
once into the cache. It is a stand-in, named as such in the output.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .machine import cpu_model
from .prompts import TEXT

OPEN = ["Write a short story about a dragon who is afraid of the dark.",
        "Explain how rainbows form, for a ten-year-old.",
        "What are the pros and cons of working from home?"]


def grounded_prompt(words: int = 380) -> str:
    text = " ".join(TEXT.split()[:words])
    return f"Rewrite the following text in your own words, keeping every point it makes:\n\n{text}"


def stand_in_draft(layers: int) -> Path:
    """The default model's first `layers` layers (embeddings, final norm and head kept), exported once."""
    from llama2_onnx import assets
    from llama2_onnx.export.api import export_model
    from llama2_onnx.files import cache_dir
    from llama2_onnx.models import checkpoint as ckpt
    from llama2_onnx.models import writers

    out = cache_dir() / "models" / f"SmolLM2-135M-Instruct-first{layers}-ort-fp32"
    if (out / "manifest.json").is_file():
        return out
    target = assets.default_model_dir()
    with ckpt.open_checkpoint(assets.smollm2_gguf()) as src, tempfile.TemporaryDirectory() as tmp:
        args = dataclasses.replace(src.args, n_layers=layers)
        keep = [n for n in src.names if not n.startswith("layers.") or int(n.split(".")[1]) < layers]
        writers.write_hf({n: src.read(n).float() for n in keep}, args, tmp)
        shutil.copyfile(target / "tokenizer.json", Path(tmp) / "tokenizer.json")  # the same bytes: the same tokenizer
        export_model(checkpoint=tmp, out=out, graph="ort", progress=False)
    return out


def run(model: Path, draft: Path | None, new_tokens: int, rounds: int, draft_tokens: int = 8,
        always: bool = False) -> dict:
    """always: speculate every round whatever it costs (the adaptive rule off), to see what guesses are worth."""
    from llama2_onnx.runtime import Generator, SamplingParams, speculate

    if always:
        speculate.MARGIN = 0.0
    gens = {"off": Generator.from_dir(model),
            "ngram": Generator.from_dir(model, speculative="ngram", draft_tokens=draft_tokens)}
    if draft is not None:
        gens["draft"] = Generator.from_dir(model, speculative=str(draft), draft_tokens=draft_tokens)
    tasks = {"grounded": [grounded_prompt()], "open": OPEN}
    rates = {(t, m): [] for t in tasks for m in gens}
    same = {m: True for m in gens}
    spec = {(t, m): [0, 0, 0, 0] for t in tasks for m in gens}  # rounds, drafted, accepted, tokens
    want: dict[str, list[int]] = {}
    try:
        for gen in gens.values():  # a first run pays for page faults and ORT's first-run work: not measured
            gen.generate_ids([gen.chat_ids([{"role": "user", "content": "Hello!"}])], 16, SamplingParams())
        for _ in range(rounds):
            for task, prompts in tasks.items():
                for mode, gen in gens.items():
                    for prompt in prompts:
                        ids = gen.chat_ids([{"role": "user", "content": prompt}])
                        before = gen.engine.stats()
                        r = gen.generate_ids([ids], new_tokens, SamplingParams())[0]
                        after = gen.engine.stats()
                        rates[task, mode].append(r.timings.decode_tokens_per_s)
                        for i, key in enumerate(("spec_rounds", "spec_drafted", "spec_accepted", "spec_tokens")):
                            spec[task, mode][i] += after.get(key, 0) - before.get(key, 0)
                        if mode == "off":
                            want.setdefault(prompt, r.tokens)
                        same[mode] &= r.tokens == want.setdefault(prompt, r.tokens)
    finally:
        for gen in gens.values():
            gen.close()
    rows = []
    for task in tasks:
        base = float(np.median(rates[task, "off"]))
        for mode in gens:
            n_rounds, drafted, accepted, tokens = spec[task, mode]
            rows.append({"task": task, "mode": mode, "decode_tok_s": round(float(np.median(rates[task, mode])), 1),
                         "ratio": round(float(np.median(rates[task, mode])) / base, 2),
                         "kept/drafted": round(accepted / drafted, 2) if drafted else None,
                         "tokens/round": round(tokens / n_rounds, 2) if n_rounds else None})
    return {"cpu": cpu_model(), "model": str(model), "draft": str(draft) if draft else None, "new_tokens": new_tokens,
            "rounds": rounds, "always": always, "rows": rows, "same_as_plain": same}


def format_text(result: dict, stand_in: bool = False) -> str:
    draft = Path(result["draft"]).name if result["draft"] else None
    lines = [f"{result['cpu']}: {Path(result['model']).name}, greedy, {result['new_tokens']} new tokens, median of "
             f"{result['rounds']} rounds" + (f"; draft {draft}" + (" (a stand-in: the model's first layers)" if stand_in else "")
                                             if draft else "") + ("; adaptive rule off" if result["always"] else ""),
             "task | mode | decode tok/s | vs off | kept/drafted | tokens/round"]
    for r in result["rows"]:
        lines.append(f"{r['task']} | {r['mode']} | {r['decode_tok_s']} | {r['ratio']}x | {r['kept/drafted']} | {r['tokens/round']}")
    lines.append("same tokens as plain decoding: " + ", ".join(
        f"{m} {'yes' if ok else 'NO'}" for m, ok in result["same_as_plain"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="speculative_bench", description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", type=Path, default=None, help="model folder (default: the default model)")
    p.add_argument("--draft", type=Path, default=None, help="a draft model folder with the same tokenizer")
    p.add_argument("--draft-layers", type=int, default=None,
                   help="build a stand-in draft: the default model's first N layers")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--draft-tokens", type=int, default=8)
    p.add_argument("--always", action="store_true", help="speculate every round (the adaptive rule off)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.model is None:
        from llama2_onnx import assets

        args.model = assets.default_model_dir()
    draft = args.draft or (stand_in_draft(args.draft_layers) if args.draft_layers else None)
    result = run(args.model, draft, args.new_tokens, args.rounds, args.draft_tokens, args.always)
    print(json.dumps(result, indent=2) if args.json else format_text(result, stand_in=bool(args.draft_layers)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
