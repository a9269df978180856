"""A model folder's manifest.json: what its files are (size and sha256 of each), checked before
anything is read, and the error every folder check raises.

    {"files": {name: {"size": n, "sha256": hex}}}
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama2_onnx.errors import UserError
from llama2_onnx.files import cache_dir, sha256_of as sha256_file
from llama2_onnx.models.config import ConfigError, load_json

from . import contract

LFS_HEADER = b"version https://git-lfs.github.com/spec/v1"


class ModelFolderError(UserError):
    """A model folder is missing, incomplete or altered."""


def write_manifest(folder: Path, known: dict[str, str] | None = None) -> dict[str, Any]:
    """Record size and sha256 of every file in folder (manifest.json itself excepted); known:
    sha256 already computed by the writer of a file, by name."""
    known = known or {}
    files = {
        p.name: {"size": p.stat().st_size, "sha256": known.get(p.name) or sha256_file(p)}
        for p in sorted(folder.iterdir()) if p.is_file() and p.name != contract.MANIFEST_FILE
    }
    manifest = {"files": files}
    (folder / contract.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


def plain_file_name(name: object) -> bool:
    """A bare file name: no folder part, not absolute, not "." or "..", nothing a platform reads as a path."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\:")
            and name.isprintable() and name == name.strip())


@dataclass(frozen=True)
class Listed:
    size: int
    sha256: str


HEX = frozenset("0123456789abcdef")


def read_manifest(folder: Path) -> dict[str, Listed]:
    """manifest.json as {name: Listed}; any other shape is one ModelFolderError line."""
    path = folder / contract.MANIFEST_FILE
    if not path.is_file():
        raise ModelFolderError(f"{folder} has no {contract.MANIFEST_FILE}: it is not a complete llama2-onnx model folder; export it again")
    try:
        data = load_json(path)
    except ConfigError as e:
        raise ModelFolderError(f"{e}: export the model again") from None
    except OSError as e:
        raise ModelFolderError(f"cannot read {path} ({e.strerror}); check the folder's permissions") from None
    bad = f"{path} is malformed"
    if set(data) != {"files"} or not isinstance(data["files"], dict):
        raise ModelFolderError(f'{bad}: it must be {{"files": {{name: {{"size": n, "sha256": hex}}}}}} and nothing else; export the model again')
    listed = {}
    for name, meta in data["files"].items():
        if not plain_file_name(name) or name == contract.MANIFEST_FILE:
            raise ModelFolderError(f"{bad}: {name!r} is not a plain file name of the folder; export the model again")
        if not isinstance(meta, dict) or set(meta) != {"size", "sha256"}:
            raise ModelFolderError(f'{bad}: the entry of {name!r} must be {{"size": n, "sha256": hex}}; export the model again')
        size, sha = meta["size"], meta["sha256"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ModelFolderError(f"{bad}: the size of {name!r} is {size!r}, not a byte count; export the model again")
        if not isinstance(sha, str) or len(sha) != 64 or not HEX.issuperset(sha):
            raise ModelFolderError(f"{bad}: the sha256 of {name!r} is not 64 lowercase hex digits; export the model again")
        listed[name] = Listed(size, sha)
    for need in (contract.MODEL_FILE, contract.CONFIG_FILE):
        if need not in listed:
            raise ModelFolderError(f"{path} does not list {need}: the manifest must name every file the model needs; export it again")
    return listed


def folder_key(folder: Path) -> str:
    """A folder's name in the cache folder's per-folder records (verified stamps, start-up cache)."""
    return hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:24]


def _stamp_path(folder: Path) -> Path:
    return cache_dir() / "verified" / f"{folder_key(folder)}.json"


def _file_states(folder: Path, names) -> dict[str, list[int]]:
    """What the verified stamp remembers of each file (manifest.json too): size, mtime, inode and
    ctime. ctime cannot be set back by a user (os.utime restores only atime and mtime), so an edit
    that keeps the size and restores the mtime still forces a re-hash."""
    stats = {n: (folder / n).stat() for n in [*names, contract.MANIFEST_FILE]}
    return {n: [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns] for n, st in stats.items()}


def check_manifest(folder: Path, *, hashes: bool | None = None) -> dict[str, Listed]:
    """Raise ModelFolderError naming the first file that is missing, a Git LFS pointer, a symlink
    out of the folder, or of the wrong size, or (hashes=True, or None on the first load of this
    folder) of the wrong sha256; returns the manifest. A folder that passed the hash check is
    remembered, by each file's size, mtime, inode and ctime, in the cache folder, so later loads
    only check sizes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist; export one with `llama2-onnx export CHECKPOINT {folder}`")
    files = read_manifest(folder)
    root = os.path.realpath(folder)
    stamp = _stamp_path(folder)
    if hashes is None:
        try:
            hashes = json.loads(stamp.read_text()) != _file_states(folder, files)
        except (OSError, ValueError):
            hashes = True
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            raise ModelFolderError(f"{path} is missing; copy the whole model folder or export it again")
        if os.path.dirname(os.path.realpath(path)) != root:
            raise ModelFolderError(f"{path} is a symlink out of the model folder; copy the real file into the folder")
        size = path.stat().st_size
        if size != meta.size:
            if size < 1024 and path.read_bytes().startswith(LFS_HEADER):
                raise ModelFolderError(f"{path} is a Git LFS pointer, not the file itself; run `git lfs pull` in that repository")
            raise ModelFolderError(f"{path} is {size} bytes, the manifest says {meta.size}: the file is truncated or altered; export again")
        if hashes and sha256_file(path) != meta.sha256:
            raise ModelFolderError(f"{path} does not match its sha256 in the manifest: the file is corrupt or altered; export again")
    if hashes:
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.write_text(json.dumps(_file_states(folder, files)))
        except OSError:  # a read-only cache only costs a re-check next time
            pass
    return files
