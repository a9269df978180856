"""GraphWriter: an ONNX graph written node by node, its weights appended to one data file as they come.

Nothing but the graph's structure stays in memory: each weight is written to
model.onnx.data when it is added and referenced by offset, so a graph of any size is
assembled with the memory of its largest tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

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
    def __init__(self, data_path: Path):
        self.data_path = data_path
        self._data = open(data_path, "wb")
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._consts: dict[tuple, str] = {}
        self._count = 0

    def close(self) -> None:
        self._data.close()

    def __enter__(self) -> "GraphWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def weight(self, name: str, array: np.ndarray) -> str:
        """Append array to the data file as initializer `name`; returns name."""
        array = np.ascontiguousarray(array)
        if array.nbytes < INLINE_MAX:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        align = ALIGN_LARGE if array.nbytes >= LARGE else ALIGN_SMALL
        offset = self._data.tell()
        pad = -offset % align
        if pad:
            self._data.write(b"\0" * pad)
            offset += pad
        self._data.write(memoryview(array.reshape(-1).view(np.uint8)))
        t = TensorProto(name=name, data_type=DTYPES[array.dtype], dims=array.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(array.nbytes))):
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
