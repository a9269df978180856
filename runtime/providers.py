"""Execution providers: a registry from our short names to ONNX Runtime's, with the package each needs.

A provider that is not in this onnxruntime build is an error naming the package to install.
One that is there but fails to start (no suitable GPU, a driver or DirectML build too old for
the graph) falls back to the CPU with a one-line note on stderr (open_with_fallback).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, TypeVar

import onnxruntime as ort

from llama2_onnx.errors import UserError


@dataclass(frozen=True)
class Provider:
    name: str  # ours: cpu, cuda, dml
    ort_name: str
    device: str  # OrtValue device type
    package: str  # what to pip install for it
    advice: str = ""  # added to the fallback note


PROVIDERS = {
    p.name: p
    for p in (
        Provider("cuda", "CUDAExecutionProvider", "cuda", "onnxruntime-gpu (pip install 'llama2-onnx[cuda]')"),
        Provider("dml", "DmlExecutionProvider", "dml",
                 "onnxruntime-directml in place of onnxruntime (Windows): pip uninstall -y onnxruntime, "
                 "then pip install 'llama2-onnx[directml]'",
                 advice="; an older DirectML build may need a model exported with --opset 18"),
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


T = TypeVar("T")


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def open_with_fallback(open_session: Callable[[Provider], T], provider: Provider,
                       used: Callable[[T], str], notify: Callable[[str], None] = note) -> tuple[T, Provider]:
    """open_session(provider), or open_session(cpu) with a one-line note when a non-CPU provider
    fails to start or ONNX Runtime quietly left it out (used(session): the first provider in use)."""
    cpu = PROVIDERS["cpu"]
    try:
        session = open_session(provider)
    except Exception as e:  # ORT raises its own types
        if provider is cpu:
            raise
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
    else:
        if provider is cpu or used(session) == provider.ort_name:
            return session, provider
        why = f"onnxruntime chose {used(session)}"
    notify(f"llama2-onnx: the {provider.name} provider did not start ({why[:200]}); running on the CPU{provider.advice}")
    return open_session(cpu), cpu


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
