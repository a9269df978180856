"""GraphWriter: an ONNX graph written node by node, its weights appended to one data file as they come.

Nothing but the graph's structure stays in memory: each weight is written to
model.onnx.data when it is added and referenced by offset, so a graph of any size is
assembled with the memory of its largest tensor.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Large weights start on a 64 KiB boundary (ONNX Runtime can then map them); small ones on 64 bytes.
ALIGN_LARGE, ALIGN_SMALL, LARGE = 65536, 64, 1 << 20
INLINE_MAX = 1024  # bytes: below this a tensor stays inside model.onnx (shape constants and the like)

DTYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
          np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
          np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.bool_): TensorProto.BOOL}


class GraphWriter:
    """Weights go to the data file on a second thread: while it lays out (a transpose, say),
    writes and hashes weight i, the caller reads weight i + 1 from the checkpoint. One weight is
    in flight at a time, so memory stays a few tensors. The file is hashed (sha256) as it is
    written, so the manifest need not read it again: `data_sha256` after close()."""

    def __init__(self, data_path: Path):
        self.data_path = data_path
        self._data = open(data_path, "wb")
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._consts: dict[tuple, str] = {}
        self._count = 0
        self._offset = 0
        self._sha = hashlib.sha256()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="weights")
        self._pending: Future | None = None
        self.data_sha256: str | None = None

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # raises the worker's error here

    def close(self) -> None:
        try:
            self._wait()
        finally:
            self._worker.shutdown()
            self._data.close()
        self.data_sha256 = self._sha.hexdigest()

    def __enter__(self) -> "GraphWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def weight(self, name: str, array: np.ndarray | Callable[[], np.ndarray], dtype=None, shape=None) -> str:
        """Append a weight to the data file as initializer `name`; returns name.

        array is the data, or a function making it (run on the writer's thread) with its
        dtype and shape given here."""
        if not callable(array):
            array = np.ascontiguousarray(array)
            dtype, shape = array.dtype, array.shape
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes < INLINE_MAX:
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array() if callable(array) else array), name))
            return name
        align = ALIGN_LARGE if nbytes >= LARGE else ALIGN_SMALL
        pad = -self._offset % align
        offset = self._offset + pad
        self._offset = offset + nbytes

        def write() -> None:
            data = np.ascontiguousarray(array() if callable(array) else array)
            if data.nbytes != nbytes or data.dtype != dtype:
                raise ValueError(f"{name}: made {data.dtype}{list(data.shape)}, declared {dtype}{list(shape)}")
            for chunk in (b"\0" * pad, memoryview(data.reshape(-1).view(np.uint8))):
                self._data.write(chunk)
                self._sha.update(chunk)

        self._wait()
        self._pending = self._worker.submit(write)
        t = TensorProto(name=name, data_type=DTYPES[dtype], dims=list(shape))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(t)
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small constant (shapes, axes, scalars), shared by every node that needs the same one."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = name = self._fresh("const")
            self.initializers.append(numpy_helper.from_array(array, name))
        return self._consts[key]

    def node(self, op: str, inputs: Sequence[str], outputs: int | Sequence[str] = 1, *, domain: str = "",
             **attrs) -> str | list[str]:
        """Add a node; returns its output name (or names when it has several)."""
        names = [self._fresh(op.lower()) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self.nodes.append(helper.make_node(op, list(inputs), names, name=self._fresh(op), domain=domain or None, **attrs))
        return names[0] if len(names) == 1 else names

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], opset: int,
              contrib: bool = False) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "llama", inputs, outputs, initializer=self.initializers)
        imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid("com.microsoft", 1)] if contrib else [])
        model = helper.make_model(graph, opset_imports=imports, producer_name="llama2-onnx")
        model.ir_version = 10
        return model


def value(name: str, dtype, shape: Sequence[int | str]) -> onnx.ValueInfoProto:
    elem = DTYPES[np.dtype(dtype)]
    return helper.make_tensor_value_info(name, elem, list(shape))
