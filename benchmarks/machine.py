"""What machine a benchmark ran on, and how fast it can read memory.

The read-bandwidth probe is the ceiling for decode speed: a decode step reads every weight
once, so tokens/s x weight bytes cannot exceed it. Two quick tests, the best taken:

- NumPy: `threads` Python threads each take np.max over their slice of a 256 MB float32
  array (np.max is a vectorised, memory-bound loop that releases the GIL);
- ONNX Runtime: a [1, K] x [K, N] MatMul against a 256 MB float32 initializer with
  `threads` intra-op threads: the shape of a decode step's weight reads.

Each is run a few times and the fastest pass counts (the others saw a cold cache or a
preempted core); the harness probes before and after the runs and keeps the best.
Torch-free.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import threading
import time

import numpy as np

VERSIONED = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "torch", "transformers", "numpy", "llama2-onnx")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def versions() -> dict[str, str]:
    """Installed versions (package metadata only: nothing heavy is imported)."""
    found = {}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def machine_info(provider: str) -> dict:
    from llama2_onnx.runtime.providers import physical_cores

    v = versions()
    return {
        "cpu_model": cpu_model(),
        "physical_cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "memory_gb": memory_gb(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "ort_version": v.get("onnxruntime") or v.get("onnxruntime-gpu"),
        "provider": provider,
        "versions": v,
        "load_average": load_average(),
    }


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine makes every figure noisy."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


# ---- read bandwidth -------------------------------------------------------------------

def _best_rate(nbytes: int, run, passes: int) -> float:
    best = 0.0
    for _ in range(passes):
        t = time.perf_counter()
        run()
        best = max(best, nbytes / (time.perf_counter() - t))
    return best / 1e9


def numpy_read_gb_s(threads: int, mb: int = 256, passes: int = 5) -> float:
    a = np.ones(mb * 2**20 // 4, np.float32)
    chunks = np.array_split(a, threads)

    def run() -> None:
        workers = [threading.Thread(target=np.max, args=(c,)) for c in chunks]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    return _best_rate(a.nbytes, run, passes)


def ort_read_gb_s(threads: int, mb: int = 256, passes: int = 5) -> float:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k = 4096
    n = max(1, mb * 2**20 // 4 // k)
    w = np.random.default_rng(0).random((k, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "read_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    nbytes = w.nbytes
    del w, model, graph  # the session holds its own copy
    x = np.ones((1, k), np.float32)
    session.run(None, {"x": x})
    return _best_rate(nbytes, lambda: session.run(None, {"x": x}), passes)


# name -> probe(threads, mb): a registry so a probe that cannot run (no onnx package) is skipped
PROBES = {"numpy": numpy_read_gb_s, "ort": ort_read_gb_s}


def read_bandwidth(threads: int, mb: int = 256) -> dict:
    """{"numpy": GB/s, "ort": GB/s, "best": GB/s, "threads": n, "mb": size}; a probe that fails is None."""
    out: dict = {"threads": threads, "mb": mb}
    for name, probe in PROBES.items():
        try:
            out[name] = round(probe(threads, mb), 2)
        except ImportError:
            out[name] = None
    out["best"] = max((v for k, v in out.items() if k in PROBES and v), default=None)
    return out
