"""Single tensors out of weight files, without reading (or mapping) the rest.

    open_safetensors(path)     -> {name: TensorRef}  8-byte header length, JSON header, raw bytes
    open_torch(path)           -> the pickled object  torch.save's zip: <prefix>/data.pkl + <prefix>/data/<key>,
                                                      with every tensor in it replaced by a TensorRef
    gguf_tensors(reader, path) -> {name: TensorRef}  offsets from a gguf.GGUFReader (it maps, never touches data)
    read(ref)                  -> torch.Tensor        the bytes read with readinto into a fresh buffer

Only the headers are read when a file is opened; ``read`` reads one tensor's bytes. Nothing
is memory-mapped: pages of a mapped file count in the process's resident memory once
touched, so reading a 70B checkpoint through a map would hold the whole file. A file whose
bytes disagree with its header raises ``TensorFileError``.

Writing, a tensor at a time (random checkpoints larger than memory):

    write_safetensors(path, specs, make, metadata)   specs: {name: (shape, dtype)}; make(name) -> tensor
    write_torch_zip(path, specs, make)               a file torch.load reads, as a dict of tensors
"""

from __future__ import annotations

import collections
import io
import json
import math
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch


class TensorFileError(ValueError):
    """A weights file whose bytes are not what its header says: truncated or corrupt."""

    def __init__(self, path: Path, reason: str):
        super().__init__(reason)
        self.path = path


@dataclass(frozen=True, eq=False)
class TensorRef:
    """Where one tensor's bytes are, and what they make."""

    path: Path
    offset: int  # absolute file offset of the first byte
    nbytes: int
    dtype: torch.dtype  # of the tensor read returns (float32 for GGUF quant types)
    shape: tuple[int, ...]
    stride: tuple[int, ...] | None = None  # element strides of a non-contiguous torch view; None: contiguous
    gguf_type: int | None = None  # GGML quant type to dequantize; None: the bytes are `dtype` already
    held: torch.Tensor | None = None  # a tensor of a legacy (pre-zip) torch file, loaded whole


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _check_within(path: Path, name: str, end: int, size: int) -> None:
    if end > size:
        raise TensorFileError(path, f"tensor {name!r} ends at byte {end}, past the end of the file ({size} bytes)")


def read(ref: TensorRef) -> torch.Tensor:
    """The tensor `ref` points at: a fresh tensor owning its memory (a legacy file's: the one held)."""
    if ref.held is not None:
        return ref.held
    buf = torch.empty(ref.nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    with open(ref.path, "rb", buffering=0) as f:
        f.seek(ref.offset)
        got = 0
        while got < ref.nbytes:
            n = f.readinto(view[got:])
            if not n:
                raise TensorFileError(ref.path, f"the file ends {ref.nbytes - got} bytes into a tensor's data")
            got += n
    if ref.gguf_type is not None:
        from gguf.quants import dequantize

        # GGML blocks never straddle rows, so the whole tensor dequantizes as one row of blocks
        return torch.from_numpy(dequantize(buf.numpy(), ref.gguf_type)).reshape(ref.shape)
    t = buf.view(ref.dtype)
    if ref.stride is not None:
        return t.as_strided(ref.shape, ref.stride).contiguous()
    return t.reshape(ref.shape)


# ---- safetensors ----------------------------------------------------------------------

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
MAX_HEADER = 100 * 2**20  # the safetensors library's own limit


def open_safetensors(path: Path) -> dict[str, TensorRef]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little")
        if len(head) < 8 or n > min(size - 8, MAX_HEADER):
            raise TensorFileError(path, f"header length {n} does not fit a file of {size} bytes")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:  # UnicodeDecodeError included
            raise TensorFileError(path, f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise TensorFileError(path, "header is not a JSON object")
    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise TensorFileError(path, f"header entry of {name!r} is not dtype/shape/data_offsets") from None
        if begin < 0 or end - begin != _nbytes(shape, dtype):
            raise TensorFileError(path, f"tensor {name!r} has {end - begin} bytes for shape {list(shape)} {info['dtype']}")
        _check_within(path, name, 8 + n + end, size)
        refs[name] = TensorRef(path, 8 + n + begin, end - begin, dtype, shape)
    return refs


def write_safetensors(path: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                      make: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """A .safetensors file of the tensors `make` returns, one at a time, in specs' order; its size."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    begin = 0
    for name, (shape, dtype) in specs.items():
        end = begin + _nbytes(shape, dtype)
        header[name] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
        begin = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the library writes it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name, (shape, dtype) in specs.items():
            f.write(_bytes_of(make(name), name, shape, dtype))
    return 8 + len(text) + begin


def _bytes_of(t: torch.Tensor, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> memoryview:
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise ValueError(f"{name}: made {list(t.shape)} {t.dtype}, declared {list(shape)} {dtype}")
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


# ---- torch.save's zip format (Meta's .pth, Hugging Face's pytorch_model.bin) ----------

# torch.save pickles each storage's type as one of these classes; the tensor takes its dtype.
STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}
_STORAGE_CLASSES = {v: k for k, v in STORAGE_DTYPES.items() if k != "UntypedStorage"}
ZIP_MAGIC = b"PK\x03\x04"
ZIP_LOCAL_HEADER = 30  # bytes before the file name in a local file header
ALIGN = 64  # torch.save starts every storage's bytes at a multiple of this
# data.pkl holds names, shapes and storage keys: ~0.2 KB a tensor, under 1 MB for a 70B shard
MAX_PICKLE = 64 * 2**20


@dataclass(frozen=True)
class _Storage:
    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype


def _rebuild_tensor(storage: _Storage, storage_offset: int, size, stride, *_rest) -> TensorRef:
    """Stand-in for torch._utils._rebuild_tensor_v2: where the tensor's bytes are, not the tensor."""
    size, stride, item = tuple(size), tuple(stride), storage.dtype.itemsize
    contiguous = all(s == math.prod(size[k + 1:]) for k, (n, s) in enumerate(zip(size, stride)) if n > 1)
    span = 0 if 0 in size else 1 + sum((n - 1) * s for n, s in zip(size, stride))  # elements from the first to the last
    if (storage_offset + span) * item > storage.nbytes:
        raise TensorFileError(storage.path, f"a tensor of shape {list(size)} runs past its storage's {storage.nbytes} bytes")
    return TensorRef(storage.path, storage.offset + storage_offset * item, span * item, storage.dtype, size,
                     stride=None if contiguous else stride)


# What data.pkl may name: the same short list torch.load(weights_only=True) needs for a state dict.
_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): lambda data, *_rest: data,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _LazyUnpickler(pickle.Unpickler):
    """Unpickles data.pkl with each storage a _Storage (where its bytes are) and each tensor a TensorRef."""

    def __init__(self, data: bytes, path: Path, records: dict[str, tuple[int, int]]):
        super().__init__(io.BytesIO(data))
        self.path, self.records = path, records  # storage key -> (offset, nbytes)

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[module, name]
        raise TensorFileError(self.path, f"data.pkl names {module}.{name}, which a file of weights has no need for")

    def persistent_load(self, pid: Any) -> _Storage:
        # ('storage', storage class -> dtype via find_class, key, location, number of elements)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and pid[2] in self.records):
            raise TensorFileError(self.path, f"data.pkl refers to a storage {pid!r} that is not in the file")
        _, dtype, key, _location, numel = pid
        offset, nbytes = self.records[key]
        if numel * dtype.itemsize != nbytes:
            raise TensorFileError(self.path, f"storage {key} has {nbytes} bytes, not {numel} x {dtype}")
        return _Storage(self.path, offset, nbytes, dtype)


def open_torch(path: Path) -> Any:
    """What torch.save pickled into `path`, each tensor in it a TensorRef.

    A legacy (pre-zip, before torch 1.6) or big-endian file is loaded whole by torch.load
    instead: its tensors come back as TensorRefs that hold them.
    """
    with open(path, "rb") as f:
        if f.read(4) != ZIP_MAGIC:
            return _load_whole(path)
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as f:
            pkl = [i.filename for i in z.infolist() if i.filename.rsplit("/", 1)[-1] == "data.pkl"]
            if len(pkl) != 1:
                raise TensorFileError(path, f"a torch zip holds one data.pkl, this one {len(pkl)}")
            prefix = pkl[0].removesuffix("data.pkl")
            if prefix + "byteorder" in z.namelist() and _read_member(z, path, prefix + "byteorder", 16) != b"little":
                return _load_whole(path)
            records = {}
            for info in z.infolist():
                if not info.filename.startswith(prefix + "data/"):
                    continue
                if info.compress_type != zipfile.ZIP_STORED:
                    raise TensorFileError(path, f"{info.filename} is compressed; torch.save stores data uncompressed")
                f.seek(info.header_offset)
                local = f.read(ZIP_LOCAL_HEADER)
                if local[:4] != ZIP_MAGIC:
                    raise TensorFileError(path, f"no local header for {info.filename}")
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                offset = info.header_offset + ZIP_LOCAL_HEADER + name_len + extra_len
                _check_within(path, info.filename, offset + info.file_size, size)
                records[info.filename.removeprefix(prefix + "data/")] = (offset, info.file_size)
            return _LazyUnpickler(_read_member(z, path, pkl[0], MAX_PICKLE), path, records).load()
    except TensorFileError:
        raise
    except Exception as e:  # a truncated zip, a bad pickle: all mean "unreadable"
        raise TensorFileError(path, str(e) or type(e).__name__) from None


def _read_member(z: zipfile.ZipFile, path: Path, name: str, limit: int) -> bytes:
    """A zip member's bytes, refused on its declared size before it is inflated (zipfile reads no
    more than the declared size, so a member that lies about it cannot inflate past it either)."""
    size = z.getinfo(name).file_size
    if size > limit:
        raise TensorFileError(path, f"{name} declares {size} bytes uncompressed, far more than a checkpoint's "
                                    f"({limit} at most): not a checkpoint (a zip bomb?)")
    return z.read(name)


def _load_whole(path: Path) -> Any:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TensorFileError(path, str(e) or type(e).__name__) from None
    if isinstance(data, dict):
        data = {k: TensorRef(path, 0, 0, v.dtype, tuple(v.shape), held=v) if isinstance(v, torch.Tensor) else v
                for k, v in data.items()}
    return data


# ---- GGUF ---------------------------------------------------------------------------

def gguf_tensors(reader: Any, path: Path) -> dict[str, TensorRef]:
    """The tensors of `path` as its gguf.GGUFReader lists them, by GGUF name.

    F32/F16/BF16 read as they are; the quant types dequantize to float32.
    """
    from gguf import GGMLQuantizationType as Q

    size = path.stat().st_size
    raw = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
    refs = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims fastest first
        _check_within(path, t.name, t.data_offset + t.n_bytes, size)
        dtype = raw.get(t.tensor_type, torch.float32)
        refs[t.name] = TensorRef(path, t.data_offset, int(t.n_bytes), dtype, shape,
                                 gguf_type=None if t.tensor_type in raw else t.tensor_type)
    return refs


class _StorageStub:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorStub:
    """Pickles as torch.save pickles a contiguous tensor, with no data in hand."""

    def __init__(self, storage: _StorageStub, shape: tuple[int, ...]):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce__(self):
        from torch._utils import _rebuild_tensor_v2

        stride = tuple(math.prod(self.shape[k + 1:]) for k in range(len(self.shape)))
        return _rebuild_tensor_v2, (self.storage, 0, self.shape, stride, False, collections.OrderedDict())


class _StubPickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageStub):
            return ("storage", getattr(torch, _STORAGE_CLASSES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


def write_torch_zip(path: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                    make: Callable[[str], torch.Tensor]) -> int:
    """A file torch.load reads as {name: tensor}, written a tensor at a time; its size.

    The layout is torch.save's: <archive>/data.pkl, byteorder, version, and each storage
    uncompressed in <archive>/data/<k>, 64-byte aligned by padding the local header's extra field.
    """
    stubs = {name: _TensorStub(_StorageStub(str(k), dtype, math.prod(shape)), shape)
             for k, (name, (shape, dtype)) in enumerate(specs.items())}
    pkl = io.BytesIO()
    _StubPickler(pkl, protocol=2).dump(stubs)  # torch.save's protocol
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        z.writestr("archive/data.pkl", pkl.getvalue())
        z.writestr("archive/byteorder", "little")
        for name, (shape, dtype) in specs.items():
            info = zipfile.ZipInfo(f"archive/data/{stubs[name].storage.key}")
            # local header: 30 bytes, the name, our padding record (4 + pad), zipfile's zip64 record (20)
            start = z.fp.tell() + ZIP_LOCAL_HEADER + len(info.filename) + 4 + 20
            info.extra = struct.pack("<HH", 0x4246, -start % ALIGN) + b"\0" * (-start % ALIGN)  # id "FB", as torch's
            with z.open(info, "w", force_zip64=True) as out:
                out.write(_bytes_of(make(name), name, shape, dtype))
        z.writestr("archive/version", "3\n")
    return path.stat().st_size
