"""Engine throughput without HTTP: N closed-loop clients straight on runtime.engine.Engine.

    python -m llama2_onnx.benchmarks.serve_engine_bench [--model DIR] [--clients 1,4,8]
        [--prompt 128] [--tokens 128] [--requests-per-client 2] [--max-batch 8] [--json]

Each client submits a request (a fresh ~128-token window of the benchmark text, greedy,
`--tokens` new tokens; stop tokens are switched off so every request runs to its length), waits
for its FinishEvent, and submits the next. Reported per client count: aggregate generated
tokens/s over the wall time, time to first token p50/p99, gap between a request's tokens
p50/p99, the speed-up over one client, and the decode-only rate of as many rows (the slots
stepping with no prompt passes: what the engine would reach if prompts cost nothing).
A measurement, not a test: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import numpy as np

from llama2_onnx.benchmarks.machine import cpu_model
from llama2_onnx.benchmarks.prompts import TEXT
from llama2_onnx.benchmarks.serve_bench import parse_clients
from llama2_onnx.runtime import Generator, SamplingParams
from llama2_onnx.runtime.engine import Engine, FinishEvent, GenRequest


def windows(tokenizer, length: int, count: int, add_bos: bool, bos_id: int) -> list[tuple[int, ...]]:
    """count different prompts of `length` tokens: windows of the text at different offsets."""
    ids = tokenizer.encode(TEXT * 2, bos=False, eos=False)
    body = length - int(add_bos)
    step = max(1, (len(ids) - body) // max(count, 1))
    return [tuple(([bos_id] if add_bos else []) + ids[i * step % (len(ids) - body):][:body]) for i in range(count)]


def run_clients(engine: Engine, prompts: list[tuple[int, ...]], clients: int, per_client: int, tokens: int) -> dict:
    ttft, gaps, generated = [], [], [0]
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(per_client):
            done, stamps = threading.Event(), []

            def on_event(e) -> None:
                stamps.append(time.perf_counter())
                if isinstance(e, FinishEvent):
                    with lock:
                        ttft.append(e.ttft_s)
                        gaps.extend(np.diff(stamps[:-1]).tolist())  # between tokens, the finish left out
                        generated[0] += e.completion_tokens
                    done.set()

            engine.submit(GenRequest(prompts[(c * per_client + r) % len(prompts)], tokens, SamplingParams()), on_event)
            done.wait()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = lambda xs, q: round(float(np.percentile(xs, q)) * 1000, 1) if len(xs) else None  # noqa: E731
    return {"clients": clients, "requests": clients * per_client, "generated_tokens": generated[0],
            "wall_s": round(wall, 2), "tokens_per_s": round(generated[0] / wall, 2),
            "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99),
            "token_gap_p50_ms": ms(gaps, 50), "token_gap_p99_ms": ms(gaps, 99)}


def decode_rate(slots, rows: int, prompt: tuple[int, ...], steps: int = 32) -> float:
    """Tokens/s of plain decode steps over `rows` busy slots (no prompts, no scheduler): the ceiling."""
    for r in range(rows):
        slots.free(r)
        slots.prefill(r, prompt)
    busy, tokens = list(range(rows)), [prompt[-1]] * rows
    slots.decode(busy, tokens)
    start = time.perf_counter()
    for _ in range(steps):
        slots.decode(busy, tokens)
    rate = rows * steps / (time.perf_counter() - start)
    for r in busy:
        slots.free(r)
    return round(rate, 2)


def main(argv=None) -> None:
    from llama2_onnx import assets

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the default model)")
    p.add_argument("--clients", type=parse_clients, default=[1, 4, 8], help="concurrent clients, comma-separated (default 1,4,8)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--prompt-chunk", type=int, default=None, help="default: the engine's (the model's prompt chunk)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    gen = Generator.from_dir(args.model or assets.default_model_dir(), threads=args.threads)
    gen.model.wait_for_huge_pages()
    cfg = gen.model.config
    # no stop ids: every request runs to --tokens; the rows hold the model's whole context, as the server's do
    engine = Engine(gen.model, gen.tokenizer, set(), max_batch=args.max_batch, prompt_chunk=args.prompt_chunk)
    engine.start()
    counts = args.clients
    prompts = windows(gen.tokenizer, args.prompt, max(counts) * args.requests_per_client, cfg.add_bos, cfg.model.bos_id)
    run_clients(engine, prompts, 1, 1, 16)  # warm-up
    rows = [run_clients(engine, prompts, n, args.requests_per_client, args.tokens) for n in counts]
    engine.close()
    for r in rows:  # the same rows decoding with no prompts to read and no scheduler: the ceiling
        r["decode_only_tokens_per_s"] = decode_rate(engine.slots, min(r["clients"], args.max_batch), prompts[0])
    base = rows[0] if counts[0] == 1 else None
    for r in rows:
        r["speedup"] = round(r["tokens_per_s"] / base["tokens_per_s"], 2) if base else None
        r["decode_only_speedup"] = round(r["decode_only_tokens_per_s"] / base["decode_only_tokens_per_s"], 2) if base else None
    if args.json:
        print(json.dumps({"cpu": cpu_model(), "model": str(gen.model.folder), "rows": rows}, indent=2))
        return
    print(f"{cpu_model()}  {gen.model.folder.name}  prompt {args.prompt}, {args.tokens} new tokens, "
          f"{args.requests_per_client} requests per client, max_batch {args.max_batch}")
    print(f"{'clients':>7} {'tok/s':>8} {'x1':>5} {'ttft p50':>9} {'ttft p99':>9} {'gap p50':>8} {'gap p99':>8}"
          f"  {'decode-only tok/s':>17} {'x1':>5}")
    for r in rows:
        print(f"{r['clients']:>7} {r['tokens_per_s']:>8} {r['speedup'] or '':>5} {r['ttft_p50_ms']:>9} "
              f"{r['ttft_p99_ms']:>9} {r['token_gap_p50_ms']:>8} {r['token_gap_p99_ms']:>8}"
              f"  {r['decode_only_tokens_per_s']:>17} {r['decode_only_speedup'] or '':>5}")
    print("(times in ms; decode-only: the same rows stepping with no prompt passes, the engine's ceiling)")


if __name__ == "__main__":
    main()
