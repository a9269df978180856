"""Workers: each system loaded once, in its own process, running one timed generation per request.

    python -m llama2_onnx.benchmarks.worker JOB.json     (the parent talks to it over stdin/stdout)

A worker loads its system and answers one JSON line per command on stdin:
    (start)  {"load_s", "baseline_rss_mb", "detail", "weight_bytes"}   or {"error"}
    run      {"trace": {...}}                                          one greedy generation
    memory   {"peak_rss_mb", "device_memory_mb"}
Library chatter is sent to stderr: the worker keeps the real stdout for its answers only.

Why processes: the peak resident memory of a process is then its system's own (VmHWM on
Linux, over load, warm-up and repeats; interpreter and libraries included; `baseline_rss_mb`
is the same mark just before the system loads), and one system's thread pools and caches
cannot slow another. Why long-lived: the harness can interleave the repeats of all systems
round by round, so a noisy minute on a shared machine hits every system alike.

Device memory (CUDA only) is what the process holds on the GPU at the end, read with NVML
(pynvml) or nvidia-smi; ONNX Runtime's arena and torch's caching allocator keep their
high-water mark, so this is the peak in practice. None on CPU.

`LocalWorker` runs the same protocol inside this process (fast, for tests); its memory
figures then include everything the process did before.
"""

from __future__ import annotations

import json
import os
import resource
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .job import Job, Loaded
from .peers import PEERS
from .stats import Trace


class WorkerError(RuntimeError):
    """A worker failed to load or to run; the message is one line."""


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark.

    Linux: VmHWM from /proc/self/status, which starts afresh at exec. (getrusage's ru_maxrss
    does not: Linux carries it across exec, so a worker would report its parent's peak.)
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 2**10, 1)  # kB
    except OSError:
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB elsewhere


def device_memory_mb(provider: str) -> float | None:
    if provider != "cuda":
        return None
    pid = os.getpid()
    try:
        import pynvml

        pynvml.nvmlInit()
        total = 0
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            total += sum(p.usedGpuMemory or 0 for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid == pid)
        return round(total / 2**20, 1)
    except Exception:  # no pynvml, or NVML unusable: ask nvidia-smi
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = [float(m) for p, m in (line.split(",") for line in out.strip().splitlines() if "," in line) if int(p) == pid]
    return sum(used) if used else None


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _load(job: Job) -> tuple[Loaded, dict]:
    baseline = peak_rss_mb()
    t = time.perf_counter()
    loaded = PEERS[job.system].load(job)
    info = {"load_s": round(time.perf_counter() - t, 3), "baseline_rss_mb": baseline,
            "detail": loaded.detail, "weight_bytes": loaded.weight_bytes}
    return loaded, info


def _memory(job: Job) -> dict:
    return {"peak_rss_mb": peak_rss_mb(), "device_memory_mb": device_memory_mb(job.provider)}


class LocalWorker:
    """The worker protocol inside this process."""

    isolated = False

    def __init__(self, job: Job, timeout_s: float | None = None):
        self.job = job
        self.pid = os.getpid()
        self._loaded: Loaded | None = None

    def start(self) -> dict:
        try:
            self._loaded, info = _load(self.job)
        except Exception as e:  # one system failing must not end the benchmark
            raise WorkerError(one_line(e)) from None
        return info

    def run(self) -> Trace:
        try:
            return self._loaded.run()
        except Exception as e:
            raise WorkerError(one_line(e)) from None

    def memory(self) -> dict:
        return _memory(self.job)

    def close(self) -> None:
        self._loaded = None


class ProcessWorker:
    """The worker protocol in a fresh Python process."""

    isolated = True

    def __init__(self, job: Job, timeout_s: float | None = None):
        self.job, self.timeout_s = job, timeout_s
        self._tmp = tempfile.TemporaryDirectory(prefix="llama2-onnx-bench-")
        self._proc: subprocess.Popen | None = None

    def start(self) -> dict:
        job_file = Path(self._tmp.name) / "job.json"
        job_file.write_text(self.job.to_json())
        self._stderr = open(Path(self._tmp.name) / "stderr.txt", "w+")  # a file: a full pipe could block the worker
        # OpenMP-based libraries (torch) read these at start; the adapters also set threads explicitly
        env = {**os.environ, "OMP_NUM_THREADS": str(self.job.threads), "MKL_NUM_THREADS": str(self.job.threads)}
        self._proc = subprocess.Popen([sys.executable, "-m", "llama2_onnx.benchmarks.worker", str(job_file)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                      env=env, text=True)
        self.pid = self._proc.pid
        return self._answer()

    def run(self) -> Trace:
        return Trace.from_dict(self._ask("run")["trace"])

    def memory(self) -> dict:
        return self._ask("memory")

    def _ask(self, command: str) -> dict:
        try:
            self._proc.stdin.write(command + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerError(self._last_words()) from None
        return self._answer()

    def _answer(self) -> dict:
        ready, _, _ = select.select([self._proc.stdout], [], [], self.timeout_s)
        if not ready:
            self.close()
            raise WorkerError(f"timed out after {self.timeout_s:.0f} s")
        line = self._proc.stdout.readline()
        if not line:
            raise WorkerError(self._last_words())
        answer = json.loads(line)
        if "error" in answer:
            raise WorkerError(answer["error"])
        return answer

    def _last_words(self) -> str:
        self._proc.wait(timeout=30)
        self._stderr.seek(0)
        lines = [ln for ln in self._stderr.read().splitlines() if ln.strip()]
        return lines[-1] if lines else f"the worker exited with status {self._proc.returncode}"

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        if getattr(self, "_stderr", None):
            self._stderr.close()
        self._tmp.cleanup()


# ---- the worker process ------------------------------------------------------------------

COMMANDS = {
    "run": lambda loaded, job: {"trace": loaded.run().to_dict()},
    "memory": lambda loaded, job: _memory(job),
}


def main(argv: list[str] | None = None) -> int:
    (job_file,) = (argv if argv is not None else sys.argv[1:])[:1]
    answers = os.fdopen(os.dup(1), "w")  # our channel; fd 1 now goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def say(obj: dict) -> None:
        answers.write(json.dumps(obj) + "\n")
        answers.flush()

    job = Job.from_json(Path(job_file).read_text())
    try:
        loaded, info = _load(job)
    except Exception as e:
        say({"error": one_line(e)})
        return 1
    say(info)
    for line in sys.stdin:
        command = line.strip()
        try:
            say(COMMANDS[command](loaded, job))
        except Exception as e:
            say({"error": one_line(e)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
