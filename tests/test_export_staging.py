"""export/staging.py: interrupted exports leave nothing for good (SIGTERM, stale partial folders,
a kill in the middle of --overwrite), and a running export's folder is never touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama2_onnx.cli import main
from llama2_onnx.export import staging

from test_cli_export_errors import _copy, _tree, small  # noqa: F401 - small is a fixture

# Runs the CLI after wrapping one function of a module: PATCH names it, and the wrapper's body.
RUN_PATCHED = """
import os, sys, time, pathlib
{patch}
from llama2_onnx.cli import main
sys.exit(main(sys.argv[2:]))
"""

# The graph is written, then the export waits: the .partial folder is full when the signal comes.
SLOW_AFTER_GRAPH = """
from llama2_onnx.export import api
real = api.write_graph
def slow(*a, **kw):
    sha = real(*a, **kw)
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(60)
    return sha
api.write_graph = slow
"""

# Killed (os._exit: no clean-up runs) right after OUT is moved aside, before the new folder takes its place.
KILL_BETWEEN_RENAMES = """
real = os.replace
def replace(src, dst, **kw):
    real(src, dst, **kw)
    if pathlib.Path(src).name == "out" and ".old-" in str(dst):
        os._exit(9)
os.replace = replace
"""


def _run(patch: str, argv: list, marker: Path | None = None, **kw) -> subprocess.Popen:
    code = RUN_PATCHED.format(patch=patch)
    return subprocess.Popen([sys.executable, "-c", code, str(marker), "export", "--quiet", "--no-verify", *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _export(argv, capsys) -> tuple[int, str]:
    code = main(["export", "--quiet", "--no-verify", *map(str, argv)])
    return code, capsys.readouterr().err.strip()


def test_sigterm_removes_the_partial_folder(small, tmp_path):
    work, marker = tmp_path / "work", tmp_path / "graph-written"
    ck = _copy(small["hf"], work / "ck")
    before = _tree(work)
    proc = _run(SLOW_AFTER_GRAPH, [ck, work / "out"], marker)
    deadline = time.monotonic() + 60
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()
    assert list(work.glob(".out.partial-*"))  # the export is halfway
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert _tree(work) == before  # no partial folder, no lock file, no OUT


def test_stale_folders_of_dead_runs_are_removed(small, tmp_path, capsys):
    ck = _copy(small["hf"], tmp_path / "ck")
    for name in (".out.partial-abcd1234", ".out.old-zz99aa11", ".other.partial-abcd1234"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx.data").write_bytes(b"\0" * 1000)
    assert _export([ck, tmp_path / "out"], capsys)[0] == 0
    # another OUT's partial folder is that export's business
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.partial-abcd1234", "ck", "out"]


def test_a_kill_between_the_renames_of_overwrite_is_repaired(small, tmp_path, capsys):
    ck, out = _copy(small["hf"], tmp_path / "ck"), tmp_path / "out"
    assert _export([ck, out], capsys)[0] == 0
    first = _tree(out)
    proc = _run(KILL_BETWEEN_RENAMES, [ck, out, "--overwrite"])
    proc.communicate(timeout=120)
    assert proc.returncode == 9 and not out.exists()  # the state a kill at the worst moment leaves
    # the next export puts the old folder back (and refuses, as OUT is not empty), leaving nothing else
    code, err = _export([ck, out], capsys)
    assert code == 2 and "--overwrite" in err
    assert _tree(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "out"]


def test_the_lock_is_released_and_removed(small, tmp_path, capsys):
    ck = _copy(small["hf"], tmp_path / "ck")
    for _ in range(2):
        assert _export([ck, tmp_path / "out", "--overwrite"], capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "out"]


def test_signals_are_restored_after_export(small, tmp_path, capsys):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGXFSZ)}
    _export([_copy(small["hf"], tmp_path / "ck"), tmp_path / "out"], capsys)
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("name, ours", [
    ("manifest.json", False),  # a web app's manifest
    ("model.onnx", False),
])
def test_is_model_folder(tmp_path, name, ours):
    (tmp_path / name).write_text('{"name": "my app", "icons": []}')
    assert staging.is_model_folder(tmp_path) is ours


def test_is_model_folder_true_for_an_export(small, tmp_path, capsys):
    assert _export([_copy(small["hf"], tmp_path / "ck"), tmp_path / "out"], capsys)[0] == 0
    assert staging.is_model_folder(tmp_path / "out")
