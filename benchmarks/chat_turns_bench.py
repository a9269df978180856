"""Chat turns: one client, one conversation, the time to first token turn after turn, with prefix reuse
and without it (`--no-prefix-cache`), through `llama2-onnx serve` over real HTTP on 127.0.0.1.

    python -m llama2_onnx.benchmarks.chat_turns_bench [MODEL] [--turns 8] [--new-tokens 48] [--repeat 2] [--json]
    python -m llama2_onnx.benchmarks.chat_turns_bench [MODEL] --clients 8 --system-tokens 500 [--turns 2]

Each turn sends the whole conversation so far (as the chat page, LangChain and every OpenAI client
do) plus a new user message, streamed, greedy, `--new-tokens` tokens at most, and records the time
to the first streamed token and usage's prompt_tokens / cached_tokens. The servers run one after
another, in the order on, off, on, off ... (`--repeat` pairs), each with the same threads.

With `--clients N` (> 1), N conversations run at once, each starting with the same system prompt of
about `--system-tokens` tokens (`benchmarks/prompts.py`'s text) and a question of its own: reported
are every turn's TTFT (p50, max) and the aggregate generated tokens/s, on against off, and the
first turns' TTFT p50 against that of one conversation alone (its first row in the sequential mode).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .machine import cpu_model
from .serve_bench import ServerProcess

QUESTIONS = ["Tell me about the city of Paris.", "What are its most famous museums?", "And what about its food?",
             "How do I get around the city?", "Which neighbourhoods should I visit?", "What is the best season to go?",
             "Is it expensive to stay there?", "Give me a one-day plan."]


def conversation(url: str, turns: int, new_tokens: int, system: str | None = None, offset: int = 0) -> list[dict]:
    import httpx

    messages, out = ([{"role": "system", "content": system}] if system else []), []
    with httpx.Client(timeout=300) as client:
        model = client.get(url + "/v1/models").json()["data"][0]["id"]
        for k in range(turns):
            messages.append({"role": "user", "content": QUESTIONS[(k + offset) % len(QUESTIONS)]})
            body = {"model": model, "messages": messages, "max_tokens": new_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            start, first, text, usage = time.perf_counter(), None, "", {}
            with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices", []):
                        piece = choice.get("delta", {}).get("content") or ""
                        if piece and first is None:
                            first = time.perf_counter()
                        text += piece
            messages.append({"role": "assistant", "content": text})
            details = usage.get("prompt_tokens_details") or {}
            out.append({"ttft_ms": round(((first or time.perf_counter()) - start) * 1000, 1),
                        "prompt_tokens": usage.get("prompt_tokens"), "cached_tokens": details.get("cached_tokens", 0),
                        "completion_tokens": usage.get("completion_tokens", 0), "text": text})
    return out


def run(model: Path | None, turns: int, new_tokens: int, repeat: int, threads: int | None) -> dict:
    runs = []
    for _ in range(repeat):
        for cache in (True, False):
            server = ServerProcess(model, max_batch=4, threads=threads)
            if not cache:
                server.cmd.append("--no-prefix-cache")
            with server:
                runs.append({"prefix_cache": cache, "turns": conversation(server.url, turns, new_tokens)})
    same = all(r["turns"][k]["text"] == runs[0]["turns"][k]["text"] for r in runs for k in range(turns))
    summary = {}
    for cache in (True, False):
        ttft = np.array([[t["ttft_ms"] for t in r["turns"]] for r in runs if r["prefix_cache"] == cache])
        summary["on" if cache else "off"] = {"ttft_ms_median_per_turn": np.median(ttft, axis=0).round(1).tolist()}
    last = turns - 1
    summary["last_turn_ratio_off_over_on"] = round(summary["off"]["ttft_ms_median_per_turn"][last]
                                                   / summary["on"]["ttft_ms_median_per_turn"][last], 2)
    return {"cpu": cpu_model(), "date": time.strftime("%Y-%m-%d"), "turns": turns, "new_tokens": new_tokens,
            "same_text_on_and_off": same, "summary": summary,
            "prompt_tokens": [t["prompt_tokens"] for t in runs[0]["turns"]],
            "cached_tokens": [t["cached_tokens"] for t in runs[0]["turns"]], "runs": runs}


def run_shared(model: Path | None, clients: int, system_tokens: int, turns: int, new_tokens: int, repeat: int,
               threads: int | None) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from .prompts import TEXT

    system = "You answer questions about travel. Background notes: " + " ".join(TEXT.split()[:int(system_tokens * 0.75)])
    rows = []
    for _ in range(repeat):
        for cache in (True, False):
            server = ServerProcess(model, max_batch=max(clients, 1), threads=threads)
            if not cache:
                server.cmd.append("--no-prefix-cache")
            with server:
                start = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    talks = list(pool.map(lambda i: conversation(server.url, turns, new_tokens, system, i), range(clients)))
                seconds = time.perf_counter() - start
            ttft = [t["ttft_ms"] for talk in talks for t in talk]
            first = [talk[0]["ttft_ms"] for talk in talks]
            rows.append({"prefix_cache": cache, "ttft_p50_ms": round(float(np.median(ttft)), 1), "ttft_max_ms": max(ttft),
                         "first_turn_ttft_p50_ms": round(float(np.median(first)), 1),
                         "tokens_per_s": round(sum(t["completion_tokens"] for talk in talks for t in talk) / seconds, 1),
                         "prompt_tokens": talks[0][0]["prompt_tokens"],
                         "cached_tokens": [t["cached_tokens"] for talk in talks for t in talk]})
    return {"cpu": cpu_model(), "date": time.strftime("%Y-%m-%d"), "clients": clients, "turns": turns,
            "system_tokens": rows[0]["prompt_tokens"], "new_tokens": new_tokens, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="chat_turns_bench", description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", type=Path, default=None, help="model folder (default: the default model)")
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeat", type=int, default=2, help="pairs of servers (on, off) run one after another")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clients", type=int, default=1, help="conversations at once, sharing a system prompt (default 1)")
    p.add_argument("--system-tokens", type=int, default=500, help="with --clients > 1: the shared system prompt's size")
    p.add_argument("--shared", action="store_true", help="the shared-system-prompt run even with --clients 1")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.clients > 1 or a.shared:
        shared = run_shared(a.model, a.clients, a.system_tokens, a.turns, a.new_tokens, a.repeat, a.threads)
        if a.json:
            print(json.dumps(shared, indent=1))
            return 0
        print(f"{shared['cpu']}, {shared['date']}: {a.clients} conversations at once, a shared system prompt "
              f"({shared['system_tokens']} prompt tokens in the first turn), {a.turns} turns each")
        print("reuse | TTFT p50 ms | TTFT max ms | first turns' TTFT p50 ms | tok/s")
        for r in shared["rows"]:
            print(f"{'on' if r['prefix_cache'] else 'off'} | {r['ttft_p50_ms']} | {r['ttft_max_ms']} | "
                  f"{r['first_turn_ttft_p50_ms']} | {r['tokens_per_s']}")
        return 0
    result = run(a.model, a.turns, a.new_tokens, a.repeat, a.threads)
    if a.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{result['cpu']}, {result['date']}: one conversation, {a.turns} turns, {a.new_tokens} new tokens each")
    print("turn | prompt tokens | cached | TTFT ms, reuse on | off")
    on, off = (result["summary"][k]["ttft_ms_median_per_turn"] for k in ("on", "off"))
    for k in range(a.turns):
        print(f"{k + 1} | {result['prompt_tokens'][k]} | {result['cached_tokens'][k]} | {on[k]} | {off[k]}")
    print(f"last turn: off / on = {result['summary']['last_turn_ratio_off_over_on']}x; "
          f"same text on and off: {result['same_text_on_and_off']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
