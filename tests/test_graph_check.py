"""runtime/graph_check.py: config.json against the graph's inputs and outputs, on load."""

from __future__ import annotations

import json
import os

import pytest

from folder_tamper import copy_folder, rewrite_manifest
from llama2_onnx.runtime.folder import ModelFolderError
from llama2_onnx.runtime.session import Model


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA2_ONNX_CACHE", str(tmp_path / "cache"))


def _set(section, key, value):
    def edit(cfg):
        (cfg[section] if section else cfg)[key] = value
    return edit


CONFIGS = {  # name -> (edit of config.json, what the error says about the graph)
    "n_layers": (_set("model", "n_layers", 3), "inputs lacks past_key_values.2.key"),
    "fewer layers": (_set("model", "n_layers", 1), "inputs has unexpected past_key_values.1.key"),
    "n_kv_heads": (_set("model", "n_kv_heads", 1), "past_key_values.0.key is tensor(float)"),
    "head_dim": (_set("model", "dim", 128), "past_key_values.0.key"),
    "vocab_size": (_set("model", "vocab_size", 32001), "logits is tensor(float)"),
    "precision": (_set(None, "precision", "fp16"), "tensor(float)"),
    "graph kind": (_set(None, "graph", "ort"), "has unexpected position_ids"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_that_does_not_fit_the_graph(tiny_onnx, tmp_path, name):
    folder = copy_folder(tiny_onnx, tmp_path / "m")
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    CONFIGS[name][0](cfg)
    path.write_text(json.dumps(cfg))
    rewrite_manifest(folder)  # the hashes match: only the graph check stands in the way
    with pytest.raises(ModelFolderError, match="does not match model.onnx") as e:
        Model.from_dir(folder, huge_pages=False)
    msg = str(e.value)
    assert "\n" not in msg and CONFIGS[name][1] in msg, msg


def test_fused_graph_passes(tiny_onnx_ort):
    Model.from_dir(tiny_onnx_ort, huge_pages=False)


def test_same_size_config_edit_with_mtime_kept(tiny_onnx, tmp_path):
    """The issue's repro: n_layers rewritten in place (same size, mtime restored) after a first load."""
    folder = copy_folder(tiny_onnx, tmp_path / "m")
    Model.from_dir(folder, huge_pages=False)
    path = folder / "config.json"
    st = path.stat()
    path.write_bytes(path.read_bytes().replace(b'"n_layers": 2', b'"n_layers": 3'))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ModelFolderError) as e:
        Model.from_dir(folder, huge_pages=False)
    assert "config.json" in str(e.value) and "\n" not in str(e.value)
