"""Fair prefill: a short request and a running stream while a long prompt is read, on the engine.

    python -m llama2_onnx.benchmarks.fair_prefill_bench [--model DIR] [--long 4000] [--delay 0.5] [--json]

The scenario (greedy, no stop ids, the rows as long as the model's context):
  1. a stream S starts (a 32-token prompt, 600 new tokens); once it has 5 tokens,
  2. a long request L is submitted (a `--long`-token prompt, 1 new token);
  3. `--delay` seconds later a short request Q (a 4-token prompt, 4 new tokens).
Reported: Q's time to first token (and Q on an idle engine, for reference); L's; S's gaps between
tokens while L was being read (p50, max) against S's gap with nothing else running. The bound the
scheduler states (runtime/scheduler.py): Q's first token after at most MAX_SKIPS + 1 prompt runs
(after one when no reader is starved), S waits at most one prompt run between two tokens. A
measurement, not a test: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np

from llama2_onnx.benchmarks.machine import cpu_model
from llama2_onnx.benchmarks.prompts import TEXT
from llama2_onnx.runtime import Generator, SamplingParams
from llama2_onnx.runtime.engine import Engine, FinishEvent, GenRequest


class Watch:
    """on_event that stamps every event; done once the FinishEvent came."""

    def __init__(self):
        self.stamps, self.done, self.finish = [], threading.Event(), None

    def __call__(self, event) -> None:
        self.stamps.append(time.perf_counter())
        if isinstance(event, FinishEvent):
            self.finish = event
            self.done.set()


def submit(engine: Engine, prompt: tuple[int, ...], tokens: int) -> Watch:
    w = Watch()
    engine.submit(GenRequest(prompt, tokens, SamplingParams()), w)
    return w


def scenario(engine: Engine, text_ids: list[int], long: int, delay: float) -> dict:
    stream = submit(engine, tuple(text_ids[:32]), 600)
    while len(stream.stamps) < 5:
        time.sleep(0.001)
    long_at = time.perf_counter()
    reader = submit(engine, tuple(text_ids[100:100 + long]), 1)
    time.sleep(delay)
    short = submit(engine, tuple(text_ids[50:54]), 4)
    for w in (short, reader):
        assert w.done.wait(600), "no finish"
    long_read = reader.stamps[0]
    gaps = np.diff([t for t in stream.stamps if long_at <= t <= long_read])  # S's gaps while L was read
    stream.done.wait(600)
    return {"short_ttft_ms": round(short.finish.ttft_s * 1000, 1), "long_ttft_ms": round(reader.finish.ttft_s * 1000, 1),
            "stream_gap_p50_ms": round(float(np.median(gaps)) * 1000, 1) if len(gaps) else None,
            "stream_gap_max_ms": round(float(gaps.max()) * 1000, 1) if len(gaps) else None,
            "stream_tokens_while_long_read": int(len(gaps))}


def alone(engine: Engine, text_ids: list[int]) -> dict:
    short = submit(engine, tuple(text_ids[50:54]), 4)
    short.done.wait(60)
    stream = submit(engine, tuple(text_ids[:32]), 64)
    stream.done.wait(60)
    return {"short_ttft_alone_ms": round(short.finish.ttft_s * 1000, 1),
            "stream_gap_alone_ms": round(float(np.median(np.diff(stream.stamps[:-1]))) * 1000, 1)}


def main(argv=None) -> None:
    from llama2_onnx import assets

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the default model)")
    p.add_argument("--long", type=int, default=4000, help="the long prompt's tokens (default 4000)")
    p.add_argument("--delay", type=float, default=0.5, help="seconds between the long and the short request")
    p.add_argument("--prompt-chunk", type=int, default=None, help="default: the engine's")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    gen = Generator.from_dir(args.model or assets.default_model_dir(), threads=args.threads)
    gen.model.wait_for_huge_pages()
    engine = Engine(gen.model, gen.tokenizer, set(), max_batch=4, prompt_chunk=args.prompt_chunk)
    engine.start()
    text_ids = gen.tokenizer.encode(TEXT * (1 + 8 * args.long // max(len(TEXT), 1)), bos=False, eos=False)
    if len(text_ids) < args.long + 100:
        raise SystemExit(f"the benchmark text gives {len(text_ids)} tokens; --long {args.long} needs more")
    try:
        base = alone(engine, text_ids)
        runs = [scenario(engine, text_ids, args.long, args.delay) for _ in range(args.repeat)]
    finally:
        engine.close()
    out = {"cpu": cpu_model(), "model": str(gen.model.folder.name), "long": args.long, "delay_s": args.delay,
           "prompt_chunk": engine.prompt_chunk, **base, "runs": runs}
    if args.json:
        print(json.dumps(out))
        return
    print(f"{out['cpu']}; {out['model']}; long prompt {args.long} tokens, chunk {engine.prompt_chunk}")
    print(f"alone: short request TTFT {base['short_ttft_alone_ms']} ms, stream gap {base['stream_gap_alone_ms']} ms")
    for r in runs:
        print(f"with the long prompt: short TTFT {r['short_ttft_ms']} ms, long TTFT {r['long_ttft_ms']} ms, stream gap "
              f"p50 {r['stream_gap_p50_ms']} ms, max {r['stream_gap_max_ms']} ms ({r['stream_tokens_while_long_read']} tokens)")


if __name__ == "__main__":
    main()
