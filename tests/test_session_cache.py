"""runtime/session_cache.py: the optimized, prepacked graph kept between starts, keyed by the folder's
manifest, the ONNX Runtime version and the CPU; never used for a folder that fails its manifest."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from llama2_onnx.runtime import contract, session_cache
from llama2_onnx.runtime.folder import ModelFolderError
from llama2_onnx.runtime.session import Model


@pytest.fixture
def folder(tiny_onnx_ort, tmp_path, monkeypatch):
    monkeypatch.setattr(session_cache, "sessions_dir", lambda: tmp_path / "sessions")
    return shutil.copytree(tiny_onnx_ort, tmp_path / "model")


def _first_logits(model: Model) -> np.ndarray:
    ids = np.arange(5, 17)[None]
    return model.step(ids, np.ones_like(ids), model.new_cache(np.ones_like(ids), capacity=16))


def test_second_start_opens_the_cache_with_the_same_logits(folder):
    plain = _first_logits(Model.from_dir(folder, provider="cpu", startup_cache=False))
    first = Model.from_dir(folder, provider="cpu")
    assert first.startup == "written" and session_cache.lookup(folder, "cpu") is not None
    second = Model.from_dir(folder, provider="cpu")
    assert second.startup == "hit" and second.keeps_logits
    np.testing.assert_array_equal(_first_logits(first), plain)
    np.testing.assert_array_equal(_first_logits(second), plain)


def test_a_folder_over_the_size_cap_is_opened_as_it_is(folder, monkeypatch):
    """Past MAX_DATA an entry costs more to read than it saves: no entry written, none used."""
    assert Model.from_dir(folder, provider="cpu").startup == "written"
    monkeypatch.setattr(session_cache, "MAX_DATA", session_cache.data_size(folder) - 1)
    assert Model.from_dir(folder, provider="cpu").startup == "off"
    shutil.rmtree(session_cache.entry_dir(folder))
    assert Model.from_dir(folder, provider="cpu").startup == "off"
    assert not session_cache.entry_dir(folder).exists()


def test_a_new_onnxruntime_version_writes_it_again(folder, monkeypatch):
    assert Model.from_dir(folder, provider="cpu").startup == "written"
    monkeypatch.setattr(ort, "__version__", ort.__version__ + ".next")
    assert session_cache.lookup(folder, "cpu") is None
    assert Model.from_dir(folder, provider="cpu").startup == "written"
    assert Model.from_dir(folder, provider="cpu").startup == "hit"


def test_a_changed_manifest_writes_it_again(folder):
    assert Model.from_dir(folder, provider="cpu").startup == "written"
    manifest = folder / contract.MANIFEST_FILE  # the same files, the manifest's bytes changed (a re-export)
    manifest.write_text(json.dumps(json.loads(manifest.read_text()), indent=3))
    assert session_cache.lookup(folder, "cpu") is None
    assert Model.from_dir(folder, provider="cpu").startup == "written"


def test_never_used_for_a_folder_that_fails_its_manifest(folder):
    assert Model.from_dir(folder, provider="cpu").startup == "written"
    with open(folder / contract.DATA_FILE, "ab") as f:
        f.write(b"\0")  # its size no longer matches the manifest
    with pytest.raises(ModelFolderError):
        Model.from_dir(folder, provider="cpu")


def test_entries_of_folders_gone_are_pruned(folder, tmp_path):
    other = shutil.copytree(folder, tmp_path / "other")
    Model.from_dir(other, provider="cpu")
    shutil.rmtree(other)
    Model.from_dir(folder, provider="cpu")  # writing an entry prunes the other's
    assert [p.name for p in session_cache.entry_dir(folder).parent.iterdir()] == [session_cache.entry_dir(folder).name]


def test_an_unreadable_entry_is_written_again(folder):
    Model.from_dir(folder, provider="cpu")
    (session_cache.entry_dir(folder) / session_cache.MODEL).write_bytes(b"not a model")
    model = Model.from_dir(folder, provider="cpu")
    assert model.startup == "written" and Model.from_dir(folder, provider="cpu").startup == "hit"


@pytest.mark.parametrize("why", ["cache folder under a file", "no room on the disk", "writing fails"])
def test_a_cache_that_cannot_be_written_never_costs_the_load(folder, tmp_path, monkeypatch, why):
    if why == "cache folder under a file":
        (tmp_path / "file").write_text("x")
        monkeypatch.setattr(session_cache, "sessions_dir", lambda: tmp_path / "file" / "sessions")
    elif why == "no room on the disk":
        monkeypatch.setattr(session_cache, "ROOM_FACTOR", 10**12)
    else:  # ORT fails while writing the optimized model (a full disk half-way): plain open instead
        monkeypatch.setattr(session_cache, "MODEL", "no-such-dir/model.opt.onnx")
    plain = _first_logits(Model.from_dir(folder, provider="cpu", startup_cache=False))
    model = Model.from_dir(folder, provider="cpu")
    assert model.startup == "off" and session_cache.lookup(folder, "cpu") is None
    np.testing.assert_array_equal(_first_logits(model), plain)
