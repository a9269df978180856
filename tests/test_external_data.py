"""runtime/external_data.py: the protobuf walker against models built with the onnx package, and
every external-data location that leaves the folder refused before ONNX Runtime sees it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from folder_tamper import BAD_LOCATIONS, tampered
from llama2_onnx.runtime.external_data import ExternalTensor, external_tensors
from llama2_onnx.runtime.folder import ModelFolderError, check_folder
from llama2_onnx.runtime.session import Model


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA2_ONNX_CACHE", str(tmp_path / "cache"))


def _external(name: str, location: str, offset: int = 0, length: int = 16) -> TensorProto:
    t = numpy_helper.from_array(np.zeros(4, np.float32), name)
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def _graph(name: str, nodes=(), inits=()) -> onnx.GraphProto:
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    return helper.make_graph(list(nodes), name, [], [out], initializer=list(inits))


def _model_in_every_place() -> tuple[onnx.ModelProto, set[str]]:
    """One external tensor in each place a TensorProto can sit in a ModelProto."""
    inline = numpy_helper.from_array(np.ones(4, np.float32), "inline")  # not external: not reported
    sparse = onnx.SparseTensorProto(values=_external("sparse_values", "b"), indices=numpy_helper.from_array(np.arange(4), "idx"))
    sparse.dims.extend([8])
    attr_sparse = onnx.SparseTensorProto(values=_external("attr_sparse", "i"), indices=numpy_helper.from_array(np.arange(4), "idx2"))
    attr_sparse.dims.extend([8])
    nodes = [
        helper.make_node("Constant", [], ["c"], value=_external("attr_t", "c")),
        helper.make_node("If", ["cond"], ["y"], then_branch=_graph("then", inits=[_external("then_init", "d")]),
                         else_branch=_graph("else", nodes=[helper.make_node("Constant", [], ["y"], value=inline)])),
        helper.make_node("Custom", [], ["z"], domain="x", tensors=[_external("attr_tensors", "e"), inline]),
        helper.make_node("Custom", [], ["w"], domain="x", graphs=[_graph("g", inits=[_external("graphs_init", "f")])]),
        helper.make_node("Constant", [], ["s"], sparse_value=attr_sparse),
    ]
    graph = _graph("main", nodes=nodes, inits=[_external("init", "a"), inline])
    graph.sparse_initializer.append(sparse)
    model = helper.make_model(graph)
    fn = helper.make_function("x", "F", [], ["o"], [helper.make_node("Constant", [], ["o"], value=_external("fn_t", "g"))],
                              [helper.make_opsetid("", 23)])
    model.functions.append(fn)
    model.training_info.add().initialization.CopyFrom(_graph("train", inits=[_external("train_init", "h")]))
    names = {"init", "sparse_values", "attr_t", "then_init", "attr_tensors", "graphs_init", "attr_sparse", "fn_t", "train_init"}
    return model, names


def test_walker_finds_every_external_tensor():
    model, names = _model_in_every_place()
    found = external_tensors(model.SerializeToString())
    assert {t.name for t in found} == names
    assert next(t for t in found if t.name == "init") == ExternalTensor("init", "a", 0, 16)


def test_walker_agrees_with_onnx_on_an_exported_model(tiny_onnx):
    model = onnx.load(tiny_onnx / "model.onnx", load_external_data=False)
    want = {t.name: {e.key: e.value for e in t.external_data} for t in model.graph.initializer
            if t.data_location == TensorProto.EXTERNAL}
    found = external_tensors((tiny_onnx / "model.onnx").read_bytes())
    assert want and {t.name: {"location": t.location, "offset": str(t.offset), "length": str(t.length)} for t in found} == want


@pytest.mark.parametrize("cut", [1, 7, 100, -1])
def test_truncated_model_is_one_line(tiny_onnx, tmp_path, cut):
    from folder_tamper import copy_folder, rewrite_manifest

    folder = copy_folder(tiny_onnx, tmp_path / "m")
    data = (tiny_onnx / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(data[:cut])
    rewrite_manifest(folder)
    with pytest.raises(ModelFolderError, match="not a valid ONNX model") as e:
        check_folder(folder)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", sorted(BAD_LOCATIONS))
def test_locations_outside_the_folder_are_refused(tiny_onnx, tmp_path, name):
    folder = tampered(tiny_onnx, tmp_path, name)
    with pytest.raises(ModelFolderError, match=BAD_LOCATIONS[name][1]) as e:
        Model.from_dir(folder, huge_pages=False)
    assert "\n" not in str(e.value)


def test_runtime_loads_without_onnx_or_torch(tiny_onnx):
    code = ("import sys; sys.modules['onnx'] = None; sys.modules['torch'] = None\n"
            "from llama2_onnx.runtime.session import Model\n"
            f"Model.from_dir({str(tiny_onnx)!r}, huge_pages=False)\n"
            "assert 'onnx' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
