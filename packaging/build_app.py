"""Build the desktop app (`make app`): a runtime-only virtual environment (the project with the `serve`
extra and PyInstaller, never torch: the app cannot hold what is not there), then PyInstaller with
packaging/llama2-onnx.spec.

    python packaging/build_app.py [--venv build/app-venv] [--dist dist] [--onefile]

Writes DIST/llama2-onnx/ (the folder app: `llama2-onnx` and `_internal/`), or DIST/llama2-onnx with
--onefile. Prints the app's size. A model folder copied to DIST/llama2-onnx/model is what the app
opens when started with no arguments (llama2_onnx/frozen.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYINSTALLER = "pyinstaller==6.22.3"


def build(venv_dir: Path, dist: Path, work: Path, onefile: bool = False, quiet: bool = True) -> Path:
    py = venv_dir / "bin" / "python"
    if not py.exists():
        venv.EnvBuilder(with_pip=True).create(venv_dir)
    q = ["--quiet"] if quiet else []
    # a plain (not editable) install: PyInstaller reads the package from site-packages
    subprocess.run([str(py), "-m", "pip", "install", *q, "--disable-pip-version-check", f"{ROOT}[serve]", PYINSTALLER],
                   check=True)
    found = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('torch') is not None)"],
                           capture_output=True, text=True, check=True).stdout.strip()
    if found == "True":
        raise SystemExit(f"{venv_dir} has torch: build the app from a runtime-only environment (remove it and rerun)")
    env = {**os.environ, "ONEFILE": "1" if onefile else "0"}
    subprocess.run([str(venv_dir / "bin" / "pyinstaller"), "--noconfirm", "--clean", *(["--log-level", "WARN"] if quiet else []),
                    "--distpath", str(dist), "--workpath", str(work), str(ROOT / "packaging" / "llama2-onnx.spec")],
                   check=True, env=env, cwd=ROOT)
    return dist / "llama2-onnx"


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--venv", type=Path, default=ROOT / "build" / "app-venv")
    p.add_argument("--dist", type=Path, default=ROOT / "dist")
    p.add_argument("--onefile", action="store_true")
    args = p.parse_args(argv)
    app = build(args.venv, args.dist, ROOT / "build" / "pyinstaller", args.onefile)
    print(f"{app}: {size_mb(app):.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
