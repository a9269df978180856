"""One benchmark job: one system on one configuration. Sent to a worker process as JSON."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from .stats import Trace


@dataclass
class Job:
    system: str  # a key of peers.PEERS
    model_dir: str  # our model folder (the weights every peer shares)
    prompt_ids: list[int]  # one row; a batch repeats it
    new_tokens: int
    batch: int = 1
    threads: int = 1
    provider: str = "cpu"  # resolved: cpu, cuda or dml
    precision: str = "fp32"
    io_binding: bool | None = None  # ours only
    huge_pages: bool | None = None  # ours only: the weights moved into 2 MB pages after loading
    repeats: int = 5
    warmup: int = 1
    eos_ids: list[int] = field(default_factory=list)  # suppressed by every system so all make new_tokens tokens
    checkpoint: str | None = None  # the checkpoint our folder was exported from
    checkpoint_format: str | None = None  # meta, hf or gguf
    peer_dir: str | None = None  # a model folder of the peer's own (genai-builder)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Job":
        return cls(**json.loads(text))

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def label(self) -> str:
        if self.io_binding is None:
            return self.system
        pages = " huge-pages off" if self.huge_pages is False else ""
        return f"{self.system} io-binding {'on' if self.io_binding else 'off'}{pages}"


@dataclass
class Loaded:
    """A system ready to run: each call of run() is one timed greedy generation."""

    run: Callable[[], Trace]
    detail: str = ""  # what exactly ran (versions, attention kind, precision)
    weight_bytes: int | None = None  # the bytes a decode step reads, when the system knows them
    extra: dict[str, Any] = field(default_factory=dict)


def timed_greedy(prefill: Callable[[], Any], step: Callable[[Any], Any], new_tokens: int) -> Trace:
    """Time a greedy loop: prefill() runs the prompt and returns the first tokens [B];
    step(prev) feeds them and returns the next [B]. Both must return host values, so
    the clock stops only when the tokens are really there."""
    t0 = time.perf_counter_ns()
    nxt = prefill()
    t = time.perf_counter_ns()
    ttft_ms = (t - t0) / 1e6
    tokens, token_ms = [int(nxt[0])], []
    for _ in range(new_tokens - 1):
        nxt = step(nxt)
        now = time.perf_counter_ns()
        token_ms.append((now - t) / 1e6)
        t = now
        tokens.append(int(nxt[0]))
    return Trace(ttft_ms, token_ms, tokens)


def folder_weight_bytes(folder: str | Path) -> int | None:
    """Size of an ONNX folder's external weights (model.onnx.data or the builder's model.onnx.data)."""
    folder = Path(folder)
    data = [p for p in folder.glob("*.onnx.data")] or [p for p in folder.glob("*.data")]
    if data:
        return sum(p.stat().st_size for p in data)
    onnx = list(folder.glob("*.onnx"))
    return sum(p.stat().st_size for p in onnx) or None
