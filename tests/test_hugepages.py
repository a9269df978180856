"""Moving the session's weights into 2 MB pages: the bytes stay, sparse memory is left alone."""

import mmap
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llama2_onnx.runtime import Generator, hugepages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not THP.exists()
                                or "[never]" in THP.read_text(), reason="no transparent huge pages here")


def _span(array: np.ndarray) -> tuple[int, int] | None:
    """The region to collapse that holds the array's middle (NumPy may map its first page apart)."""
    middle = array.ctypes.data + array.nbytes // 2
    return next((r for r in hugepages.regions() if r[0] <= middle < r[1]), None)


def _huge_kb(span: tuple[int, int]) -> int:
    """AnonHugePages of the mappings overlapping span (madvise splits a mapping at 2 MB boundaries)."""
    inside, total = False, 0
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and len(head) >= 5:
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            inside = lo < span[1] and span[0] < hi
        elif inside and head[0] == "AnonHugePages:":
            total += int(head[1])
    return total


@pytest.fixture
def small_pages():
    """NumPy asks for huge pages for its own large arrays; these tests want arrays in 4 KB pages."""
    from numpy._core.multiarray import _set_madvise_hugepage

    was = _set_madvise_hugepage(False)
    yield
    _set_madvise_hugepage(was)


@pytest.fixture
def dense_4k_weights():
    """48 MB of float32 in a private anonymous mapping of its own, every page touched, in 4 KB
    pages even where THP is "always" (MADV_NOHUGEPAGE before the first touch)."""
    size = 48 << 20
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_NOHUGEPAGE)
    weights = np.frombuffer(memory, dtype=np.float32)
    weights[:] = np.random.default_rng(0).standard_normal(weights.size, dtype=np.float32)
    return weights  # the mapping is unmapped when the array's last view goes


def test_dense_memory_is_moved_and_keeps_its_bytes(dense_4k_weights):
    weights = dense_4k_weights
    copy = weights.copy()
    span = _span(weights)
    assert span is not None, "a dense 48 MB mapping in 4 KB pages is not among the regions to collapse"
    assert _huge_kb(span) == 0
    moved = hugepages.collapse([span])
    if moved == 0:
        pytest.skip("this kernel does not collapse memory into huge pages (MADV_COLLAPSE)")
    assert moved >= 32 << 20
    assert _huge_kb(span) * 1024 >= 32 << 20
    np.testing.assert_array_equal(weights, copy)


def test_sparse_memory_is_left_alone(small_pages):
    """Collapsing fills a huge page's untouched 4 KB pages: memory never written must not grow."""
    reserved = np.empty(64 << 20, np.uint8)  # mapped, not touched
    assert _span(reserved) is None
    reserved[:4096] = 1  # one page resident of 16384
    assert _span(reserved) is None


def test_collapse_of_nothing_or_of_unmapped_memory_moves_nothing():
    assert hugepages.collapse([]) == 0
    assert hugepages.collapse([(0, hugepages.HUGE_PAGE * 2)]) == 0  # page 0 is never mapped


@pytest.mark.parametrize("graph", ["portable", "ort"])
def test_same_tokens_with_and_without(graph, tiny_onnx, tiny_onnx_ort):
    folder = tiny_onnx if graph == "portable" else tiny_onnx_ort
    on = Generator.from_dir(folder, provider="cpu", huge_pages=True)
    off = Generator.from_dir(folder, provider="cpu", huge_pages=False)
    on.model.wait_for_huge_pages()
    assert off.model.huge_pages is None
    kw = dict(max_new_tokens=16, temperature=0.7, seed=3)
    assert on.generate("Once upon a time", **kw).tokens == off.generate("Once upon a time", **kw).tokens


LOAD = """
import sys
from llama2_onnx.runtime.session import Model
model = Model.from_dir(sys.argv[1], provider="cpu", huge_pages=sys.argv[2] == "on")
model.wait_for_huge_pages()
print(next(line.split()[1] for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages:")))
"""


def test_smollm2_weights_land_in_huge_pages(smollm2_onnx):
    """In a fresh process (this one's memory has seen other models): most of SmolLM2's 540 MB of
    prepacked weights end up in huge pages, and none without the option."""
    def huge_mb(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", LOAD, str(smollm2_onnx), mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1]) >> 10

    on = huge_mb("on")
    if on < 64:
        pytest.skip("this kernel does not collapse memory into huge pages (MADV_COLLAPSE)")
    assert on >= 400
    assert huge_mb("off") < 64
