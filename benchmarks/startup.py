"""Start-up: the time from Model.from_dir to the first token, in a fresh process each time.

    python -m llama2_onnx.benchmarks.startup FOLDER THREADS CACHE SESSIONS_DIR < prompt ids (JSON)

Three starts, one process each, the folder's files in the OS page cache in all of them
(what a second start of an app sees; a start after a reboot also reads them from disk):
    off     the start-up cache not used (runtime/session_cache.py): optimize and prepack at load
    first   the folder's cache entry removed first: optimize, prepack and write the entry
    second  opened from that entry
With cold=True (`bench --startup cold`) two more starts follow with the OS page cache dropped
first (what a start after a reboot sees: the files read from disk): `cold-off` (no start-up
cache) and `cold-second` (opened from the entry). Dropping the page cache needs root on Linux
(/proc/sys/vm/drop_caches) and empties it for the whole machine; where it cannot be dropped
those starts report why.
Each reports from_dir (manifest check + session), the first token (a prompt pass of the
bench's prompt and the argmax) and their sum.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

STARTS = ("off", "first", "second")
COLD_STARTS = ("cold-off", "cold-second")
DROP_CACHES = "/proc/sys/vm/drop_caches"


def drop_page_cache() -> str | None:
    """Write dirty pages out and drop the OS page cache; None when done, else why not."""
    import os

    try:
        os.sync()
        with open(DROP_CACHES, "w") as f:
            f.write("1\n")
        return None
    except OSError as e:
        return f"the page cache cannot be dropped here ({DROP_CACHES}: {e.strerror}; it needs root on Linux)"


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


def measure_startup(folder: str, threads: int, ids: list[int], timeout_s: float = 600, cold: bool = False) -> dict:
    """{start: {"from_dir_s", "first_token_ms", "start_s", "startup"}} for each of STARTS (and
    COLD_STARTS with cold)."""
    from pathlib import Path

    from llama2_onnx.runtime import session_cache

    out = {}
    for start in STARTS + (COLD_STARTS if cold else ()):
        if start == "first":
            session_cache.discard(session_cache.entry_dir(Path(folder)))
        if start in COLD_STARTS and (why := drop_page_cache()) is not None:
            out[start] = {"error": why}
            continue
        # the child keeps its entries where this process looks for them (the tests move them)
        proc = subprocess.run([sys.executable, "-m", "llama2_onnx.benchmarks.startup", folder, str(threads),
                               "off" if start.endswith("off") else "on", str(session_cache.sessions_dir())],
                              input=json.dumps(ids), capture_output=True, text=True, timeout=timeout_s)
        lines = proc.stdout.strip().splitlines()
        out[start] = json.loads(lines[-1]) if proc.returncode == 0 and lines else \
            {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return out


def main(argv: list[str] | None = None) -> int:
    from pathlib import Path

    from llama2_onnx.runtime import session_cache

    folder, threads, cache, sessions = (argv if argv is not None else sys.argv[1:])[:4]
    session_cache.sessions_dir = lambda: Path(sessions)
    print(json.dumps(_one(folder, int(threads), cache == "on", json.loads(sys.stdin.read()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
