"""runtime/folder.py's manifest: it must name every file the model reads, any other shape is one
ModelFolderError line, and the verified stamp is not fooled by an edit that restores the mtime."""

from __future__ import annotations

import json
import os

import pytest

from folder_tamper import copy_folder, rewrite_manifest
from llama2_onnx.runtime.folder import ModelFolderError, check_folder, check_manifest
from llama2_onnx.runtime.session import Model


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA2_ONNX_CACHE", str(tmp_path / "cache"))


@pytest.fixture()
def folder(tiny_onnx, tmp_path):
    return copy_folder(tiny_onnx, tmp_path / "m")


def _edit_manifest(folder, edit):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(edit(manifest)))


def _drop(name):
    def edit(m):
        m["files"].pop(name)
        return m
    return edit


def _entry(name, value):
    def edit(m):
        m["files"][name] = value
        return m
    return edit


SHA = "0" * 64
MANIFESTS = {  # name -> (edit of the real manifest, what the error says)
    "no files": (lambda m: {"files": {}}, "does not list model.onnx"),
    "no model.onnx.data": (_drop("model.onnx.data"), "does not list"),
    "no config.json": (_drop("config.json"), "does not list config.json"),
    "no tokenizer": (_drop("tokenizer.model"), "does not list tokenizer.model"),
    "no tokenizer_config": (_drop("tokenizer_config.json"), "does not list tokenizer_config.json"),
    "top level a list": (lambda m: [m], "JSON object"),
    "files a list": (lambda m: {"files": list(m["files"])}, "malformed"),
    "extra top-level key": (lambda m: {**m, "signature": "x"}, "malformed"),
    "entry not a dict": (_entry("model.onnx", 12), "entry of 'model.onnx'"),
    "entry extra key": (_entry("config.json", {"size": 1, "sha256": SHA, "x": 1}), "entry of 'config.json'"),
    "size a string": (_entry("config.json", {"size": "1289", "sha256": SHA}), "size of 'config.json'"),
    "size a bool": (_entry("config.json", {"size": True, "sha256": SHA}), "size of 'config.json'"),
    "size negative": (_entry("config.json", {"size": -1, "sha256": SHA}), "size of 'config.json'"),
    "sha256 short": (_entry("config.json", {"size": 1, "sha256": "abc"}), "sha256 of 'config.json'"),
    "sha256 not hex": (_entry("config.json", {"size": 1, "sha256": "g" * 64}), "sha256 of 'config.json'"),
    "sha256 a number": (_entry("config.json", {"size": 1, "sha256": 5}), "sha256 of 'config.json'"),
    "name with a folder": (_entry("sub/x", {"size": 1, "sha256": SHA}), "not a plain file name"),
    "name going up": (_entry("../x", {"size": 1, "sha256": SHA}), "not a plain file name"),
    "name absolute": (_entry("/etc/passwd", {"size": 1, "sha256": SHA}), "not a plain file name"),
    "lists itself": (_entry("manifest.json", {"size": 1, "sha256": SHA}), "not a plain file name"),
}


@pytest.mark.parametrize("name", sorted(MANIFESTS))
def test_bad_manifests_are_one_line(folder, name):
    edit, needle = MANIFESTS[name]
    _edit_manifest(folder, edit)
    with pytest.raises(ModelFolderError, match=needle) as e:
        Model.from_dir(folder, huge_pages=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["", "{", "null", '"files"', "\xff"])
def test_manifest_not_json(folder, text):
    (folder / "manifest.json").write_text(text, encoding="latin-1")
    with pytest.raises(ModelFolderError, match="manifest.json"):
        check_manifest(folder)


def test_unlisted_tokenizer_file_the_runtime_would_read(folder):
    """load_tokenizer prefers tokenizer.model when present: an unlisted one must not slip in."""
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelFolderError, match="does not list tokenizer.json"):
        check_folder(folder)


def _same_size_edit(path, old: bytes, new: bytes) -> None:
    st = path.stat()
    data = path.read_bytes()
    assert len(old) == len(new) and old in data
    path.write_bytes(data.replace(old, new, 1))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_stamp_sees_an_edit_with_the_mtime_restored(folder):
    check_manifest(folder)  # hashed and remembered
    check_manifest(folder)  # sizes only
    _same_size_edit(folder / "config.json", b'"n_layers": 2', b'"n_layers": 3')
    with pytest.raises(ModelFolderError, match="config.json does not match its sha256"):
        check_manifest(folder)
    with pytest.raises(ModelFolderError, match="config.json does not match its sha256"):
        Model.from_dir(folder, huge_pages=False)


def test_stamp_sees_a_rewritten_manifest(folder):
    check_manifest(folder)
    _same_size_edit(folder / "config.json", b'"n_layers": 2', b'"n_layers": 3')
    rewrite_manifest(folder)  # the new hash is in the manifest: the load must not pass on the stamp
    with pytest.raises(ModelFolderError, match="does not match model.onnx"):
        Model.from_dir(folder, huge_pages=False)
