"""Where model.onnx keeps its weights: every tensor's external-data location, read from the
protobuf wire format (the runtime does not import the onnx package), and checked to name a file
inside the model folder before ONNX Runtime opens anything.

ONNX Runtime resolves a location relative to model.onnx; releases before 1.2x follow "../x",
absolute paths and symlinks out of the folder. So each location must be a plain file name,
listed in the manifest (check_manifest has made sure each listed file is a regular file inside
the folder, of the listed size), and each tensor's offset + length must lie within that file.

The messages walked, and their field numbers (onnx/onnx.proto):

    ModelProto         graph 7, training_info 20, functions 25
    TrainingInfoProto  initialization 1, algorithm 2                   (GraphProto)
    FunctionProto      node 7, attribute_proto 11
    GraphProto         node 1, initializer 5, sparse_initializer 15
    NodeProto          attribute 5
    AttributeProto     t 5, g 6, tensors 10, graphs 11, sparse_tensor 22, sparse_tensors 23
    SparseTensorProto  values 1, indices 2                             (TensorProto)
    TensorProto        name 8, external_data 13, data_location 14 (1 = EXTERNAL)
    StringStringEntryProto  key 1, value 2
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .manifest import Listed, ModelFolderError, plain_file_name

# message kind -> {field number: kind of the message in that field}; "tensor" is read, not walked
CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attribute"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
TENSOR_NAME, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION, EXTERNAL = 8, 13, 14, 1
MAX_DEPTH = 64  # nested subgraphs; a real model has a handful
VARINT, I64, LEN, I32 = 0, 1, 2, 5


class _Malformed(Exception):
    pass


@dataclass(frozen=True)
class ExternalTensor:
    name: str
    location: str | None  # None: marked external but no location given
    offset: int
    length: int | None


# ---- the wire format -----------------------------------------------------------------------


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Malformed("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) for each field: an int (varint) or a memoryview (LEN)."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed("field number 0")
        if wire == VARINT:
            value, pos = _varint(buf, pos)
        elif wire == LEN:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise _Malformed("a length-delimited field runs past its message")
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (I64, I32):
            value, pos = None, pos + (8 if wire == I64 else 4)
            if pos > len(buf):
                raise _Malformed("a fixed-size field runs past its message")
        else:  # 3/4 are groups, which onnx.proto never uses; 6/7 do not exist
            raise _Malformed(f"wire type {wire}")
        yield number, wire, value


def _text(value: object) -> str:
    if not isinstance(value, memoryview):
        raise _Malformed("a string field is not length-delimited")
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed("a string field is not UTF-8") from None


def _tensor(buf: memoryview) -> ExternalTensor | None:
    name, entries, marked = "", {}, False
    for number, _, value in _fields(buf):
        if number == TENSOR_NAME:
            name = _text(value)
        elif number == TENSOR_DATA_LOCATION:
            marked = value == EXTERNAL
        elif number == TENSOR_EXTERNAL_DATA:
            if not isinstance(value, memoryview):
                raise _Malformed("external_data is not a message")
            entry = {n: _text(v) for n, _, v in _fields(value) if n in (1, 2)}
            entries[entry.get(1, "")] = entry.get(2, "")
    if not marked and not entries:
        return None
    try:
        offset = int(entries.get("offset", "0"))
        length = int(entries["length"]) if "length" in entries else None
    except ValueError:
        raise _Malformed(f"tensor {name!r} has a non-integer external-data offset or length") from None
    return ExternalTensor(name, entries.get("location"), offset, length)


def external_tensors(data: bytes) -> list[ExternalTensor]:
    """Every tensor of a serialized ModelProto that keeps its data in another file."""
    found: list[ExternalTensor] = []
    stack = [("model", memoryview(data), 0)]
    while stack:
        kind, buf, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _Malformed(f"graphs nested more than {MAX_DEPTH} deep")
        children = CHILDREN[kind]
        for number, wire, value in _fields(buf):
            child = children.get(number)
            if child is None:
                continue
            if wire != LEN:
                raise _Malformed(f"field {number} of a {kind} message is not a message")
            if child == "tensor":
                if (t := _tensor(value)) is not None:
                    found.append(t)
            else:
                stack.append((child, value, depth + 1))
    return found


# ---- the check -------------------------------------------------------------------------------


def check_external_data(folder: Path, listed: dict[str, Listed], model_file: str) -> None:
    """Refuse (ModelFolderError, one line) any external-data location of folder/model_file that is
    not a plain file name listed in the manifest, or a range past the end of that file. listed is
    check_manifest's answer: each listed file is already a regular file inside the folder of the
    listed size, so its size is taken from there."""
    path = folder / model_file
    try:
        tensors = external_tensors(path.read_bytes())
    except _Malformed as e:
        raise ModelFolderError(f"{path} is not a valid ONNX model ({e}); export it again") from None
    except OSError as e:
        raise ModelFolderError(f"cannot read {path} ({e.strerror}); check the folder's permissions") from None
    for t in tensors:
        loc = t.location
        where = f"{path}: tensor {t.name!r} keeps its data in {loc!r}"
        if loc is None or not plain_file_name(loc):
            raise ModelFolderError(f"{where}, not a plain file name inside the model folder; refusing to load it: export the model again")
        if loc not in listed:
            raise ModelFolderError(f"{where}, which the manifest does not list; refusing to load it: export the model again")
        size = listed[loc].size
        if t.offset < 0 or (t.length is not None and t.length < 0) or t.offset + (t.length or 0) > size:
            raise ModelFolderError(f"{where} at offset {t.offset} length {t.length}, past the end of that "
                                   f"{size}-byte file; export the model again")
