"""The desktop app's entry point (PyInstaller's script: packaging/llama2-onnx.spec).

With arguments it is the `llama2-onnx` command; with none it is the app: the chat page on a free
port, opened in the default browser, on the model next to the executable (llama2_onnx/frozen.py).
"""

import multiprocessing
import sys

if __name__ == "__main__":
    multiprocessing.freeze_support()  # a frozen child process runs its task here, not the app
    from llama2_onnx.cli import app_main

    sys.exit(app_main(sys.argv[1:]))
