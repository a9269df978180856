"""`llama2-onnx serve` as a user runs it: a subprocess on a free port, its URL printed once ready;
bad arguments are one line and exit 2."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("fastapi")


def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "llama2_onnx.cli", "serve", *args]


def test_serve_prints_its_url_and_serves(tiny_onnx_ort, tmp_path):
    key = tmp_path / "key"
    key.write_text("sk-file\n")
    proc = subprocess.Popen(serve_cmd(str(tiny_onnx_ort), "--port", "0", "--api-key-file", str(key), "--metrics",
                                      "--provider", "cpu", "--threads", "1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # blocks until ready (or the process ends: "")
        m = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert m, (line, proc.poll())
        url = m.group(0)
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        r = httpx.post(url + "/v1/completions", json={"model": tiny_onnx_ort.name, "prompt": "hi", "max_tokens": 3},
                       headers={"Authorization": "Bearer sk-file"}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer sk-file"}).status_code == 200
        assert httpx.get(url + "/metrics").status_code == 401
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("args", [["--max-batch", "0"], ["--port", "70000"], ["--timeout", "0"],
                                  ["--api-key", "a", "--api-key-file", "f"], ["--max-queue", "-1"],
                                  ["--max-connections", "0"], ["--read-timeout", "0"], ["--keep-alive", "-1"],
                                  ["--grace", "-1"], ["--grace", "nan"], ["--prefix-cache-gb", "-0.5"],
                                  ["--prefix-cache-gb", "nan"]])
def test_bad_arguments_one_line_exit_2(tiny_onnx_ort, args):
    r = subprocess.run(serve_cmd(str(tiny_onnx_ort), *args), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_missing_folder_and_taken_port(tmp_path, tiny_onnx_ort):
    r = subprocess.run(serve_cmd(str(tmp_path / "nothing")), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "config.json" in r.stderr
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        start = time.monotonic()
        r = subprocess.run(serve_cmd(str(tiny_onnx_ort), "--port", str(port)), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot listen" in r.stderr and time.monotonic() - start < 60
