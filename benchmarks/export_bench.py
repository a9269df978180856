"""Export time and peak memory against the time to copy the checkpoint's bytes.

    python -m llama2_onnx.benchmarks.export_bench CHECKPOINT [--precision fp16] [--graph portable]
                                                   [--verify] [--trace] [--no-copy] [--json FILE] [--keep OUT]

The export runs in a child process and its peak resident memory is that process's own
high-water mark (VmHWM, which counts touched pages of memory-mapped files too).
The copy time is `cp -r` of the checkpoint to a sibling folder (deleted afterwards); the page
cache is dropped before the copy and before the export when this process may
(/proc/sys/vm/drop_caches, root), so both start cold. Make the checkpoints with
`python -m llama2_onnx.benchmarks.make_checkpoint`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def drop_caches() -> bool:
    """Write back and drop the page cache; False where not permitted."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


# the export in a child that reports its own peak (VmHWM) as its last line on stderr
_EXPORT = (
    "import sys\n"
    "from llama2_onnx.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
    "print('VmHWM', int(peak) * 1024, file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def _child(argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    return time.perf_counter() - start, done


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama2_onnx.benchmarks.export_bench", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "int4"])
    p.add_argument("--graph", default="portable", choices=["portable", "ort"])
    p.add_argument("--verify", action="store_true", help="include the export's own check (default: --no-verify)")
    p.add_argument("--trace", action="store_true", help="export with --trace (torch.onnx, the whole model in memory)")
    p.add_argument("--no-copy", action="store_true", help="skip the copy-time reference")
    p.add_argument("--json", type=Path, default=None, help="append the result as one JSON line")
    p.add_argument("--keep", type=Path, default=None, help="write the model folder here and keep it")
    a = p.parse_args(argv)
    if not a.checkpoint.exists():
        print(f"error: {a.checkpoint} does not exist; make one with python -m llama2_onnx.benchmarks.make_checkpoint",
              file=sys.stderr)
        return 2
    size = folder_bytes(a.checkpoint)
    result = {"checkpoint": str(a.checkpoint), "checkpoint_bytes": size, "precision": a.precision, "graph": a.graph,
              "verify": a.verify, "trace": a.trace}
    scratch = Path(tempfile.mkdtemp(prefix=".export-bench-", dir=(a.keep or a.checkpoint).resolve().parent))
    try:
        if not a.no_copy:
            result["cold_cache"] = drop_caches()
            seconds, done = _child(["cp", "-r", str(a.checkpoint), str(scratch / "copy")])
            os.sync()
            if done.returncode:
                print(f"error: cp failed: {done.stderr.strip()}", file=sys.stderr)
                return 2
            result["copy_seconds"] = round(seconds, 2)
            shutil.rmtree(scratch / "copy")
        drop_caches()
        out = a.keep or scratch / "model"
        cmd = [sys.executable, "-c", _EXPORT, "export", str(a.checkpoint), str(out), "--precision", a.precision,
               "--graph", a.graph, "--quiet", "--json", "--overwrite", *([] if a.verify else ["--no-verify"]), *(["--trace"] if a.trace else [])]
        seconds, done = _child(cmd)
        lines = done.stderr.strip().splitlines()
        if done.returncode:
            print(next((l for l in reversed(lines) if not l.startswith("VmHWM")), "export failed"), file=sys.stderr)
            return done.returncode
        peak = int(lines[-1].split()[1])
        report = json.loads(done.stdout.strip().splitlines()[-1])
        result.update(export_seconds=round(seconds, 2), peak_rss_bytes=peak, onnx_bytes=folder_bytes(out),
                      stages=report["seconds"], check=report["verify"])
        if "copy_seconds" in result:
            result["time_vs_copy"] = round(result["export_seconds"] / result["copy_seconds"], 2)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    gb = 1e9
    print(f"{a.checkpoint.name}: {size / gb:.2f} GB -> {a.precision} {a.graph} {result['onnx_bytes'] / gb:.2f} GB in "
          f"{result['export_seconds']:.1f} s (copy {result.get('copy_seconds', float('nan')):.1f} s, "
          f"x{result.get('time_vs_copy', float('nan'))}), peak RSS {result['peak_rss_bytes'] / gb:.2f} GB")
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
