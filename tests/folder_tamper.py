"""Tampered copies of a tiny exported model folder, as a hostile user would make them: each edit
is followed by a manifest rewritten to match (the manifest has no signature), so the checks
under test are the only thing between the edit and ONNX Runtime. Shared by the runtime
hardening tests and the table-driven CLI test."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import onnx

from llama2_onnx.runtime.folder import write_manifest


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def relocate(folder: Path, location: str, tensor: int = 0) -> str:
    """Point one initializer's external data at location (its bytes unchanged); returns its name."""
    model = onnx.load(folder / "model.onnx", load_external_data=False)
    init = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL][tensor]
    for entry in init.external_data:
        if entry.key == "location":
            entry.value = location
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    return init.name


def rewrite_manifest(folder: Path, drop: tuple[str, ...] = ()) -> None:
    write_manifest(folder)
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    for name in drop:
        manifest["files"].pop(name)
    path.write_text(json.dumps(manifest))


# ---- the tamperings: name -> edit(folder, outside) where outside is a scratch folder beside it ----


def _parent(folder, outside):
    shutil.copyfile(folder / "model.onnx.data", folder.parent / "x.data")
    relocate(folder, "../x.data")


def _absolute(folder, outside):
    shutil.copyfile(folder / "model.onnx.data", outside / "x.data")
    relocate(folder, str(outside / "x.data"))


def _subfolder(folder, outside):
    (folder / "sub").mkdir()
    shutil.copyfile(folder / "model.onnx.data", folder / "sub" / "x.data")
    relocate(folder, "sub/x.data")


def _symlink_out(folder, outside):
    shutil.move(folder / "model.onnx.data", outside / "model.onnx.data")
    os.symlink(outside / "model.onnx.data", folder / "model.onnx.data")


def _unlisted(folder, outside):
    shutil.copyfile(folder / "model.onnx.data", folder / "other.data")
    relocate(folder, "other.data")
    rewrite_manifest(folder, drop=("other.data",))


def _past_end(folder, outside):
    model = onnx.load(folder / "model.onnx", load_external_data=False)
    init = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    for entry in init.external_data:
        if entry.key == "offset":
            entry.value = str((folder / "model.onnx.data").stat().st_size)
    (folder / "model.onnx").write_bytes(model.SerializeToString())


def _garbage_model(folder, outside):
    (folder / "model.onnx").write_bytes(b"\x0a\xff\xff\xff\xff\x0f" + b"\0" * 64)


BAD_LOCATIONS = {  # name -> (edit, what the one-line error says)
    "parent": (_parent, "not a plain file name"),
    "absolute": (_absolute, "not a plain file name"),
    "subfolder": (_subfolder, "not a plain file name"),
    "symlink-out": (_symlink_out, "symlink out of the model folder"),
    "unlisted": (_unlisted, "manifest does not list"),
    "past-end": (_past_end, "past the end"),
    "garbage-model": (_garbage_model, "not a valid ONNX model"),
}


def tampered(src: Path, tmp: Path, name: str) -> Path:
    """A copy of src with the named BAD_LOCATIONS edit and a manifest that matches it
    (except where the edit is about the manifest itself)."""
    folder = copy_folder(src, tmp / "model")
    outside = tmp / "outside"
    outside.mkdir()
    edit, _ = BAD_LOCATIONS[name]
    edit(folder, outside)
    if name != "unlisted":
        rewrite_manifest(folder)
    return folder
