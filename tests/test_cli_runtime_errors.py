"""Every runtime hardening case through the real command line: exit 2, exactly one line on stderr
(no traceback), the model folder untouched. Each case runs `llama2-onnx generate|chat` in a fresh
process on a tiny model folder, tampered where the case says."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from folder_tamper import BAD_LOCATIONS, copy_folder, rewrite_manifest, tampered


def _cli(*argv, stdin: bytes | None = None, env=None):
    code = "import sys; from llama2_onnx.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, input=stdin, env=env)


def _manifest(edit):
    def setup(folder):
        path = folder / "manifest.json"
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return setup


def _config(key, value):
    """config.json edited and the manifest rewritten to match: only the graph check is left."""
    def setup(folder):
        path = folder / "config.json"
        cfg = json.loads(path.read_text())
        cfg["model"][key] = value
        path.write_text(json.dumps(cfg, indent=2))
        rewrite_manifest(folder)
    return setup


def _same_size_config(folder):
    path = folder / "config.json"
    st = path.stat()
    path.write_bytes(path.read_bytes().replace(b'"n_layers": 2', b'"n_layers": 3'))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


GEN = ("generate", "{m}", "--prompt", "Hello", "--max-new-tokens", "3")
CHAT = ("chat", "{m}", "--max-new-tokens", "3")

# name -> (argv, stdin, folder setup or a BAD_LOCATIONS name or None, what stderr says)
CASES = {
    "generate seed -1": ((*GEN, "--seed", "-1"), None, None, "seed must be an integer"),
    "generate seed 2**63": ((*GEN, "--seed", str(2**63)), None, None, "seed must be an integer"),
    "chat seed -1": ((*CHAT, "--seed", "-1"), b"hi\n", None, "seed must be an integer"),
    "empty stop string": ((*GEN, "--stop", ""), None, None, "stop strings"),
    "top-p 0": ((*GEN, "--top-p", "0"), None, None, "top_p"),
    "prefix cache -1 GB": ((*GEN, "--prefix-cache-gb", "-1"), None, None, "--prefix-cache-gb must be >= 0"),
    "empty manifest": (GEN, None, _manifest(lambda m: {"files": {}}), "does not list model.onnx"),
    "manifest without the data file": (GEN, None, _manifest(lambda m: {"files": {k: v for k, v in m["files"].items()
                                                                               if k != "model.onnx.data"}}), "does not list"),
    "manifest entry not a dict": (GEN, None, _manifest(lambda m: {"files": {**m["files"], "config.json": []}}), "malformed"),
    "manifest size a string": (GEN, None, _manifest(lambda m: {"files": {**m["files"], "config.json": {"size": "1", "sha256": "0" * 64}}}),
                               "size of 'config.json'"),
    "manifest a list": (GEN, None, _manifest(lambda m: [m]), "JSON object"),
    "config n_layers, manifest rewritten": (GEN, None, _config("n_layers", 3), "does not match model.onnx"),
    "config vocab, manifest rewritten": (GEN, None, _config("vocab_size", 32001), "does not match model.onnx"),
    "config same size, mtime kept": (GEN, None, _same_size_config, "config.json does not match its sha256"),
    "chat on a tampered folder": (CHAT, b"hi\n", "parent", "not a plain file name"),
    **{f"external data: {name}": (GEN, None, name, needle) for name, (_, needle) in BAD_LOCATIONS.items()},
}


@pytest.mark.parametrize("name", list(CASES))
def test_runtime_cli_errors(tiny_onnx, tmp_path, name):
    argv, stdin, setup, needle = CASES[name]
    if isinstance(setup, str):
        folder = tampered(tiny_onnx, tmp_path, setup)
    else:
        folder = copy_folder(tiny_onnx, tmp_path / "model")
        if setup is not None:
            # a first load, so the folder is remembered as verified, then the tampering
            assert _cli(*[a.replace("{m}", str(folder)) for a in GEN], env=_env(tmp_path)).returncode == 0
            setup(folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    done = _cli(*[a.replace("{m}", str(folder)) for a in argv], stdin=stdin, env=_env(tmp_path))
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def _env(tmp_path):
    return {**os.environ, "LLAMA2_ONNX_CACHE": str(tmp_path / "cache")}


@pytest.mark.parametrize("argv, stdin", [
    (CHAT, b"caf\xe9 \xff\xfe hello\n\xc3\n"),  # Latin-1 and stray bytes on chat's stdin: replaced, not fatal
    ((*GEN[:3], "Hello \udcff\udcfe"), None),  # bytes that are not UTF-8 in argv (surrogateescape)
])
def test_bytes_that_are_not_utf8_are_replaced(tiny_onnx, tmp_path, argv, stdin):
    done = _cli(*[a.replace("{m}", str(tiny_onnx)) for a in argv], "--max-new-tokens", "2", stdin=stdin, env=_env(tmp_path))
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 0 and "Traceback" not in err, err
