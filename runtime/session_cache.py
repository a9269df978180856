"""What ONNX Runtime lets us keep between runs: the optimized graph with its weights prepacked.

Opening a session optimizes the graph (constant folding, fusions, the tied head's Transpose)
and prepacks every MatMul/MatMulNBits weight into the CPU kernels' layout; for SmolLM2 fp32 that
is most of the 2-3 s a start takes. The first start of a folder on the CPU also writes the
result (`optimized_model_filepath`, the prepacked weights in its external data file:
"session.save_external_prepacked_constant_initializers") into the cache folder; later starts open
that graph with optimizations off and the prepacked weights read as they are.

    <cache>/sessions/<folder path hash>/key.json              what the entry was made for
                                        model.opt.onnx(.data)  the optimized graph and its weights

The entry is used only when key.json equals `cache_key`: the folder's manifest.json (its files'
hashes, so a re-export or an edited folder), the ONNX Runtime version and the CPU (prepacked
layouts depend on its instruction set). Anything else rebuilds it in place, one entry per folder;
entries of folders that are gone are pruned whenever one is written.
Only folders of at most MAX_DATA bytes are cached: for larger ones reading the entry (weights
and their prepacked copies, about 2.2x the data) costs what the optimizing saved or more. Measured
(BENCHMARKS.md): SmolLM2 fp32 (0.5 GB) starts 1.70x faster from its entry than without one; a
1B-parameter fp32 folder (3.6 GB) 1.06x with the files in the page cache and 0.86x (slower)
after the page cache was dropped, and a 7B entry would take ~60 GB of disk.
It is written in a temporary sibling and renamed, so a reader never sees half an entry. The caller
checks the folder's manifest first (Model.from_dir): a folder that fails it never gets this far.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import onnxruntime as ort

from . import contract
from .manifest import folder_key

MODEL, DATA, KEY = "model.opt.onnx", "model.opt.onnx.data", "key.json"


@lru_cache(maxsize=None)  # lookup and commit both need it; the CPU does not change under a process
def _cpu() -> str:
    """The CPU's model name and instruction-set flags (Linux), or the platform's processor name."""
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        return " ".join(info.get(k, "").strip() for k in ("model name", "flags"))
    except OSError:
        return platform.processor() or platform.machine()


def cache_key(folder: Path, provider: str) -> dict:
    """What an entry depends on: the folder's manifest, ONNX Runtime's version, the provider and CPU."""
    manifest = (folder / contract.MANIFEST_FILE).read_bytes()
    return {"folder": str(folder.resolve()), "manifest_sha256": hashlib.sha256(manifest).hexdigest(), "onnxruntime": ort.__version__,
            "provider": provider, "cpu_sha256": hashlib.sha256(_cpu().encode()).hexdigest()}


def sessions_dir() -> Path:
    from llama2_onnx.files import cache_dir

    return cache_dir() / "sessions"


def entry_dir(folder: Path) -> Path:
    return sessions_dir() / folder_key(folder)


def lookup(folder: Path, provider: str) -> Path | None:
    """The cached optimized model for folder, or None when there is none for this key."""
    entry = entry_dir(folder)
    try:
        if json.loads((entry / KEY).read_text()) == cache_key(folder, provider) and (entry / MODEL).is_file():
            return entry / MODEL
    except (OSError, ValueError):
        pass
    return None


MAX_DATA = 2 << 30  # larger folders are opened as they are (see the module docstring)


def data_size(folder: Path) -> int | None:
    """The bytes of the folder's files (model, weights, tokenizer); None where they cannot be read."""
    try:
        return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    except OSError:
        return None


# An entry holds the weights and their prepacked copies: about 2.2x the folder's data for SmolLM2
# fp32. Leave it unwritten unless the disk keeps this many times the data free besides.
ROOM_FACTOR = 4


def saving(opts: ort.SessionOptions, folder: Path, data: int) -> Path | None:
    """Set opts to write the optimized model of folder (data bytes: data_size) into a new temporary
    entry; returns its folder (commit it), or None (opts untouched) where the cache folder cannot be
    written or the disk lacks the room."""
    parent = entry_dir(folder).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(parent).free < ROOM_FACTOR * data:
            return None
        tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=parent))
    except OSError:
        return None
    opts.optimized_model_filepath = str(tmp / MODEL)
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA)
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    opts.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    return tmp


def commit(tmp: Path, folder: Path, provider: str) -> None:
    """Make tmp (written by a session opened with saving()) the folder's entry, replacing an old one."""
    entry = entry_dir(folder)
    try:
        if not (tmp / MODEL).is_file():
            return
        (tmp / KEY).write_text(json.dumps(cache_key(folder, provider)))
        old = entry.with_name(entry.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if entry.exists():
            os.replace(entry, old)
        os.replace(tmp, entry)
        shutil.rmtree(old, ignore_errors=True)
        prune(entry.parent)
    except OSError:  # another process won the race, or the disk is full: this run simply keeps no cache
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prune(sessions: Path) -> None:
    """Remove the entries of folders that no longer exist (temporary exports: tests, benchmarks)."""
    for key in sessions.glob("*/" + KEY):
        try:
            gone = not Path(json.loads(key.read_text())["folder"], contract.MANIFEST_FILE).is_file()
        except (OSError, ValueError, KeyError):
            gone = True
        if gone:
            shutil.rmtree(key.parent, ignore_errors=True)


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
