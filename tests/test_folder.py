"""runtime/folder.py: the manifest check, sha256 on a folder's first load."""

import os
import shutil

import pytest

from llama2_onnx.runtime.folder import ModelFolderError, check_manifest


def _flip_byte(path, offset=100):
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 1]))
    return st


def test_first_load_hashes_then_sizes_only(tiny_onnx, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA2_ONNX_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "m"
    shutil.copytree(tiny_onnx, folder)
    data = folder / "model.onnx.data"

    # same size, one bit changed, never loaded before: the first load hashes and finds it
    st = _flip_byte(data)
    with pytest.raises(ModelFolderError, match="model.onnx.data.*sha256"):
        check_manifest(folder)
    _flip_byte(data)  # restore
    check_manifest(folder)  # verified and remembered

    # a later change moves the file's mtime, so the next load hashes again
    _flip_byte(data)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    check_manifest(folder, hashes=False)  # sizes only: the change goes unseen
    with pytest.raises(ModelFolderError, match="sha256"):
        check_manifest(folder)
