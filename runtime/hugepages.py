"""The session's weights moved into 2 MB pages (Linux), so a decode step misses the TLB less.

ONNX Runtime copies every weight it prepacks (MatMul and MatMulNBits B) into anonymous
memory of 4 KB pages, and a decode step reads all of them once: on a 2-core CPU that is the
whole step. Once the session exists, `collapse(regions())` asks the kernel (madvise
MADV_COLLAPSE, Linux 6.1+) to move the process's dense anonymous memory not yet in huge pages
(after a load, mostly those weights) into transparent huge pages in place: the same bytes, the
same resident size, about 5% faster decoding on this machine's SmolLM2 fp32
and int4 (BENCHMARKS.md). Model.from_dir runs it on a background thread for the CPU
provider, so loading does not wait for it. Where the kernel cannot (another OS, an older
kernel, THP set to "never", a sandbox that forbids madvise) it collapses nothing and says
nothing: speed is the only thing at stake.
"""

from __future__ import annotations

import ctypes
import sys
import threading

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
DENSE = 0.9  # collapse only regions at least this resident: collapsing fills a huge page's gaps
STEP = 64 << 20  # madvise this much at a time, so a closing process is not held for long


def _aligned(lo: int, hi: int) -> tuple[int, int]:
    """The whole 2 MB pages inside [lo, hi)."""
    return -(-lo // HUGE_PAGE) * HUGE_PAGE, hi // HUGE_PAGE * HUGE_PAGE


def regions() -> list[tuple[int, int]]:
    """(start, end) of each private anonymous read-write mapping that is at least DENSE resident
    and not yet mostly in huge pages."""
    if not sys.platform.startswith("linux"):
        return []
    out, current, rss = [], None, 0
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split()
                if "-" in head[0] and len(head) >= 5:  # a mapping's first line
                    lo, hi = (int(x, 16) for x in head[0].split("-"))
                    anon = head[1] == "rw-p" and (len(head) == 5 or head[5] == "[heap]")
                    current = (lo, hi) if anon and hi - lo >= HUGE_PAGE else None
                elif current and head[0] == "Rss:":
                    rss = int(head[1]) * 1024
                elif current and head[0] == "AnonHugePages:":
                    start, end = _aligned(*current)
                    if rss >= DENSE * (current[1] - current[0]) and int(head[1]) * 1024 < DENSE * (end - start):
                        out.append(current)
                    current = None
    except (OSError, ValueError, IndexError):
        return []
    return out


def _madvise():
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise  # libc, already loaded in this process
    except (OSError, AttributeError, TypeError):  # no C library by that route (Windows)
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def collapse(spans: list[tuple[int, int]]) -> int:
    """Move the 2 MB-aligned part of each span into huge pages; returns the bytes moved."""
    madvise = _madvise() if spans else None
    if madvise is None:
        return 0
    moved = 0
    for lo, hi in spans:
        start, end = _aligned(lo, hi)
        for a in range(start, end, STEP):
            n = min(STEP, end - a)
            if madvise(a, n, MADV_HUGEPAGE) != 0 or madvise(a, n, MADV_COLLAPSE) != 0:
                if ctypes.get_errno() == 22:  # EINVAL: this kernel has no MADV_COLLAPSE
                    return moved
                continue
            moved += n
    return moved


def collapse_in_background() -> threading.Thread | None:
    """Collapse, on a daemon thread, every dense anonymous mapping not yet in huge pages: after a
    session is created that is mostly its weights (glibc reuses freed memory, so telling the
    session's own pages apart from older ones is not reliable)."""
    spans = regions()
    if not spans:
        return None
    thread = threading.Thread(target=collapse, args=(spans,), name="llama2-onnx-huge-pages", daemon=True)
    thread.start()
    return thread
