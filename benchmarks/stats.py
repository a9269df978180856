"""From raw timings to the reported figures. Pure functions, table-tested.

One measured repeat is a `Trace`: the time to first token (prompt pass + choosing the first
token) and the time of every later token. With batch B and N new tokens a repeat makes
B x N tokens, of which B x (N - 1) are decode tokens (the first comes from the prompt pass).

    decode_s          = sum(token_ms) / 1000                   per repeat
    decode_tokens/s   = B x (N - 1) / decode_s
    e2e_s             = ttft_s + decode_s
    e2e_tokens/s      = B x N / e2e_s
    bandwidth         = weight bytes x decode steps/s          (a step reads every weight once)

Across repeats each figure is given as median, min and max. Rates are derived from the
times' median/min/max (min rate = tokens / max time), so rate x time = tokens holds exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Trace:
    ttft_ms: float  # prompt pass + first token
    token_ms: list[float] = field(default_factory=list)  # each later token, in order
    tokens: list[int] = field(default_factory=list)  # row 0's new tokens
    foreign_cpu: float | None = None  # share of the CPU other processes took meanwhile (noise.py)

    def to_dict(self) -> dict:
        return {"ttft_ms": self.ttft_ms, "token_ms": self.token_ms, "tokens": self.tokens, "foreign_cpu": self.foreign_cpu}

    @classmethod
    def from_dict(cls, d: dict) -> "Trace":
        return cls(d["ttft_ms"], list(d["token_ms"]), list(d["tokens"]), d.get("foreign_cpu"))


def spread(values: list[float], digits: int = 3) -> dict:
    """{"median", "min", "max"} of values."""
    v = np.asarray(values, dtype=np.float64)
    return {"median": round(float(np.median(v)), digits), "min": round(float(v.min()), digits),
            "max": round(float(v.max()), digits)}


def rate(count: float, seconds: dict, digits: int = 2) -> dict:
    """count / seconds for a spread of seconds (the slowest time gives the min rate)."""
    if not count or not seconds["min"]:
        return {"median": None, "min": None, "max": None}
    return {"median": round(count / seconds["median"], digits), "min": round(count / seconds["max"], digits),
            "max": round(count / seconds["min"], digits)}


def summarize(traces: list[Trace], *, batch: int, new_tokens: int) -> dict:
    """The figures of one configuration from its measured repeats."""
    if not traces:
        raise ValueError("no measured repeats")
    decode_tokens = batch * (new_tokens - 1)
    ttft = spread([t.ttft_ms for t in traces])
    per_token_median = [float(np.median(t.token_ms)) if t.token_ms else 0.0 for t in traces]
    per_token_p90 = [float(np.percentile(t.token_ms, 90)) if t.token_ms else 0.0 for t in traces]
    # times in seconds are kept to 6 digits so rate x time reproduces the token count
    decode_s = spread([sum(t.token_ms) / 1000 for t in traces], digits=6)
    e2e_s = spread([(t.ttft_ms + sum(t.token_ms)) / 1000 for t in traces], digits=6)
    foreign = [t.foreign_cpu for t in traces if t.foreign_cpu is not None]
    return {
        "foreign_cpu": spread(foreign) if foreign else None,
        "ttft_ms": ttft,
        "decode_ms_per_token": {**spread(per_token_median), "p90": round(float(np.median(per_token_p90)), 3)},
        "decode_tokens": decode_tokens,
        "decode_s": decode_s,
        "decode_tokens_per_s": rate(decode_tokens, decode_s),
        "e2e_tokens": batch * new_tokens,
        "e2e_s": e2e_s,
        "e2e_tokens_per_s": rate(batch * new_tokens, e2e_s),
    }


def bandwidth(weight_bytes: int | None, decode_tokens_per_s: float | None, batch: int,
              machine_gb_s: float | None) -> tuple[float | None, float | None]:
    """(achieved GB/s, share of the machine's measured read bandwidth)."""
    if not weight_bytes or not decode_tokens_per_s:
        return None, None
    achieved = weight_bytes * decode_tokens_per_s / batch / 1e9  # steps/s x bytes per step
    share = achieved / machine_gb_s if machine_gb_s else None
    return round(achieved, 2), (round(share, 3) if share is not None else None)


def match(reference: list[int] | None, tokens: list[int] | None) -> tuple[bool | None, int | None]:
    """(all equal, length of the common prefix) of a peer's tokens against ours."""
    if reference is None or tokens is None:
        return None, None
    prefix = next((i for i, (a, b) in enumerate(zip(reference, tokens)) if a != b), min(len(reference), len(tokens)))
    return reference == tokens, prefix
