"""Serving benchmark: a closed loop of N concurrent clients through real HTTP on 127.0.0.1.

    llama2-onnx bench [MODEL] --serve --clients 1,4,8 [--new-tokens 128] [--prompt-len 128]
    python -m llama2_onnx.benchmarks.serve_bench [MODEL] --clients 1,4,8

For each server mode it starts `llama2-onnx serve` in its own process on a free port and,
for each client count N, runs N clients that each send `--requests` streamed completions
back to back (a fresh ~prompt-len-token prompt each time, `max_tokens` = new tokens,
temperature 0.8 with a seed so no two streams are alike and few end early). Reported per
(mode, N): aggregate generated tokens/s over the loop's wall time, time to first token
p50/p99, per-token latency p50/p99 (the gaps between streamed tokens).

Modes: `batching` (continuous batching, --max-batch 8) and `serial` (--max-batch 1: one
request at a time, what Foundry Local does today). Both are the same server binary, so the
ratio isolates the scheduler. `no-prefix-cache` is `batching` with `--no-prefix-cache` (its
prompts share nothing, so it shows what prefix reuse costs where it cannot help). `ray1` and `ray2` are the same app on Ray Serve
(`serve --ray --replicas N`, the `ray` extra; a local Ray instance, --threads per replica,
by default the cores shared among the replicas); the added time per request is ray1 against
batching at 1 client (`ray_overhead`). Every loop is bounded in count and time; the server is stopped
even when a client fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llama2_onnx.errors import UserError

from .machine import cpu_model
from .prompts import TEXT

MODES = {"batching": 8, "serial": 1, "ray1": 8, "ray2": 8, "no-prefix-cache": 8}  # mode -> --max-batch
MODE_ARGS = {"no-prefix-cache": ["--no-prefix-cache"]}  # mode -> more `serve` arguments
RAY_REPLICAS = {"ray1": 1, "ray2": 2}  # mode -> `serve --ray --replicas N`


@dataclass
class LoopResult:
    mode: str
    clients: int
    requests: int
    generated_tokens: int
    seconds: float
    ttft_ms: list[float] = field(default_factory=list)
    token_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None

    def summary(self) -> dict:
        pct = lambda xs, q: round(float(np.percentile(xs, q)), 1) if xs else None  # noqa: E731
        return {"mode": self.mode, "clients": self.clients, "requests": self.requests, "errors": self.errors,
                "generated_tokens": self.generated_tokens, "seconds": round(self.seconds, 2),
                "tokens_per_s": round(self.generated_tokens / self.seconds, 2) if self.seconds else 0.0,
                "first_error": self.first_error,
                "ttft_p50_ms": pct(self.ttft_ms, 50), "ttft_p99_ms": pct(self.ttft_ms, 99),
                "token_p50_ms": pct(self.token_ms, 50), "token_p99_ms": pct(self.token_ms, 99)}


def prompt_text(n: int, words: int) -> str:
    """A distinct prompt per request: the text rotated to start at a different word."""
    w = TEXT.split()
    start = (n * 37) % len(w)
    body = (w[start:] + w[:start]) * 2
    return f"Letter {n}. " + " ".join(body[:words])


# ---- the server process ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`llama2-onnx serve` in a child process on 127.0.0.1; stopped on exit from the with block."""

    def __init__(self, model: Path | None, max_batch: int, threads: int | None, startup_s: float = 300,
                 replicas: int | None = None, extra: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "llama2_onnx.cli", "serve", *([str(model)] if model else []),
                    "--host", "127.0.0.1", "--port", str(self.port), "--max-batch", str(max_batch), "--max-queue", "256",
                    *(["--threads", str(threads)] if threads else []),
                    *(["--ray", "--replicas", str(replicas)] if replicas else []), *extra]
        self.startup_s = startup_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProcess":
        import httpx

        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
                raise UserError(f"the server exited while starting: {err[-1] if err else self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.__exit__()
        raise UserError(f"the server did not answer /health within {self.startup_s:.0f} s")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            # the server alone first: with --ray it stops Serve and its Ray instance (in its group) itself
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        if self.proc:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # whatever is left of the group
            except ProcessLookupError:
                pass
            self.proc.wait()


# ---- the clients -----------------------------------------------------------------------


async def _one_request(client, url: str, model: str, n: int, words: int, new_tokens: int, result: LoopResult) -> None:
    body = {"model": model, "prompt": prompt_text(n, words), "max_tokens": new_tokens, "temperature": 0.8,
            "seed": n, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    last = None
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            result.errors += 1
            result.first_error = result.first_error or f"{resp.status_code} {(await resp.aread()).decode(errors='replace')[:200]}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                result.generated_tokens += chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                now = time.perf_counter()
                if last is None:
                    result.ttft_ms.append((now - start) * 1000)
                else:
                    result.token_ms.append((now - last) * 1000)
                last = now
    result.requests += 1


async def closed_loop(url: str, mode: str, clients: int, requests: int, words: int, new_tokens: int,
                      timeout_s: float) -> LoopResult:
    import httpx

    result = LoopResult(mode=mode, clients=clients, requests=0, generated_tokens=0, seconds=0.0)
    counter = iter(range(10**6))

    async def client_loop(client) -> None:
        for _ in range(requests):
            await _one_request(client, url, model, next(counter), words, new_tokens, result)

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s)) as client:
        model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]
        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client_loop(client) for _ in range(clients))), timeout_s)
        result.seconds = time.perf_counter() - start
    return result


def run_serve_benchmark(*, model: Path | None, clients: list[int], modes: list[str], requests: int, prompt_len: int,
                        new_tokens: int, threads: int | None, timeout_s: float = 900, log=print) -> dict:
    """Each mode's server once, each client count against it after one warm-up request."""
    if not clients or min(clients) < 1 or max(clients) > 64:
        raise UserError(f"--clients must be counts from 1 to 64, got {clients}")
    if requests < 1 or new_tokens < 2 or prompt_len < 8:
        raise UserError("--requests must be >= 1, --new-tokens >= 2 and --prompt-len >= 8")
    words = max(1, int(prompt_len * 0.75))  # ~0.75 English words per token in these vocabularies
    rows, route_ms = [], {}
    for mode in modes:
        with ServerProcess(model, MODES[mode], threads, replicas=RAY_REPLICAS.get(mode),
                           extra=tuple(MODE_ARGS.get(mode, ()))) as server:
            asyncio.run(closed_loop(server.url, mode, 1, 1, words, 8, timeout_s))  # warm-up
            route_ms[mode] = round(route_latency_ms(server.url), 2)
            for n in clients:
                r = asyncio.run(closed_loop(server.url, mode, n, requests, words, new_tokens, timeout_s))
                rows.append(r.summary())
                log(format_row(rows[-1]))
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "prompt_len": prompt_len, "new_tokens": new_tokens,
            "requests_per_client": requests, "threads": threads, "rows": rows, "ratios": ratios(rows),
            "route_ms": route_ms, "ray_overhead": ray_overhead(rows, route_ms)}


def route_latency_ms(url: str, n: int = 100) -> float:
    """p50 of n sequential GET /v1/models: one request's way through the server, no model work."""
    import httpx

    times = []
    with httpx.Client(timeout=30) as client:
        for _ in range(n):
            start = time.perf_counter()
            client.get(url + "/v1/models").raise_for_status()
            times.append((time.perf_counter() - start) * 1000)
    return float(np.percentile(times, 50))


def ray_overhead(rows: list[dict], route_ms: dict) -> dict:
    """What Ray Serve adds to a request: each ray mode against `batching` (a model-free request's
    p50, and a lone streamed completion's time to first token and per-token gap)."""
    lone = {r["mode"]: r for r in rows if r["clients"] == 1}
    plain = lone.get("batching")
    if plain is None:
        return {}
    diff = lambda r, k: round(r[k] - plain[k], 1) if r[k] is not None and plain[k] is not None else None  # noqa: E731
    return {mode: {"route_ms_added": round(route_ms[mode] - route_ms["batching"], 2),
                   "ttft_p50_ms_added": diff(r, "ttft_p50_ms"), "token_p50_ms_added": diff(r, "token_p50_ms"),
                   "tokens_per_s_x": round(r["tokens_per_s"] / plain["tokens_per_s"], 3) if plain["tokens_per_s"] else None}
            for mode, r in lone.items() if mode in RAY_REPLICAS}


def ratios(rows: list[dict]) -> dict:
    """Aggregate tokens/s at N clients over 1 client, and p99 TTFT over a lone request's, per mode."""
    out = {}
    for mode in {r["mode"] for r in rows}:
        mine = {r["clients"]: r for r in rows if r["mode"] == mode}
        if 1 in mine and mine[1]["tokens_per_s"]:
            one = mine[1]
            out[mode] = {n: {"throughput_x": round(r["tokens_per_s"] / one["tokens_per_s"], 2),
                             "ttft_p99_x": round(r["ttft_p99_ms"] / one["ttft_p50_ms"], 2) if r["ttft_p99_ms"] and one["ttft_p50_ms"] else None}
                         for n, r in sorted(mine.items())}
    return out


def format_row(r: dict) -> str:
    return (f"{r['mode']:>8} {r['clients']:>3} clients: {r['tokens_per_s']:7.1f} tok/s  TTFT p50/p99 "
            f"{r['ttft_p50_ms']}/{r['ttft_p99_ms']} ms  token p50/p99 {r['token_p50_ms']}/{r['token_p99_ms']} ms"
            f"  ({r['requests']} requests, {r['errors']} errors{': ' + r['first_error'] if r['first_error'] else ''})")


def format_markdown(result: dict) -> str:
    lines = [f"CPU: {result['cpu']} ({result['cores']} cores); prompt ~{result['prompt_len']} tokens, "
             f"{result['new_tokens']} new tokens, {result['requests_per_client']} requests per client", "",
             "| server | clients | tok/s | x 1 client | TTFT p50 ms | TTFT p99 ms | p99 TTFT / lone | token p50 ms | token p99 ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        x = result["ratios"].get(r["mode"], {}).get(r["clients"], {})
        lines.append(f"| {r['mode']} | {r['clients']} | {r['tokens_per_s']} | {x.get('throughput_x')} | {r['ttft_p50_ms']} | "
                     f"{r['ttft_p99_ms']} | {x.get('ttft_p99_x')} | {r['token_p50_ms']} | {r['token_p99_ms']} |")
    for mode, o in result.get("ray_overhead", {}).items():
        lines.append(f"\n{mode} against batching: GET /v1/models {o['route_ms_added']} ms more (p50); at 1 client, time to "
                     f"first token {o['ttft_p50_ms_added']} ms more (p50), per token {o['token_p50_ms_added']} ms more (p50), "
                     f"{o['tokens_per_s_x']}x the tokens/s")
    return "\n".join(lines)


def parse_clients(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--clients takes comma-separated counts such as 1,4,8, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama2_onnx.benchmarks.serve_bench", description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None, help="model folder (default: the default model)")
    p.add_argument("--clients", type=parse_clients, default=[1, 4, 8], help="concurrent clients, comma-separated (default 1,4,8)")
    p.add_argument("--modes", default="batching,serial",
                   help=f"comma-separated, from {', '.join(MODES)} (default batching,serial; ray1/ray2 need the ray extra)")
    p.add_argument("--requests", type=int, default=3, help="requests per client (default 3)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the result as JSON")
    p.add_argument("--markdown", default=None, help="write the table as Markdown ('-' = stdout)")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    try:
        if bad := [m for m in modes if m not in MODES]:
            raise UserError(f"--modes takes {', '.join(MODES)}, got {', '.join(bad)}")
        result = run_serve_benchmark(model=Path(args.model) if args.model else None, clients=args.clients, modes=modes,
                                     requests=args.requests, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                     threads=args.threads)
    except UserError as e:
        print(f"serve_bench: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    md = format_markdown(result)
    if args.markdown == "-":
        print(md)
    elif args.markdown:
        Path(args.markdown).write_text(md + "\n")
    else:
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
