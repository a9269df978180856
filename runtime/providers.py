"""Execution providers: a registry from our short names to ONNX Runtime's, with the package each needs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import onnxruntime as ort

from llama2_onnx.errors import UserError


@dataclass(frozen=True)
class Provider:
    name: str  # ours: cpu, cuda, dml
    ort_name: str
    device: str  # OrtValue device type
    package: str  # what to pip install for it


PROVIDERS = {
    p.name: p
    for p in (
        Provider("cuda", "CUDAExecutionProvider", "cuda", "onnxruntime-gpu (pip install 'llama2-onnx[cuda]')"),
        Provider("dml", "DmlExecutionProvider", "dml", "onnxruntime-directml (Windows)"),
        Provider("cpu", "CPUExecutionProvider", "cpu", "onnxruntime"),
    )
}
AUTO_ORDER = ("cuda", "dml", "cpu")
CHOICES = ("auto", *PROVIDERS)


def resolve(name: str) -> Provider:
    """Our provider for name ('auto' = the first available of CUDA, DirectML, CPU)."""
    available = set(ort.get_available_providers())
    if name == "auto":
        return next(PROVIDERS[n] for n in AUTO_ORDER if PROVIDERS[n].ort_name in available)
    if name not in PROVIDERS:
        raise UserError(f"unknown provider {name!r}; choose one of {', '.join(CHOICES)}")
    p = PROVIDERS[name]
    if p.ort_name not in available:
        raise UserError(f"provider {name!r} is not available in this onnxruntime build; install {p.package}")
    return p


def physical_cores() -> int:
    """Physical cores (hyper-threads share a core's execution units, so they rarely help a decode)."""
    try:
        pairs = set()
        with open("/proc/cpuinfo") as f:
            phys = core = None
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    pairs.add((phys, core))
        if pairs:
            return len(pairs)
    except OSError:
        pass
    return os.cpu_count() or 1


def available_memory() -> int | None:
    """MemAvailable (free memory plus the page cache the kernel can drop), in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
