"""Start-up: the time from Model.from_dir to the first token, in a fresh process each time.

    python -m llama2_onnx.benchmarks.startup FOLDER THREADS CACHE < prompt ids (JSON)

Three starts, one process each, the folder's files in the OS page cache in all of them
(what a second start of an app sees; a start after a reboot also reads them from disk):
    off     the start-up cache not used (runtime/session_cache.py): optimize and prepack at load
    first   the folder's cache entry removed first: optimize, prepack and write the entry
    second  opened from that entry
Each reports from_dir (manifest check + session), the first token (a prompt pass of the
bench's prompt and the argmax) and their sum.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

STARTS = ("off", "first", "second")


def _one(folder: str, threads: int, cache: bool, ids: list[int]) -> dict:
    import numpy as np

    from llama2_onnx.runtime.session import Model

    t0 = time.perf_counter()
    model = Model.from_dir(folder, provider="cpu", threads=threads, startup_cache=cache)
    t1 = time.perf_counter()
    prompt = np.asarray([ids], np.int64)
    cache_ = model.new_cache(np.ones_like(prompt), capacity=len(ids) + 1)
    int(model.step(prompt, np.ones_like(prompt), cache_).argmax())
    t2 = time.perf_counter()
    return {"from_dir_s": round(t1 - t0, 3), "first_token_ms": round(1000 * (t2 - t1), 1),
            "start_s": round(t2 - t0, 3), "startup": model.startup, "prompt_len": len(ids)}


def measure_startup(folder: str, threads: int, ids: list[int], timeout_s: float = 600) -> dict:
    """{start: {"from_dir_s", "first_token_ms", "start_s", "startup"}} for each of STARTS."""
    from pathlib import Path

    from llama2_onnx.runtime import session_cache

    out = {}
    for start in STARTS:
        if start == "first":
            session_cache.discard(session_cache.entry_dir(Path(folder)))
        proc = subprocess.run([sys.executable, "-m", "llama2_onnx.benchmarks.startup", folder, str(threads),
                               "off" if start == "off" else "on"], input=json.dumps(ids), capture_output=True,
                              text=True, timeout=timeout_s)
        lines = proc.stdout.strip().splitlines()
        out[start] = json.loads(lines[-1]) if proc.returncode == 0 and lines else \
            {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return out


def main(argv: list[str] | None = None) -> int:
    folder, threads, cache = (argv if argv is not None else sys.argv[1:])[:3]
    print(json.dumps(_one(folder, int(threads), cache == "on", json.loads(sys.stdin.read()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
