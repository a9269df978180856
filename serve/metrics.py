"""Prometheus metrics in the text exposition format, written by hand (no client library).

    metrics.request("/v1/completions", 200)
    metrics.ttft.observe(0.12)
    text = metrics.render(engine.stats())        # GET /metrics

Counters and histograms are updated on the event loop's thread only; the engine's gauges
(running, queued, free slots, ...) are read from Engine.stats() at scrape time.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter

PREFIX = "llama2_onnx"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip([*map(_num, self.buckets), "+Inf"], self.counts):
            total += n
            out.append(f'{name}_bucket{{le="{bound}"}} {total}')
        return out + [f"{name}_sum {_num(self.sum)}", f"{name}_count {total}"]


def _num(x: float) -> str:
    return repr(float(x)) if isinstance(x, float) else str(x)


class Metrics:
    def __init__(self):
        self.requests: Counter[tuple[str, int]] = Counter()  # (route, status) -> count
        self.prompt_tokens = 0
        self.cached_tokens = 0  # of prompt_tokens, reused from the KV cache rather than computed
        self.generated_tokens = 0
        self.finished: Counter[str] = Counter()  # finish reason -> count
        self.ttft = Histogram()  # seconds from admission to the first token
        self.token_latency = Histogram()  # seconds between a request's consecutive tokens

    def request(self, route: str, status: int) -> None:
        self.requests[(route, status)] += 1

    def finish(self, reason: str, prompt_tokens: int, completion_tokens: int, ttft_s: float,
               cached_tokens: int = 0) -> None:
        self.finished[reason] += 1
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached_tokens
        self.generated_tokens += completion_tokens
        if completion_tokens and ttft_s:  # a request the server ended (shutdown) has no measured TTFT
            self.ttft.observe(ttft_s)

    def render(self, stats: dict | None) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {PREFIX}_{name} {help_text}", f"# TYPE {PREFIX}_{name} {kind}"])
            lines.extend(f"{PREFIX}_{s}" for s in samples)

        family("requests_total", "counter", "HTTP requests answered, by route and status code",
               [f'requests_total{{route="{r}",status="{s}"}} {n}' for (r, s), n in sorted(self.requests.items())])
        family("finished_total", "counter", "generations finished, by reason",
               [f'finished_total{{reason="{r}"}} {n}' for r, n in sorted(self.finished.items())])
        family("prompt_tokens_total", "counter", "prompt tokens processed", [f"prompt_tokens_total {self.prompt_tokens}"])
        family("prompt_tokens_computed_total", "counter", "prompt tokens run through the model",
               [f"prompt_tokens_computed_total {self.prompt_tokens - self.cached_tokens}"])
        family("prompt_tokens_cached_total", "counter", "prompt tokens whose KV cache was reused (prefix cache)",
               [f"prompt_tokens_cached_total {self.cached_tokens}"])
        family("generation_tokens_total", "counter", "tokens generated", [f"generation_tokens_total {self.generated_tokens}"])
        family("time_to_first_token_seconds", "histogram", "time from admission to a request's first token",
               self.ttft.lines("time_to_first_token_seconds"))
        family("time_per_output_token_seconds", "histogram", "time between a request's consecutive tokens",
               self.token_latency.lines("time_per_output_token_seconds"))
        stats = stats or {}
        running, queued, rows = stats.get("running", 0), stats.get("queued", 0), stats.get("max_batch", 0)
        family("requests_running", "gauge", "requests in the decode batch", [f"requests_running {running}"])
        family("requests_queued", "gauge", "requests waiting for a row", [f"requests_queued {queued}"])
        family("batch_occupancy", "gauge", "running requests / batch rows",
               [f"batch_occupancy {_num(running / rows if rows else 0.0)}"])
        if stats.get("spec_rounds"):  # speculative decoding (--speculative)
            family("speculative_acceptance_ratio", "gauge", "drafted tokens the model kept / drafted",
                   [f"speculative_acceptance_ratio {_num(stats['spec_accepted'] / max(stats['spec_drafted'], 1))}"])
            family("speculative_tokens_per_round", "gauge", "tokens taken per speculative round (kept guesses + 1)",
                   [f"speculative_tokens_per_round {_num(stats['spec_tokens'] / stats['spec_rounds'])}"])
        for key, value in sorted(stats.items()):  # whatever else the engine reports
            if (key not in ("running", "queued") and re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", key)
                    and isinstance(value, (int, float)) and not isinstance(value, bool)):
                family(f"engine_{key}", "gauge", f"Engine.stats()[{key!r}]", [f"engine_{key} {_num(value)}"])
        return "\n".join(lines) + "\n"
