"""How the systems of one configuration take turns.

Interleaved (the default when memory allows): every system is loaded in its own worker,
then each round runs one generation of every system, warm-up rounds first; the order
rotates each round so no system always follows the same neighbour. Drift on a shared
machine (another job starting, the CPU clocking down) then falls on all systems alike.

One after another: load a system, warm it up, run its repeats, unload, next. Only one
copy of the weights is in memory at a time, for models too big to hold several.
"""

from __future__ import annotations

from typing import Callable

from llama2_onnx.runtime.providers import available_memory

from .job import Job
from .noise import NoiseMeter
from .worker import LocalWorker, ProcessWorker, WorkerError

INTERLEAVE = ("auto", "on", "off")


def should_interleave(mode: str, memory_factors: list[float], weight_bytes: int | None,
                      log: Callable[[str], None]) -> bool:
    """auto: interleave when every system fits in memory at once (factor x weight bytes each, 80% of available)."""
    if mode != "auto":
        return mode == "on"
    free = available_memory()
    need = sum(memory_factors) * (weight_bytes or 0)
    if free is not None and need > 0.8 * free:
        log(f"note: {len(memory_factors)} systems at once may need {need / 2**30:.1f} GiB of the "
            f"{free / 2**30:.1f} GiB available: running them one after another (--interleave on to force)")
        return False
    return True


def measure(jobs: list[Job], *, warmup: int, repeats: int, interleave: bool, isolate: bool,
            timeout_s: float | None = None, noise_limit: float = 0.15, retries: int = 2,
            log: Callable[[str], None] = lambda line: None) -> list[dict]:
    """Per job: {"traces": [...], "reruns": n, load info, memory} or {"error": one line}.

    A measured repeat during which other processes took more than noise_limit of the CPU
    is run again, up to `retries` times; the last attempt counts either way."""
    worker_cls = ProcessWorker if isolate else LocalWorker
    results: list[dict] = [{} for _ in jobs]
    groups = [list(range(len(jobs)))] if interleave else [[i] for i in range(len(jobs))]
    for group in groups:
        workers = {}
        for i in group:
            log(f"  loading {jobs[i].label} ...")
            w = worker_cls(jobs[i], timeout_s)
            try:
                results[i] = {**w.start(), "traces": [], "reruns": 0}
                workers[i] = w
            except WorkerError as e:
                results[i] = {"error": str(e)}
                w.close()
        try:
            _rounds(workers, results, warmup, repeats, noise_limit, retries, log)
            for i, w in workers.items():
                results[i].update(w.memory())
        finally:
            for w in workers.values():
                w.close()
    return results


def _rounds(workers: dict, results: list[dict], warmup: int, repeats: int, noise_limit: float, retries: int,
            log: Callable[[str], None]) -> None:
    for r in range(warmup + repeats):
        if workers:
            log(f"  {'warm-up' if r < warmup else 'measured'} round {r + 1 if r < warmup else r - warmup + 1} "
                f"of {warmup if r < warmup else repeats}: {len(workers)} system(s)")
        order = list(workers)
        k = r % len(order) if order else 0
        for i in order[k:] + order[:k]:
            try:
                trace = _run_quietly(workers[i], retries if r >= warmup else 0, noise_limit, results[i])
            except WorkerError as e:
                results[i] = {"error": str(e)}
                workers.pop(i).close()
                continue
            if r >= warmup:  # warm-up rounds are not counted
                results[i]["traces"].append(trace.to_dict())


def _run_quietly(worker, retries: int, noise_limit: float, result: dict):
    for attempt in range(retries + 1):
        meter = NoiseMeter(worker.pid)
        trace = worker.run()
        trace.foreign_cpu = meter.stop()
        if trace.foreign_cpu is None or trace.foreign_cpu <= noise_limit or attempt == retries:
            return trace
        result["reruns"] += 1
