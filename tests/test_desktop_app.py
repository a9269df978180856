"""The desktop app (packaging/, `make app`): built as one folder by PyInstaller from a fresh runtime-only
virtual environment, then run with no Python in its environment (`env -i`): `generate` on the tiny
folder prints what the venv's `llama2-onnx generate` prints; `serve` answers /health, the chat page
and a streamed chat completion; started with no arguments next to a `model` folder it serves that
folder; what it cannot do (export, bench) is one line; and no file of torch is inside it.

Slow (a venv, pip and PyInstaller: a few minutes); the app is built once per session into tmp.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
PROMPT = "The quick brown fox"


@pytest.fixture(scope="session")
def app(tmp_path_factory) -> Path:
    sys.path.insert(0, str(ROOT / "packaging"))
    try:
        from build_app import build
    finally:
        sys.path.pop(0)
    base = tmp_path_factory.mktemp("app")
    try:
        folder = build(base / "venv", base / "dist", base / "work")
    except subprocess.CalledProcessError as e:
        pytest.fail(f"the app build failed: {e}")
    return folder


def _env(home: Path) -> list[str]:
    """env -i: nothing of this Python's environment, only a home for the app's cache."""
    return ["env", "-i", f"HOME={home}"]


def test_no_torch_inside(app):
    names = [str(p.relative_to(app)).lower() for p in app.rglob("*")]
    assert (app / "llama2-onnx").is_file() and len(names) > 10
    assert not [n for n in names if "torch" in n.split("/")[0] or "/torch" in n or n.startswith("torch")]


def test_generate_equals_the_venv(app, tiny_onnx_ort, tmp_path):
    args = ["generate", str(tiny_onnx_ort), "--prompt", PROMPT, "--max-new-tokens", "12", "--provider", "cpu"]
    frozen = subprocess.run([*_env(tmp_path), str(app / "llama2-onnx"), *args], capture_output=True, text=True, timeout=300)
    code = "import sys; from llama2_onnx.cli import main; sys.exit(main(sys.argv[1:]))"
    ours = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert frozen.returncode == 0, frozen.stderr
    assert ours.returncode == 0 and frozen.stdout == ours.stdout and frozen.stdout.strip()


def test_what_it_cannot_do_is_one_line(app, tmp_path):
    for command in (["export", "x", "y"], ["export", "x", "y", "--graph", "ort"], ["export", "--help"], ["bench"],
                    ["bench", "--speculative", "ngram"]):
        done = subprocess.run([*_env(tmp_path), str(app / "llama2-onnx"), *command], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "desktop app" in done.stderr


def _serving(cmd: list[str]):
    """Start the app's server; (the process, its URL as the app prints it once ready)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    seen = []
    try:
        for line in proc.stdout:  # "serving NAME at http://127.0.0.1:PORT (...)"
            seen.append(line)
            match = re.search(r"serving \S+ at (http://127\.0\.0\.1:\d+)", line)
            if match:
                assert httpx.get(match[1] + "/health", timeout=10).status_code == 200
                return proc, match[1]
            if time.monotonic() > deadline:
                break
        raise AssertionError(f"the app did not say it was serving: {''.join(seen)[-2000:]}")
    except BaseException:
        _stop(proc)
        raise


def _stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def test_serve_answers_health_page_and_a_stream(app, tiny_onnx_ort, tmp_path):
    proc, url = _serving([*_env(tmp_path), str(app / "llama2-onnx"), "serve", str(tiny_onnx_ort), "--host", "127.0.0.1",
                          "--port", "0", "--provider", "cpu"])
    try:
        page = httpx.get(url + "/", timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
        body = {"model": tiny_onnx_ort.name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True,
                "temperature": 0}
        pieces = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    pieces += [c["delta"].get("content") or "" for c in json.loads(line[6:])["choices"]]
        assert "".join(pieces)
    finally:
        _stop(proc)


def test_no_arguments_serves_the_model_next_to_it(app, tiny_onnx_ort, tmp_path):
    """The app folder copied with a `model` folder beside the executable: started bare, it serves that."""
    copy = tmp_path / "app"
    shutil.copytree(app, copy, symlinks=True)
    shutil.copytree(tiny_onnx_ort, copy / "model")
    bare = subprocess.run([*_env(tmp_path), str(app / "llama2-onnx")], capture_output=True, text=True, timeout=60)
    assert bare.returncode == 2 and "next to llama2-onnx" in bare.stderr  # the original has no model beside it
    proc, url = _serving([*_env(tmp_path), str(copy / "llama2-onnx")])  # no browser here: opening it fails quietly
    try:
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        assert model == "model"
    finally:
        _stop(proc)
    assert os.path.isdir(copy / "model")
