"""The desktop app: `llama2-onnx` frozen by PyInstaller (packaging/, `make app`) into one folder with
its own Python, the runtime, the server and the chat page, and no torch. What differs when frozen:

- nothing relaunches `sys.executable -m ...` (in a frozen app that is the app itself): what would,
  says so in one line (REFUSED: export needs torch; bench runs Python workers and peers);
- the model: a folder named `model` next to the executable (an exported folder, copied there), else
  the default model if an earlier export left it in the cache, else a message an app user can act on;
- started with no arguments it is the app: `serve --open` on that model, the chat page opened in the
  default browser on a free port, stopped with Ctrl+C (or by closing its console).

Stdlib only: imported before anything else in the app.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import UserError

FROZEN = bool(getattr(sys, "frozen", False))
MODEL_DIR_NAME = "model"  # an exported model folder next to the app's executable
# commands the frozen app refuses, and why
REFUSED = {
    "export": "export needs torch, which the desktop app leaves out; export with the pip-installed llama2-onnx "
              "(pip install 'llama2-onnx[export]') and give the app the folder",
    "bench": "bench starts Python workers and peers as processes, which the desktop app cannot; "
             "run it from the pip-installed llama2-onnx",
}


def app_dir() -> Path:
    """The folder holding the app's executable."""
    return Path(sys.executable).resolve().parent


def bundled_model() -> Path | None:
    """The model folder shipped next to the desktop app's executable, if there is one (never outside it)."""
    if not FROZEN:
        return None
    folder = app_dir() / MODEL_DIR_NAME
    return folder if (folder / "manifest.json").is_file() else None


def no_model_message() -> str:
    return (f"no model to open: put an exported model folder named '{MODEL_DIR_NAME}' next to {Path(sys.executable).name} "
            f"(in {app_dir()}), or start it with one: {Path(sys.executable).name} serve --open FOLDER")


def relaunch_refused(what: str) -> None:
    """What would run `sys.executable -m ...` says in one line that the desktop app cannot."""
    if FROZEN:
        raise UserError(f"{what} starts Python as a process, which the desktop app cannot; "
                        "use the pip-installed llama2-onnx for it")
