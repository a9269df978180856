import subprocess
import sys

from llama2_onnx.cli import main

NO_TORCH = "import sys; sys.modules['torch'] = None; "


def test_help_and_version(capsys):
    for argv in (["--help"], ["--version"]):
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == 0
    out = capsys.readouterr().out
    assert "export" in out and "generate" in out and "chat" in out and "bench" in out


def test_runtime_imports_and_help_work_without_torch():
    code = NO_TORCH + "import llama2_onnx.runtime; from llama2_onnx.cli import main; main(['--help'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "usage: llama2-onnx" in done.stdout


def test_console_script_help():
    exe = __import__("shutil").which("llama2-onnx") or str(__import__("pathlib").Path(sys.executable).with_name("llama2-onnx"))
    done = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "subcommand" not in done.stderr
