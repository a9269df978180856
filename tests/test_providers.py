"""The execution-provider registry, its fallback to the CPU and its missing-package errors
(DirectML and CUDA are not in this machine's onnxruntime: the Windows path is tested from here)."""

from __future__ import annotations

import subprocess
import sys

import onnxruntime as ort
import pytest

from llama2_onnx.errors import UserError
from llama2_onnx.runtime import Generator
from llama2_onnx.runtime.providers import CHOICES, PROVIDERS, open_with_fallback, resolve


def test_registry():
    assert set(PROVIDERS) == {"cpu", "cuda", "dml"} and CHOICES[0] == "auto"
    assert PROVIDERS["dml"].ort_name == "DmlExecutionProvider" and PROVIDERS["dml"].device == "dml"
    assert resolve("cpu") is PROVIDERS["cpu"]
    with pytest.raises(UserError, match="unknown provider 'metal'"):
        resolve("metal")


def test_auto_takes_the_first_available(monkeypatch):
    assert resolve("auto") is PROVIDERS["cpu"]  # this machine's build
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["DmlExecutionProvider", "CPUExecutionProvider"])
    assert resolve("auto") is PROVIDERS["dml"]


@pytest.mark.parametrize("name, package", [("dml", "llama2-onnx[directml]"), ("cuda", "llama2-onnx[cuda]")])
def test_missing_package_names_what_to_install(name, package):
    assert PROVIDERS[name].ort_name not in ort.get_available_providers()
    with pytest.raises(UserError) as e:
        resolve(name)
    assert package in str(e.value) and "\n" not in str(e.value)


def test_cli_provider_dml_missing_is_one_line(tiny_onnx_ort):
    done = subprocess.run([sys.executable, "-m", "llama2_onnx.cli", "generate", str(tiny_onnx_ort), "--prompt", "x",
                           "--provider", "dml"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "onnxruntime-directml" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_fallback_when_the_provider_fails_to_start():
    notes, tried = [], []

    def open_session(p):
        tried.append(p.name)
        if p.name == "dml":
            raise RuntimeError("D3D12 device not found\nmore detail")
        return "session"

    session, used = open_with_fallback(open_session, PROVIDERS["dml"], used=lambda s: "CPUExecutionProvider",
                                       notify=notes.append)
    assert (session, used.name, tried) == ("session", "cpu", ["dml", "cpu"])
    (note,) = notes
    assert "dml provider did not start (D3D12 device not found)" in note and "running on the CPU" in note
    assert "--opset 18" in note and "\n" not in note


def test_no_fallback_from_the_cpu():
    def broken(p):
        raise RuntimeError("bad model")

    with pytest.raises(RuntimeError, match="bad model"):
        open_with_fallback(broken, PROVIDERS["cpu"], used=lambda s: "CPUExecutionProvider", notify=pytest.fail)


def test_model_falls_back_when_onnxruntime_leaves_the_provider_out(tiny_onnx_ort, monkeypatch, capsys):
    # as on Windows with onnxruntime-directml but no usable GPU: the provider is listed but not used
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["DmlExecutionProvider", "CPUExecutionProvider"])
    with pytest.warns(UserWarning):  # onnxruntime's own complaint about the unlisted provider
        gen = Generator.from_dir(tiny_onnx_ort, provider="dml")
    assert gen.model.provider is PROVIDERS["cpu"] and gen.model.session.get_providers() == ["CPUExecutionProvider"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "running on the CPU" in err[0]
    assert gen.generate("Hello", max_new_tokens=3).tokens  # and it generates
